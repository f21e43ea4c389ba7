"""Our handlers for the MONAI Label endpoints that take client input into the model or the datastore.

They validate first (ids, params, uploads), then call MONAI Label's own app/datastore methods:
inference and active learning (which may run the model) go through the bounded model queue,
datastore writes run in a worker thread so the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from typing import Optional

from fastapi import BackgroundTasks, Body, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from .validation import (
    RESERVED_PARAMS,
    InputError,
    Limits,
    check_id,
    check_image_file,
    check_infer_params,
    parse_json_object,
    upload_suffix,
)
from .work_queue import ModelQueue, QueueFull

logger = logging.getLogger(__name__)
OUTPUTS = ("image", "json", "all")


def _instance():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


def _remove(path):
    if path and os.path.exists(path):
        os.unlink(path)


async def _save_upload(upload: UploadFile, limits: Limits, what: str, label: bool = False) -> tuple[str, tuple]:
    """Copy an upload to a private temp file and check it is an image we accept."""
    suffix = upload_suffix(upload.filename)
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="raddiag-upload-")
    try:
        with os.fdopen(fd, "wb") as out:
            total = 0
            while chunk := await upload.read(1024 * 1024):
                total += len(chunk)
                if total > limits.max_upload_bytes:
                    raise InputError(413, f"the uploaded {what} exceeds {limits.max_upload_bytes} bytes")
                out.write(chunk)
        size = await asyncio.to_thread(check_image_file, path, limits, what, label)
        return path, size
    except BaseException:
        _remove(path)
        raise


async def _image_exists(datastore, image_id: str) -> bool:
    return image_id in await asyncio.to_thread(datastore.list_images)


def _image_size(datastore, image_id: str):
    """Size (x, y[, z]) of a datastore image when it is a file SimpleITK can read, else None."""
    import SimpleITK as sitk

    uri = datastore.get_image_uri(image_id)
    if not uri or not os.path.isfile(uri):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(uri)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return tuple(int(s) for s in reader.GetSize())[:3]


class Overrides:
    """A small FastAPI app that replaces MONAI Label's infer, active-learning and upload routes."""

    ROUTES = {
        ("POST", "infer"), ("POST", "activelearning"), ("PUT", "datastore/image"), ("PUT", "datastore/label"),
        ("PUT", "datastore"),
    }

    def __init__(self, queue: ModelQueue, limits: Limits):
        self.queue = queue
        self.limits = limits
        self.app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self._register()

    def handles(self, method: str, path: str) -> bool:
        parts = path.strip("/").split("/")
        if method == "POST" and len(parts) == 2 and parts[0] in ("infer", "activelearning"):
            return parts[1] not in ("wsi", "wsi_v2")
        if method == "PUT" and parts[0] == "datastore":
            return parts[1:] in ([], ["image"], ["label"])
        return False

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)

    def _register(self):
        app, limits, queue = self.app, self.limits, self.queue

        @app.exception_handler(InputError)
        async def input_error(request: Request, exc: InputError):
            return JSONResponse({"detail": exc.message}, status_code=exc.status)

        @app.exception_handler(QueueFull)
        async def queue_full(request: Request, exc: QueueFull):
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

        @app.post("/infer/{model}")
        async def infer(
            request: Request,
            background_tasks: BackgroundTasks,
            model: str,
            image: str = "",
            session_id: str = "",
            output: Optional[str] = None,
            params: str = Form("{}"),
            file: UploadFile = File(None),
            label: UploadFile = File(None),
        ):
            from monailabel.endpoints.infer import send_response

            instance = _instance()
            info = await asyncio.to_thread(instance.info)
            models = info.get("models", {})
            if model not in models:
                hint = "" if models else " (no model folder is loaded: see the server log, --conf model_path DIR)"
                raise InputError(404, f"model {model[:60]!r} is not served; available: "
                                      f"{', '.join(sorted(models)) or 'none'}{hint}")
            if session_id:
                raise InputError(400, "session_id is not supported; send ?image=<datastore id> or upload a file")
            if label is not None:
                raise InputError(400, "label uploads are not accepted by this model")
            if output is not None and output not in OUTPUTS:
                raise InputError(400, f"output must be one of {', '.join(OUTPUTS)}")
            p = check_infer_params(parse_json_object(params, limits), limits, models[model].get("config"))
            if bool(image) == bool(file):
                raise InputError(400, "send exactly one input: ?image=<datastore id> or a file upload")
            datastore = instance.datastore()
            upload = None
            if image:
                check_id(image)
                if not await _image_exists(datastore, image):
                    raise InputError(404, f"image {image!r} is not in the datastore")
            else:
                upload, _ = await _save_upload(file, limits, "image")
                background_tasks.add_task(_remove, upload)
            req = {"model": model, **info.get("config", {}).get("infer", {}), **p}

            def run():
                # resolve the id to the datastore's own file (never a client path); for DICOMweb this downloads it
                req["image"] = upload or datastore.get_image_uri(image)
                if not req["image"]:
                    raise InputError(404, f"image {image!r} is not in the datastore")
                return instance.infer(req)

            result = await _run_model(queue, run)
            return send_response(datastore, result, output, background_tasks)

        @app.post("/activelearning/{strategy}")
        async def activelearning(request: Request, strategy: str, params: Optional[dict] = Body(None)):
            from monailabel.endpoints.activelearning import sample

            instance = _instance()
            info = await asyncio.to_thread(instance.info)
            if strategy not in info.get("strategies", {}):
                raise InputError(404, f"strategy {strategy[:60]!r} is not available; available: "
                                      f"{', '.join(sorted(info.get('strategies', {})))}")
            params = params or {}
            bad = sorted(set(params) & RESERVED_PARAMS)
            if bad:
                raise InputError(400, f"params {bad} cannot be set by clients")
            user = request.state.identity.name
            return await _run_model(queue, sample, strategy, params, user)

        async def add_image(request: Request, image: Optional[str], params: str, file: UploadFile):
            instance = _instance()
            info = parse_json_object(params, limits)
            suffix = upload_suffix(file.filename if file else None)
            image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
            check_id(image_id)
            datastore = instance.datastore()
            if await _image_exists(datastore, image_id):
                raise InputError(409, f"image {image_id!r} already exists; choose another id")
            path, _ = await _save_upload(file, limits, "image")
            try:
                info["user"] = request.state.identity.name
                image_id = await asyncio.to_thread(datastore.add_image, image_id, path, info)
            finally:
                _remove(path)
            return {"image": image_id}

        @app.put("/datastore/image")
        async def put_image(request: Request, image: Optional[str] = None, params: str = Form("{}"),
                            file: UploadFile = File(...)):
            return await add_image(request, image, params, file)

        @app.put("/datastore/")
        async def put_image_legacy(request: Request, image: Optional[str] = None, params: str = Form("{}"),
                                   file: UploadFile = File(...)):
            return await add_image(request, image, params, file)

        @app.put("/datastore/label")
        async def put_label(request: Request, image: str, tag: str = "final", params: str = Form("{}"),
                            label: UploadFile = File(...)):
            instance = _instance()
            check_id(image)
            check_id(tag or "final", "label tag")
            info = parse_json_object(params, limits)
            datastore = instance.datastore()
            if not await _image_exists(datastore, image):
                raise InputError(404, f"image {image!r} is not in the datastore")
            path, size = await _save_upload(label, limits, "label", label=True)
            try:
                expected = await asyncio.to_thread(_image_size, datastore, image)
                if expected is not None and tuple(s for s in expected if s > 1) != tuple(s for s in size if s > 1):
                    raise InputError(400, f"label size {size} does not match image {image!r} size {expected}")
                info["user"] = request.state.identity.name

                def save():
                    label_id = datastore.save_label(image, path, tag or "final", info)
                    res = instance.on_save_label(image, label_id) or {}
                    res.update({"image": image, "label": label_id})
                    return res

                return await asyncio.to_thread(save)
            finally:
                _remove(path)


async def _run_model(queue: ModelQueue, fn, *args):
    """Run on the model thread; map the app's own input complaints to 4xx, crashes to a 500 that says so."""
    from fastapi import HTTPException
    from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

    try:
        return await queue.run(fn, *args)
    except (InputError, QueueFull):
        raise
    except HTTPException as e:  # a task's own 4xx (e.g. a strategy refusing a param) keeps its status
        raise InputError(e.status_code, str(e.detail))
    except MONAILabelException as e:
        status = 400 if e.error == MONAILabelError.INVALID_INPUT else 500
        logger.warning("model task failed: %s", e.msg)
        raise InputError(status, e.msg)
    except ValueError as e:
        logger.warning("model task refused the input: %s", e)
        raise InputError(422, f"the model could not process this input: {e}")
    except Exception as e:
        logger.exception("model task crashed")
        raise InputError(500, f"inference failed ({type(e).__name__}); see the server log")
