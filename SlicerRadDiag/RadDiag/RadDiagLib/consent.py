"""Ask before image data leaves the computer (Slicer extension index rule: no upload without opt-in).

Pure logic over a small settings store (`get(key, default)` / `set(key, value)`), so Slicer
backs it with QSettings and tests with a dict. The question is asked once per server per
session; "don't ask again" remembers the answer for that server across sessions.
"""


class DictSettings:
    """In-memory settings store with the same interface the module gives over QSettings."""

    def __init__(self, values=None):
        self.values = dict(values or {})

    def get(self, key, default=None):
        return self.values.get(key, default)

    def set(self, key, value):
        self.values[key] = value


class UploadConsent:
    """`allowed(server_url)` asks `ask(server_url) -> (allow, dont_ask_again)` only when needed."""

    KEY = "RadDiag/UploadConsent/"

    def __init__(self, settings, ask):
        self.settings = settings
        self.ask = ask
        self._session = {}

    def _key(self, server_url):
        return self.KEY + server_url.strip().rstrip("/").lower()

    def remembered(self, server_url):
        """'allow', 'deny' or None (not remembered)."""
        value = self.settings.get(self._key(server_url), None)
        return value if value in ("allow", "deny") else None

    def allowed(self, server_url):
        remembered = self.remembered(server_url)
        if remembered is not None:
            return remembered == "allow"
        key = self._key(server_url)
        if key not in self._session:
            allow, dont_ask_again = self.ask(server_url)
            self._session[key] = bool(allow)
            if dont_ask_again:
                self.settings.set(key, "allow" if allow else "deny")
        return self._session[key]

    def forget(self, server_url):
        """Ask again next time (the Settings 'reset consent' button)."""
        self.settings.set(self._key(server_url), "")
        self._session.pop(self._key(server_url), None)
