"""Parse the multipart/form-data body MONAI Label returns from /infer (JSON `params` + label file).

Uses the standard library's email parser: the `cgi` module the stock client relies on is gone
in Python 3.13.
"""

import email.parser
import email.policy
import json


class MultipartError(ValueError):
    pass


def parse_multipart(content_type, body):
    """Split a multipart body into {field name: (filename or None, bytes)}."""
    if "multipart/" not in (content_type or "").lower():
        raise MultipartError(f"expected a multipart response, got {content_type!r}")
    if "boundary=" not in content_type:
        raise MultipartError("multipart response without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("the multipart response could not be parsed")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def split_infer_response(content_type, body):
    """(params dict, label file name or None, label bytes or None) from an /infer response.

    The server answers with plain JSON when the result has no label file.
    """
    if "application/json" in (content_type or "").lower():
        return json.loads(body.decode("utf-8") or "{}"), None, None
    fields = parse_multipart(content_type, body)
    params = {}
    if "params" in fields:
        text = fields["params"][1].decode("utf-8").strip()
        params = json.loads(text) if text else {}
        if isinstance(params, str):  # some servers double-encode the JSON
            params = json.loads(params)
    filename, data = fields.get("image", (None, None))
    if data is None:
        for key, (fname, payload) in fields.items():
            if key != "params" and fname:
                filename, data = fname, payload
                break
    return params, filename, data
