"""Which role each MONAI Label endpoint needs: first matching rule wins, anything unlisted is admin-only.

Failing closed matters because MONAI Label grows endpoints between releases; a new one stays
admin-only until someone reviews it and adds a rule here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PUBLIC = None  # role value for endpoints open without a token (the health check only)

R = ("GET", "HEAD")
W = ("PUT", "POST")


@dataclass(frozen=True)
class Rule:
    methods: tuple[str, ...]
    pattern: re.Pattern
    role: str | None


def _rule(methods, pattern, role):
    return Rule(tuple(methods), re.compile(pattern), role)


RULES = [
    _rule(R, r"^/health/?$", PUBLIC),
    # reading: any signed-in user
    _rule(R, r"^/info/?$", "user"),
    _rule(("POST",), r"^/infer/(wsi|wsi_v2)/", "admin"),  # whole-slide routes take server paths
    _rule(("POST",), r"^/infer/[^/]+/?$", "user"),
    _rule(("POST",), r"^/activelearning/[^/]+/?$", "user"),
    _rule(R, r"^/datastore/?$", "user"),
    _rule(R, r"^/datastore/(image|label)(/info)?/?$", "user"),
    _rule(R, r"^/train/?$", "user"),
    _rule(R, r"^/scoring/?$", "user"),
    _rule(R, r"^/batch/infer/?$", "user"),
    _rule(("GET", "POST"), r"^/proxy/dicom/(wado|qido)/", "user"),
    _rule(R, r"^/ohif/", "user"),
    _rule(R, r"^/(docs|openapi\.json|favicon\.ico)?$", "user"),
    _rule(R, r"^/static/", "user"),
    # annotating: saving labels and images
    _rule(("PUT",), r"^/datastore/(image|label)/?$", "annotator"),
    _rule(("PUT",), r"^/datastore/?$", "annotator"),
    _rule(("PUT",), r"^/datastore/((image|label)/info|updatelabelinfo)/?$", "annotator"),
    _rule(R, r"^/datastore/dataset/?$", "annotator"),
    _rule(("POST", "DELETE"), r"^/scoring(/|$)", "annotator"),
    _rule(("GET", "PUT", "DELETE"), r"^/session(/|$)", "annotator"),
    _rule(("GET", "POST"), r"^/proxy/dicom/stow/", "annotator"),
    # everything else (train, delete, model upload/download, logs, reload, batch infer): admin
]


def required_role(method: str, path: str) -> str | None:
    """Role needed for ``method path``; ``PUBLIC`` (None) for the health check; "admin" if unlisted."""
    for rule in RULES:
        if method in rule.methods and rule.pattern.search(path):
            return rule.role
    return "admin"
