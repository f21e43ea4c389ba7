"""Recently used server URLs, most recent first, kept in a settings store."""

from .constants import DEFAULT_SERVER_URL


class UrlHistory:
    KEY = "RadDiag/ServerUrlHistory"

    def __init__(self, settings, limit=10):
        self.settings = settings
        self.limit = limit

    def urls(self):
        value = self.settings.get(self.KEY, None) or []
        if isinstance(value, str):
            value = [u for u in value.split(";") if u]
        return list(value) or [DEFAULT_SERVER_URL]

    def add(self, url):
        url = url.strip().rstrip("/")
        if not url:
            return self.urls()
        urls = [url] + [u for u in self.urls() if u != url]
        urls = urls[:self.limit]
        self.settings.set(self.KEY, ";".join(urls))
        return urls
