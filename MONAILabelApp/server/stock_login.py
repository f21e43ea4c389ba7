"""MONAI Label's sign-in endpoints, answered so that its stock Slicer plugin can use serve.py.

The plugin (and `MONAILabelClient`) asks `GET /auth/` whether the server wants a sign-in; only then does
it show its user-name/password dialog, post both to `POST /auth/token` (an OAuth2 password form) and send
the `access_token` it gets back as `Authorization: <token_type> <access_token>` (`update_auth`);
`GET /auth/token/valid` tells it whether a kept token still works. Without these answers the plugin
signs in to nothing and every request of its is a 401.

We keep no passwords: a user signs in with their user name and, as the password, the token that
`serve.py add-user` printed for them. The answer is that same token (nothing new is issued), so
signing in grants nothing the token did not already grant; a wrong pair is a 401 that says what to type.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import FastAPI, Request

from .validation import InputError

MAX_FORM_BYTES = 4096  # a user name and a token


async def _read_form(request: Request) -> dict:
    """The urlencoded form, refused once it grows past MAX_FORM_BYTES (without reading the rest)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InputError(413, f"the sign-in form is larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise InputError(400, "the sign-in form must be UTF-8 text (username=...&password=...)") from None
    return {key: values[-1] for key, values in fields.items()}


def register_login_routes(app: FastAPI) -> None:
    """`/auth/` and `/auth/token` run without a token (the middleware hands over its token store in the
    request state); `/auth/token/valid` runs after the middleware has signed the caller in."""

    @app.get("/auth/")
    async def auth_enabled():
        return {"enabled": True, "client_id": None, "realm": None,
                "how": "user name, and as password the token `serve.py add-user` printed"}

    @app.post("/auth/token")
    async def access_token(request: Request):
        form = await _read_form(request)
        username, token = form.get("username", ""), form.get("password", "")
        identity = request.state.tokens.identify(token) if token else None
        if identity is None or identity.name != username:
            raise InputError(401, "user name and token do not match: sign in with your user name and, as the "
                                  "password, the token `serve.py add-user` printed for you")
        return {"access_token": token, "token_type": "bearer"}

    @app.get("/auth/token/valid")
    async def valid_token(request: Request):
        identity = request.state.identity
        return {"username": identity.name, "roles": [identity.role]}
