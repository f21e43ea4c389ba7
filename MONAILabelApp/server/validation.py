"""Checks on what clients send: ids, request params and question text (uploaded files: ``uploads``).

Every failure is an :class:`InputError` carrying an HTTP status and one sentence telling the
client what to fix; the server turns it into a 4xx and keeps serving.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from lib.infer_params import MAX_QUESTION_CHARS, MAX_VOXELS, PARAMS, InputError

__all__ = ["InputError", "Limits", "check_id", "parse_json_object", "check_infer_params", "RESERVED_PARAMS"]

MAX_JSON_DEPTH = 32  # params and info objects a client sends
SURROGATE = re.compile("[\ud800-\udfff]")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # always fullmatch: "$" would allow a final "\n"
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32")
# params MONAI Label's own writer and clients send besides the model's (lib.infer_params.PARAMS)
SERVER_PARAMS = ("result_dtype", "result_compress", "client_id")
# request keys that steer the server rather than the model; a client never sets them
RESERVED_PARAMS = {
    "image", "model", "label", "file", "device", "save_label", "label_tag", "output", "session",
    "session_id", "description", "cache_transforms", "logging", "result_dir", "output_dir",
}


@dataclass
class Limits:
    max_upload_bytes: int = 512 * 1024 * 1024
    max_question_chars: int = MAX_QUESTION_CHARS
    max_params_bytes: int = 64 * 1024
    max_voxels: int = MAX_VOXELS
    max_decoded_bytes: int = 1024 * 1024 * 1024  # pixel data after decompression (int16 at 512 Mi voxels)
    max_side: int = 8192
    max_info_bytes: int = 64 * 1024  # one image's or label's info in the index (after merging updates)
    max_index_bytes: int = 64 * 1024 * 1024  # the whole datastore index, which any user downloads


def check_id(value: str, what: str = "image") -> str:
    """Datastore ids are names, never paths: letters, digits, '.', '_' and '-' only."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InputError(400, f"invalid {what} id {value[:80]!r}: use a datastore id (letters, digits, '.', '_', '-'), not a path")
    return value


def parse_json_object(text: str | None, limits: Limits, what: str = "params") -> dict:
    if text is None or text == "":
        return {}
    if len(text.encode("utf-8", "ignore")) > limits.max_params_bytes:
        raise InputError(413, f"{what} is larger than {limits.max_params_bytes} bytes")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(400, f"{what} is not valid JSON: {e.msg} at position {e.pos}")
    except RecursionError:
        raise InputError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(value, dict):
        raise InputError(400, f"{what} must be a JSON object, got {type(value).__name__}")
    _check_json_value(value, what)
    return value


def _check_json_value(value, what: str) -> None:
    """Refuse what later layers cannot handle: deep nesting (recursive copies, pydantic) and lone
    surrogates such as "\\udfff" (JSON allows them; UTF-8 responses and log lines do not)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InputError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            for text in (key, child):
                if isinstance(text, str) and SURROGATE.search(text):
                    raise InputError(400, f"{what} contains a lone UTF-16 surrogate (e.g. \\udfff): send valid Unicode text")
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_infer_params(params: dict, limits: Limits, model_options: dict | None = None) -> dict:
    """Keep only known params with valid values (the app's schema, then MONAI Label's own keys, then the
    model's extra options by the type of their default); anything else is a 400 naming the key."""
    model_options = {k: v for k, v in (model_options or {}).items() if k not in RESERVED_PARAMS}
    out = {}
    for key, value in params.items():
        if key == "question" and isinstance(value, str) and len(value) > limits.max_question_chars:
            raise InputError(413, f"question has {len(value)} characters; the limit is {limits.max_question_chars}")
        if key in PARAMS:
            if value is not None:
                PARAMS[key].read(value)
        elif key == "result_compress":
            if not isinstance(value, bool):
                raise InputError(400, f"{key} must be true or false")
        elif key == "result_dtype":
            if value not in RESULT_DTYPES:
                raise InputError(400, f"result_dtype must be one of {', '.join(RESULT_DTYPES)}")
        elif key == "client_id":
            if value is not None and (not isinstance(value, str) or len(value) > 128):  # the stock client sends null
                raise InputError(400, "client_id must be null or a string of at most 128 characters")
        elif key in model_options:
            _check_like(key, value, model_options[key])
        else:
            allowed = sorted({*PARAMS, *SERVER_PARAMS, *model_options})
            raise InputError(400, f"param {key[:60]!r} is not accepted; allowed: {', '.join(allowed)}")
        out[key] = value
    return out


def _check_like(key, value, default):
    """A model option must have the type of its default (or be one of the listed choices)."""
    if isinstance(default, (list, tuple)):
        if value not in default:
            raise InputError(400, f"{key} must be one of {list(default)[:20]}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(400, f"{key} must be true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(400, f"{key} must be a number")
        if _is_int(default) and not _is_int(value):
            raise InputError(400, f"{key} must be an integer")
    elif isinstance(default, str):
        if not isinstance(value, str) or len(value) > 2000:
            raise InputError(400, f"{key} must be a string of at most 2000 characters")
    else:
        raise InputError(400, f"{key} cannot be set by clients")
