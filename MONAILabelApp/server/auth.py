"""Per-user bearer tokens with roles, read from an admin-owned JSON file.

Only SHA-256 hashes of tokens are stored: tokens are long random strings (``secrets``), so a
fast hash is enough and a leaked config file does not leak credentials. Lookups compare every
stored hash in constant time so timing does not reveal which prefix matched.

The file is re-read when it changes (checked at most once a second), so ``serve.py add-user``
replacing a user and ``serve.py remove-user`` take effect on a running server without a restart.
A file that no longer loads refuses every token (fail closed) until it is fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from raddiagseg.fileio import atomic_write

ROLES = ("user", "annotator", "admin")
ROLE_LEVEL = {name: level for level, name in enumerate(ROLES)}
RECHECK_S = 1.0  # how often a running server looks at the auth config for changes
logger = logging.getLogger(__name__)


class AuthConfigError(ValueError):
    """The auth config file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    def has(self, required: str) -> bool:
        return ROLE_LEVEL[self.role] >= ROLE_LEVEL[required]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Maps a presented bearer token to an :class:`Identity` (or ``None``)."""

    def __init__(self, entries: list[tuple[str, str, str]], path: Path | None = None):
        self._entries = [(bytes.fromhex(h), Identity(name, role)) for name, role, h in entries]
        self._path = path
        self._signature = _signature(path) if path else None
        self._checked = time.monotonic()
        self.problem: str | None = None  # why no token is accepted (the file stopped loading)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenStore":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AuthConfigError(f"auth config {path} does not exist; create it with `serve.py add-user`")
        except (OSError, json.JSONDecodeError) as e:
            raise AuthConfigError(f"auth config {path} is not valid JSON: {e}")
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, list) or not users:
            raise AuthConfigError(f"auth config {path} needs a non-empty 'users' list")
        entries, names = [], set()
        for i, u in enumerate(users):
            if not isinstance(u, dict):
                raise AuthConfigError(f"auth config {path}: users[{i}] must be an object")
            name, role, digest = u.get("name"), u.get("role"), u.get("token_sha256")
            if not isinstance(name, str) or not name:
                raise AuthConfigError(f"auth config {path}: users[{i}] needs a 'name'")
            if role not in ROLE_LEVEL:
                raise AuthConfigError(f"auth config {path}: user {name!r} has role {role!r}; use one of {', '.join(ROLES)}")
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise AuthConfigError(f"auth config {path}: user {name!r} needs 'token_sha256' (64 lowercase hex digits)")
            if name in names:
                raise AuthConfigError(f"auth config {path}: user {name!r} is listed twice")
            names.add(name)
            entries.append((name, role, digest))
        return cls(entries, path)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last look (at most every ``RECHECK_S``)."""
        now = time.monotonic()
        if self._path is None or now - self._checked < RECHECK_S:
            return
        self._checked = now
        signature = _signature(self._path)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            self._entries = TokenStore.load(self._path)._entries
            self.problem = None
            logger.info("auth config %s changed: %d user(s)", self._path, len(self._entries))
        except AuthConfigError as e:
            self._entries = []
            self.problem = str(e)
            logger.error("%s; every token is refused until it is fixed", e)

    def identify(self, token: str | None) -> Identity | None:
        self.refresh()
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for digest, identity in self._entries:  # no early exit: constant work per request
            if hmac.compare_digest(presented, digest):
                found = identity
        return found


def _signature(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_users(path: Path) -> dict:
    if not path.exists():
        return {"users": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AuthConfigError(f"auth config {path} is not valid JSON: {e}")


def _write_users(path: Path, data: dict) -> None:
    """Replace the file atomically (owner-only), so a running server never reads half of it."""
    atomic_write(path, json.dumps(data, indent=2), mode=0o600)


def add_user(path: str | os.PathLike, name: str, role: str) -> str:
    """Create (or replace) ``name`` with a new random token; returns the token, stores only its hash."""
    if role not in ROLE_LEVEL:
        raise AuthConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name or any(c.isspace() for c in name):
        raise AuthConfigError("user name must be non-empty without spaces")
    path = Path(path)
    data = _read_users(path)
    users = [u for u in data.get("users", []) if u.get("name") != name]
    token = secrets.token_urlsafe(32)
    users.append({"name": name, "role": role, "token_sha256": hash_token(token)})
    data["users"] = users
    _write_users(path, data)
    return token


def remove_user(path: str | os.PathLike, name: str) -> None:
    """Delete ``name`` (its token stops working on a running server within seconds)."""
    path = Path(path)
    if not path.exists():
        raise AuthConfigError(f"auth config {path} does not exist")
    data = _read_users(path)
    users = data.get("users", [])
    kept = [u for u in users if u.get("name") != name]
    if len(kept) == len(users):
        raise AuthConfigError(f"auth config {path} has no user {name!r}")
    if not kept:
        raise AuthConfigError(f"{name!r} is the last user in {path}; add another user first (or stop the server)")
    data["users"] = kept
    _write_users(path, data)
