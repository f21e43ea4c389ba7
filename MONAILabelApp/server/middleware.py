"""Pure ASGI layer in front of MONAI Label: health check, bearer-token auth with roles, id checks
on query strings, request-size limits, JSON bodies checked as params are (MONAI Label's own routes
included), and routing of the endpoints we replaced.

Pure ASGI (not ``BaseHTTPMiddleware``) so multipart uploads and file responses stream through
untouched.
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import parse_qsl, urlencode

from .auth import TokenStore
from .policy import LOGIN, PUBLIC, PathError, normalise, required_role
from .validation import ID_PATTERN, InputError, Limits, parse_json_object

logger = logging.getLogger(__name__)

ID_QUERY_KEYS = {"image": "image", "label": "label", "id": "image", "tag": "label tag"}
USER_QUERY_PREFIXES = ("/datastore", "/activelearning", "/session")
SENSITIVE = re.compile(r"(?i)((?:access_)?token|api_key|apikey|password|secret|authorization)=([^&\s\"']+)")
BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """Hide credential values in a log line (query strings, Authorization headers)."""
    return BEARER.sub(r"\1***", SENSITIVE.sub(r"\1=***", text))


class RedactingFilter(logging.Filter):
    """Logging filter for uvicorn's access log and the app's handlers: never log a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and not record.args:
            record.msg = redact(record.msg)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()):
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _json_body(scope) -> bool:
    """Whether FastAPI would read this request's body as JSON: no content type, ``application/json``
    or ``application/*+json`` (the DICOMweb proxy forwards its bodies as they are). Never for DELETE:
    no route reads its body, and MONAI Label's client sends its last request's Content-Length with
    its Stop button (``train_stop``), so waiting for that body would hang the request."""
    if scope["method"] not in ("POST", "PUT", "PATCH") or scope["path"].startswith("/proxy/"):
        return False
    media = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    return media in ("", "application/json") or (media.startswith("application/") and media.endswith("+json"))


async def _checked_json_body(scope, receive, limits: Limits):
    """Read a JSON body and check it as params are checked (size, nesting, lone surrogates, an object);
    returns a ``receive`` that replays it, then passes on what the client sends next (its hang-up)."""
    body, more = b"", True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return receive  # the client hung up: the app sees the disconnect
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limits.max_params_bytes:
            raise InputError(413, f"the JSON request body is larger than {limits.max_params_bytes} bytes")
    if body.strip():
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(400, "the JSON request body is not valid UTF-8") from None
        parse_json_object(text, limits, "the JSON request body")
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class SecurityMiddleware:
    """Authenticates every request but ``/health`` and the stock plugin's sign-in (``stock_login``),
    enforces the role policy and size limits, and sends the replaced endpoints (``overrides.handles``)
    to our own handlers."""

    def __init__(self, app, tokens: TokenStore, limits: Limits, overrides=None):
        self.app = app
        self.tokens = tokens
        self.limits = limits
        self.overrides = overrides

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # MONAI Label serves no websockets
            await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        try:
            path = normalise(scope["path"], scope.get("raw_path"))
        except PathError as e:
            return await send_json(send, 400, {"detail": f"invalid request path: {e}"})
        role = required_role(method, path)
        if role == PUBLIC:
            return await send_json(send, 200, {"status": "ok"})
        if role == LOGIN and self.overrides is not None:  # the stock plugin signs in before it has a token
            routed = self.overrides.route_for(method, path)
            scope = dict(scope, path=routed, raw_path=routed.encode("ascii"),
                         state=dict(scope.get("state") or {}, tokens=self.tokens))
            return await self._call_limited(self.overrides, scope, receive, send)

        identity = self.tokens.identify(self._token(scope))
        if identity is None and self.tokens.problem:
            return await send_json(send, 503, {
                "detail": "the server's user list cannot be read, so no token is accepted; an admin must fix the "
                          "auth config (see the server log)"})
        if identity is None:
            return await send_json(
                send, 401, {"detail": "missing or invalid token: send the header 'Authorization: Bearer <token>'"},
                [(b"www-authenticate", b"Bearer")])
        if role is None:
            return await send_json(send, 404, {"detail": f"{method} {path} is not served by this server"})
        if not identity.has(role):
            return await send_json(send, 403, {
                "detail": f"{method} {path} needs role '{role}'; user '{identity.name}' has role '{identity.role}'"})

        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                return await send_json(send, 400, {"detail": "invalid Content-Length header"})
            if int(length) > self.limits.max_upload_bytes:
                return await send_json(send, 413, {
                    "detail": f"request body is {length} bytes; the limit is {self.limits.max_upload_bytes}"})

        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        for key, value in query:
            what = ID_QUERY_KEYS.get(key)
            if what and value and (not ID_PATTERN.fullmatch(value) or ".." in value):
                return await send_json(send, 400, {
                    "detail": f"invalid {what} id {value[:80]!r}: use a datastore id (letters, digits, '.', '_', '-'), not a path"})
        if path.startswith(USER_QUERY_PREFIXES):  # audit trail: the authenticated name, not a client claim
            query = [(k, v) for k, v in query if k != "user"] + [("user", identity.name)]
            scope = dict(scope, query_string=urlencode(query).encode("latin-1"))
        scope = dict(scope)
        scope["state"] = dict(scope.get("state") or {}, identity=identity)

        if _json_body(scope):  # MONAI Label's own JSON routes (train, scoring) answered 500 to a lone surrogate
            try:
                receive = await _checked_json_body(scope, receive, self.limits)
            except InputError as e:
                return await send_json(send, e.status, {"detail": e.message})
        target, routed = self.app, self.overrides.route_for(method, path) if self.overrides is not None else None
        if routed is not None:
            target = self.overrides
            scope["path"], scope["raw_path"] = routed, routed.encode("ascii")
        await self._call_limited(target, scope, receive, send)

    @staticmethod
    def _token(scope) -> str | None:
        header = _header(scope, b"authorization")
        scheme, _, token = (header or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None

    async def _call_limited(self, app, scope, receive, send):
        """Stop reading a body that grows past the limit (chunked uploads carry no Content-Length)."""
        limit = self.limits.max_upload_bytes
        state = {"received": 0, "rejected": False, "started": False}

        async def limited_receive():
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["rejected"] = True
                    if not state["started"]:
                        state["started"] = True
                        await send_json(send, 413, {"detail": f"request body exceeds the limit of {limit} bytes"})
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["rejected"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await app(scope, limited_receive, guarded_send)
        except Exception:
            if state["rejected"]:
                return
            raise
