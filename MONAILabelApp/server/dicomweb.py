"""The DICOMweb proxy (``/proxy/dicom/{wado,qido,stow}/...``) for viewers such as OHIF.

It replaces MONAI Label's, which joined any path onto the upstream URL (so ``..%2F`` reached
Orthanc's ``/tools/shutdown``) and forwarded the client's own headers, bearer token included.
Here a request reaches the upstream only when its path is a DICOMweb resource path
(``studies/<uid>/series/<uid>/...``) under the configured prefix; reads are GET, stores (STOW)
are POST and need the annotator role (``policy``); the upstream sees the server's own
credentials (``MONAI_LABEL_DATASTORE_USERNAME``/``PASSWORD``) and only the client's ``Accept``
and ``Content-Type`` headers, never its ``Authorization``.
"""

from __future__ import annotations

import asyncio
import re

import requests

from .validation import InputError

TOP_LEVEL = ("studies", "series", "instances")
KEYWORDS = {*TOP_LEVEL, "metadata", "rendered", "thumbnail", "frames", "bulkdata"}
UID = re.compile(r"[0-9]{1,64}(\.[0-9]{1,64}){0,63}")
FRAME_LIST = re.compile(r"[0-9]{1,9}(,[0-9]{1,9}){0,999}")
FORWARDED_HEADERS = ("accept", "content-type")
MAX_RESPONSE_BYTES = 2 * 1024 * 1024 * 1024


def resource_path(path: str) -> str:
    """``path`` (already normalised by the policy) if it names a DICOMweb resource, else a 400."""
    segments = path.strip("/").split("/")
    if segments[0] not in TOP_LEVEL or not all(
            s in KEYWORDS or UID.fullmatch(s) or FRAME_LIST.fullmatch(s) for s in segments):
        raise InputError(400, "the proxy only forwards DICOMweb resource paths such as studies/<uid>/series/<uid>"
                              "/instances/<uid>[/frames/<n>|/metadata|/rendered]")
    return "/".join(segments)


def _upstream():
    from monailabel.config import settings

    base = settings.MONAI_LABEL_STUDIES or ""
    if not base.startswith(("http://", "https://")):
        raise InputError(404, "this server has no DICOMweb datastore: /proxy/dicom is served only when --studies "
                              "is a DICOMweb URL")
    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    prefixes = {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                "stow": settings.MONAI_LABEL_STOW_PREFIX}
    auth = (user, password) if user and password else None
    return base.rstrip("/"), prefixes, auth, settings.MONAI_LABEL_DICOMWEB_PROXY_TIMEOUT


async def forward(method: str, op: str, path: str, query: list, headers, body: bytes | None):
    """Send one checked request upstream; returns (status, content, content type)."""
    base, prefixes, auth, timeout = _upstream()
    resource = resource_path(path)
    if op == "qido" and resource.endswith("/metadata"):  # some OHIF versions ask QIDO for metadata
        op = "wado"
    prefix = (prefixes.get(op) or "").strip("/")
    url = "/".join(p for p in (base, prefix, resource) if p)
    sent = {k: v for k, v in headers.items() if k.lower() in FORWARDED_HEADERS}

    def call():
        with requests.request(method, url, params=query, data=body, headers=sent, auth=auth, timeout=timeout,
                              stream=True, allow_redirects=False) as reply:
            content = reply.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
            return reply.status_code, content, reply.headers.get("content-type", "application/octet-stream")

    try:
        status, content, media = await asyncio.to_thread(call)
    except requests.RequestException as e:
        raise InputError(502, f"the DICOMweb server did not answer ({type(e).__name__})") from None
    if len(content) > MAX_RESPONSE_BYTES:
        raise InputError(502, "the DICOMweb server's answer is larger than the proxy forwards")
    if status >= 500 or 300 <= status < 400:
        raise InputError(502, f"the DICOMweb server answered {status}")
    return status, content, media
