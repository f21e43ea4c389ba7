"""Which role each endpoint needs, on one normalised path. Deny by default: a method and path not
listed here is refused, whatever MONAI Label would serve for it.

The policy, our routes and MONAI Label's routes all see the same path (``normalise``): only
characters a URL path needs, no dot segments, no empty segments, no encoded slashes. Rules match
the whole path (``fullmatch``), so a suffix such as ``%0A`` cannot make a rule and a route
disagree about what was asked. MONAI Label grows endpoints between releases; a new one stays
refused until someone reviews it and adds a rule here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PUBLIC = "public"  # role value for endpoints open without a token (the health check only)
LOGIN = "login"  # MONAI Label's sign-in for its Slicer plugin (server.stock_login): open, it takes a token
ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}"  # a model, strategy, image or job name
PATH_CHARS = re.compile(r"/[A-Za-z0-9._~,/-]*")
DICOMWEB_PATH = r"[A-Za-z0-9./,-]+"  # checked further by the proxy (server.dicomweb)

R = ("GET", "HEAD")


class PathError(ValueError):
    """The request path is not one we can match unambiguously."""


@dataclass(frozen=True)
class Rule:
    methods: tuple[str, ...]
    pattern: re.Pattern
    role: str


def _rule(methods, pattern, role):
    return Rule(tuple(methods), re.compile(pattern), role)


RULES = [
    _rule(R, r"/health/?", PUBLIC),
    _rule(("GET",), r"/auth/?", LOGIN),
    _rule(("POST",), r"/auth/token/?", LOGIN),
    _rule(("GET",), r"/auth/token/valid/?", "user"),
    # reading: any signed-in user
    _rule(R, r"/info/?", "user"),
    _rule(R, r"/|/docs|/openapi\.json|/favicon\.ico", "user"),
    _rule(R, r"/static/[A-Za-z0-9._~/-]+", "user"),
    _rule(R, r"/ohif(/[A-Za-z0-9._~/-]*)?", "user"),
    _rule(("POST",), rf"/infer/{ID}/?", "user"),  # not /infer/wsi/...: whole-slide routes take server paths
    _rule(("POST",), rf"/activelearning/{ID}/?", "user"),
    _rule(R, r"/datastore/?", "user"),
    _rule(R, r"/datastore/(image|label)(/info)?/?", "user"),
    _rule(R, r"/train/?", "user"),
    _rule(R, r"/scoring/?", "user"),
    _rule(R, r"/batch/infer/?", "user"),
    _rule(("GET",), rf"/queue/?|/queue/{ID}/?", "user"),
    _rule(("GET",), rf"/proxy/dicom/(wado|qido)/{DICOMWEB_PATH}", "user"),
    # annotating: saving labels and images
    _rule(("PUT",), r"/datastore(/image|/label)?/?", "annotator"),
    _rule(("PUT",), r"/datastore/((image|label)/info|updatelabelinfo)/?", "annotator"),
    _rule(R, r"/datastore/dataset/?", "annotator"),
    _rule(("POST", "DELETE"), r"/scoring/?", "annotator"),
    _rule(("POST",), rf"/scoring/{ID}/?", "annotator"),
    _rule(("POST",), rf"/proxy/dicom/stow/{DICOMWEB_PATH}", "annotator"),
    # administering: training, deleting, model files, logs, reload, batch inference
    _rule(("POST",), rf"/train/?|/train/{ID}/?", "admin"),
    _rule(("DELETE",), r"/train/?", "admin"),
    _rule(("DELETE",), r"/datastore/(image|label)/?", "admin"),
    _rule(("GET", "PUT", "DELETE"), rf"/model/{ID}/?", "admin"),
    _rule(("GET",), rf"/model/info/{ID}/?", "admin"),
    _rule(R, r"/logs/?|/logs/gpu/?", "admin"),
    _rule(("POST",), r"/reload/?", "admin"),
    _rule(("POST",), rf"/batch/infer/{ID}/?", "admin"),
    _rule(("DELETE",), r"/batch/infer/?", "admin"),
    # not listed, so refused: sessions (they take uploads we do not check), other /auth/* routes, whole-slide infer
]


def normalise(path: str, raw_path: bytes | None = None) -> str:
    """The path every layer matches on (the ASGI ``path``, already %-decoded); ``PathError`` if it
    holds control or other unexpected characters, dot or empty segments, or an encoded slash."""
    if raw_path is not None and re.search(rb"%2f|%5c", raw_path, re.IGNORECASE):
        raise PathError("the path contains an encoded '/' or '\\'")
    if not PATH_CHARS.fullmatch(path):
        raise PathError("the path contains characters that are not allowed (letters, digits, '/', '.', '_', '-', '~', ',')")
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise PathError("the path contains a '.' or '..' segment")
    if any(s == "" for s in segments[:-1]):
        raise PathError("the path contains an empty segment ('//')")
    return path


def required_role(method: str, path: str) -> str | None:
    """Role needed for ``method path`` (a normalised path); ``PUBLIC`` for the health check; ``None``
    when the endpoint is not served."""
    for rule in RULES:
        if method in rule.methods and rule.pattern.fullmatch(path):
            return rule.role
    return None
