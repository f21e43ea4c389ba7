"""Our handlers for MONAI Label's datastore read/update endpoints that answered 500s, leaked server
paths or left files behind:

- image/label info updates: invalid JSON is a 400, an unknown image or label a 404, label info
  must stay readable by training (the rules of ``PUT /datastore/label``), and an info object is
  bounded (``Limits.max_info_bytes``) as is the whole index (``Limits.max_index_bytes``), which any
  user downloads;
- ``GET /datastore/image/info`` and ``GET /datastore/?output=train`` give ids and paths relative
  to the studies folder, never the server's absolute paths;
- deleting an unknown image or label is a 404 (MONAI Label answered 500), and so is downloading
  one (``GET /datastore/image``, ``GET``/``HEAD /datastore/label``: MONAI Label's DICOMweb
  datastore answered 500 for a series the PACS does not hold);
- ``HEAD /datastore/image?check_sum=ALGO:HEX``: an unknown algorithm or a digest that is not hex is
  a 400 (MONAI Label crashed on it and never matched a valid one);
- ``GET /datastore/dataset`` streams the zip MONAI Label builds in the temp folder and deletes it
  before the first byte is sent, so no call leaves a file behind, whatever the client does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re

from fastapi import FastAPI, Form, Request
from fastapi.responses import StreamingResponse

from .routes import (
    _image_exists,
    _instance,
    check_info_fits,
    check_label_info,
    relative_path,
    require_image,
    stored_label,
)
from .uploads import remove_file
from .validation import InputError, Limits, check_id, parse_json_object

CHECKSUM_ALGOS = ("SHA256", "SHA512", "MD5")  # the ones MONAI Label's client sends
HEX = re.compile(r"[0-9a-fA-F]{32,128}")
ZIP_CHUNK = 1024 * 1024


async def _require_label(datastore, label: str, tag: str) -> None:
    """404 with a message unless the datastore holds `label` under `tag`."""
    if not await asyncio.to_thread(lambda: bool(datastore.get_label_by_image_id(label, tag))):
        raise InputError(404, f"label {label!r} with tag {tag!r} is not in the datastore")


async def _require_label_file(datastore, label: str, tag: str) -> None:
    """404 with a message unless `label` can be downloaded: a DICOMweb datastore's final labels are
    SEG series on the PACS (looked up there), other labels files in the datastore."""
    from monailabel.datastore.local import LocalDatastore

    def found():
        if tag == "final" and hasattr(datastore, "_client"):  # DICOMWebDatastore
            return bool(datastore._client.search_for_series(search_filters={"SeriesInstanceUID": label}))
        return bool(LocalDatastore.get_label_uri(datastore, label, tag))

    if not await asyncio.to_thread(found):
        raise InputError(404, f"label {label!r} with tag {tag!r} is not in the datastore")


def register_datastore_routes(app: FastAPI, limits: Limits) -> None:
    """The datastore routes we answer instead of MONAI Label's; FastAPI routes are closures registered by decorators,
    so this function is only their list (each route is short)."""

    @app.get("/datastore/")
    async def datastore_summary(output: str | None = None):
        datastore = _instance().datastore()
        if output not in (None, "stats", "all", "train"):
            raise InputError(400, "output must be one of stats, all, train")
        if output == "all":
            return await asyncio.to_thread(datastore.json)
        if output == "train":
            items = await asyncio.to_thread(datastore.datalist)
            return [{k: relative_path(datastore, v) if k in ("image", "label") else v for k, v in d.items()} for d in items]
        return await asyncio.to_thread(datastore.status)

    @app.get("/datastore/image/info")
    async def get_image_info(image: str):
        check_id(image)
        datastore = _instance().datastore()
        await require_image(datastore, image)
        info = await asyncio.to_thread(datastore.get_image_info, image)
        if "path" in info:  # MONAI Label adds the server's absolute path
            info["path"] = relative_path(datastore, info["path"])
        return info

    @app.put("/datastore/image/info")
    async def put_image_info(request: Request, image: str, info: str = Form("{}")):
        check_id(image)
        update = parse_json_object(info, limits, "info")
        datastore = _instance().datastore()
        await require_image(datastore, image)
        update["user"] = request.state.identity.name
        merged = {**datastore.get_image_info(image), **update}
        merged.pop("path", None)
        check_info_fits(datastore, merged, limits, f"image {image!r}")
        await asyncio.to_thread(datastore.update_image_info, image, update)
        return {}

    async def update_label_info(request: Request, label: str, tag: str, text: str):
        check_id(label, "label")
        check_id(tag, "label tag")
        update = parse_json_object(text, limits, "info")
        datastore = _instance().datastore()
        await _require_label(datastore, label, tag)
        update["user"] = request.state.identity.name
        merged = {**datastore.get_label_info(label, tag), **update}
        check_label_info(merged, await stored_label(datastore, label, tag, limits))
        check_info_fits(datastore, merged, limits, f"label {label!r}")
        await asyncio.to_thread(datastore.update_label_info, label, tag, update)
        return {}

    @app.put("/datastore/label/info")
    async def put_label_info(request: Request, label: str, tag: str, info: str = Form("{}")):
        return await update_label_info(request, label, tag, info)

    @app.put("/datastore/updatelabelinfo")
    async def put_label_info_legacy(request: Request, label: str, tag: str, params: str = Form("{}")):
        return await update_label_info(request, label, tag, params)

    @app.delete("/datastore/image")
    async def delete_image(id: str):
        check_id(id)
        datastore = _instance().datastore()
        await require_image(datastore, id)
        await asyncio.to_thread(datastore.remove_image, id)
        return {}

    @app.delete("/datastore/label")
    async def delete_label(id: str, tag: str):
        check_id(id, "label")
        check_id(tag, "label tag")
        datastore = _instance().datastore()
        await _require_label(datastore, id, tag)
        await asyncio.to_thread(datastore.remove_label, id, tag)
        return {}

    @app.get("/datastore/image")
    async def download_image(image: str):
        from monailabel.endpoints.datastore import download_image as send_image

        check_id(image)
        datastore = _instance().datastore()
        await require_image(datastore, image)
        return await asyncio.to_thread(send_image, image)

    @app.api_route("/datastore/label", methods=["GET", "HEAD"])
    async def download_label(request: Request, label: str, tag: str):
        from monailabel.endpoints.datastore import download_label as send_label

        check_id(label, "label")
        check_id(tag, "label tag")
        await _require_label_file(_instance().datastore(), label, tag)
        return await asyncio.to_thread(send_label, label, tag, request.method == "HEAD")

    @app.head("/datastore/image")
    async def check_image(image: str, check_sum: str | None = None):
        check_id(image)
        datastore = _instance().datastore()
        uri = datastore.get_image_uri(image) if await _image_exists(datastore, image) else ""
        if not uri or not os.path.isfile(uri):
            raise InputError(404, f"image {image!r} is not in the datastore")
        if check_sum:
            algo, _, digest = check_sum.rpartition(":")
            algo = algo.upper() or "SHA256"
            if algo not in CHECKSUM_ALGOS or not HEX.fullmatch(digest):
                raise InputError(400, f"check_sum must be [ALGO:]HEXDIGEST with ALGO one of {', '.join(CHECKSUM_ALGOS)}")
            if await asyncio.to_thread(_file_digest, uri, algo) != digest.lower():
                raise InputError(404, f"image {image!r} does not have this checksum")
        return {}

    @app.get("/datastore/dataset")
    async def download_dataset(limit_cases: int | None = None):
        datastore = _instance().datastore()
        if limit_cases is not None and limit_cases < 1:
            raise InputError(400, "limit_cases must be a positive number of cases")
        if not await asyncio.to_thread(datastore.datalist):
            raise InputError(404, "no image has a final label yet: there is no dataset to download")
        path = await asyncio.to_thread(datastore.get_dataset_archive, limit_cases)
        archive = open(path, "rb")
        remove_file(path)  # the open file keeps the data until the response closes it
        size = os.fstat(archive.fileno()).st_size

        def chunks():
            with archive:
                while data := archive.read(ZIP_CHUNK):
                    yield data

        return StreamingResponse(chunks(), media_type="application/zip", headers={
            "content-disposition": 'attachment; filename="dataset.zip"', "content-length": str(size)})


def _file_digest(path: str, algo: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo.lower()).hexdigest()
