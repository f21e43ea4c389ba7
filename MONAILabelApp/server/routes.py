"""Our handlers for the MONAI Label endpoints that take client input into the model, the datastore
or the DICOMweb upstream.

They validate first (ids, params, uploads), then call MONAI Label's own app/datastore methods:
inference and active learning (which may run the model) go through the bounded model queue
(``work_queue``; its jobs are listed by ``GET /queue/``), datastore writes run in a worker thread so
the event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os

from fastapi import BackgroundTasks, Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match

from . import dicomweb
from .uploads import Checked, check_upload, remove_file, save_upload, slice_count, upload_suffix
from .validation import (
    RESERVED_PARAMS,
    InputError,
    Limits,
    check_id,
    check_infer_params,
    parse_json_object,
)
from .work_queue import Cancelled, ModelQueue, QueueFull, training_jobs

logger = logging.getLogger(__name__)
OUTPUTS = ("image", "json", "all")
GEOMETRY_TOLERANCE = 1e-3  # relative, for spacing; absolute mm for origin; absolute for direction cosines


def hide_server_paths(text: str) -> str:
    """Error messages name datastore ids, never where the server keeps its files."""
    import tempfile

    from monailabel.config import settings

    folders = {"<studies>": settings.MONAI_LABEL_STUDIES, "<app>": settings.MONAI_LABEL_APP_DIR,
               "<tmp>": tempfile.gettempdir()}
    for name, folder in sorted(folders.items(), key=lambda kv: -len(str(kv[1] or ""))):
        if folder and not str(folder).startswith(("http://", "https://")):
            text = text.replace(os.path.realpath(str(folder)), name).replace(str(folder), name)
    return text


def relative_path(datastore, path: str) -> str:
    """A datastore file as the client may see it: relative to the studies folder."""
    root = os.path.realpath(getattr(datastore, "_datastore_path", "") or os.sep)
    path = os.path.realpath(path)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.basename(path)


def _instance():
    from monailabel.interfaces.utils.app import app_instance

    return app_instance()


async def _image_exists(datastore, image_id: str) -> bool:
    return image_id in await asyncio.to_thread(datastore.list_images)


async def require_image(datastore, image_id: str) -> None:
    """404 with a message unless the datastore holds `image_id` (already checked by `check_id`)."""
    if not await _image_exists(datastore, image_id):
        raise InputError(404, f"image {image_id!r} is not in the datastore")


def _image_geometry(datastore, image_id: str) -> Checked | None:
    """Size and geometry of a datastore image when it is a file SimpleITK can read, else None."""
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
    dim = min(3, reader.GetDimension())
    return Checked(size=tuple(int(s) for s in reader.GetSize())[:3], spacing=tuple(reader.GetSpacing())[:dim],
                   origin=tuple(reader.GetOrigin())[:dim], direction=tuple(reader.GetDirection()),
                   slices=slice_count(reader))


def check_label_matches(label: Checked, image: Checked, image_id: str) -> None:
    """A label must lie on its image's grid: same size, spacing, origin and direction."""
    if tuple(s for s in image.size if s > 1) != tuple(s for s in label.size if s > 1):
        raise InputError(400, f"label size {label.size} does not match image {image_id!r} size {image.size}")
    if len(label.spacing) != len(image.spacing):
        return  # a 2D label of a one-slice volume: sizes already agree, geometry is the image's
    close = all(abs(a - b) <= GEOMETRY_TOLERANCE * max(1.0, abs(b)) for a, b in zip(label.spacing, image.spacing))
    if not close:
        raise InputError(400, f"label spacing {label.spacing} does not match image {image_id!r} spacing {image.spacing}")
    if any(abs(a - b) > max(GEOMETRY_TOLERANCE, 0.01 * s) for a, b, s in zip(label.origin, image.origin, image.spacing)):
        raise InputError(400, f"label origin {label.origin} does not match image {image_id!r} origin {image.origin}")
    if any(abs(a - b) > GEOMETRY_TOLERANCE for a, b in zip(label.direction, image.direction)):
        raise InputError(400, f"label direction does not match image {image_id!r} direction")


def check_label_info(info: dict, label: Checked | None) -> None:
    """Label info must be readable by training (the same parser and slice rule) and, once it names
    segments, name every value in the label (a name training does not know counts: that segment is
    left out of training, as ``lib.label_info`` says). ``label``: what the label file holds; None
    when it cannot be read here (the parser's rules still apply)."""
    from lib import label_info

    try:
        parsed = label_info.parse(info)
    except label_info.LabelInfoError as e:
        raise InputError(400, f"label info (params) cannot be used for training: {e}") from None
    if label is None:
        return
    if parsed.slice is not None and label.slices is not None and parsed.slice >= label.slices:
        raise InputError(400, f"label info (params) cannot be used for training: slice {parsed.slice} is outside "
                              f"the image, which has {label.slices} slices (0..{label.slices - 1})")
    named = {value for _, value, _ in parsed.segments} | {value for _, value in parsed.unknown}
    unnamed = sorted(set(label.values) - {0} - named)
    if named and unnamed:
        raise InputError(400, f"label values {unnamed[:20]} are not named by any segment in the label info; "
                              f"named: {sorted(named)}")


async def stored_label(datastore, label: str, tag: str, limits: Limits) -> Checked | None:
    """What a saved label file holds (values, slices), read as training reads it (a DICOMweb
    datastore's local NIfTI copy); None when there is no such file we can read."""
    from monailabel.datastore.local import LocalDatastore

    if not isinstance(datastore, LocalDatastore):
        return None
    uri = await asyncio.to_thread(LocalDatastore.get_label_uri, datastore, label, tag)
    if not uri or not os.path.isfile(uri):
        return None
    try:
        return await check_upload(uri, limits, "label", label=True)
    except InputError:
        return None


def check_info_fits(datastore, info: dict, limits: Limits, what: str) -> None:
    """An info object (after merging an update) and the index holding it stay within the limits:
    the index is rewritten on every save and any user downloads it."""
    size = len(json.dumps(info, default=str).encode("utf-8"))
    if size > limits.max_info_bytes:
        raise InputError(413, f"{what} info would be {size} bytes; the limit is {limits.max_info_bytes} per image or label")
    index = getattr(datastore, "_datastore_config_path", None)
    current = os.path.getsize(index) if index and os.path.isfile(index) else 0
    if current + size > limits.max_index_bytes:
        raise InputError(413, f"the datastore index would exceed {limits.max_index_bytes} bytes; remove old info "
                              "or images first")


class Overrides:
    """A small FastAPI app that replaces MONAI Label's routes that take client input."""

    def __init__(self, queue: ModelQueue, limits: Limits):
        self.queue = queue
        self.limits = limits
        self.app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self._register_errors()
        self._register_model_routes()
        self._register_upload_routes()
        self._register_proxy_routes()
        self._register_queue_routes()
        from .datastore_routes import register_datastore_routes
        from .stock_login import register_login_routes

        register_datastore_routes(self.app, limits)
        register_login_routes(self.app)

        @self.app.get("/logs/gpu")
        async def gpu_info():
            """MONAI Label's answered 500 on a machine without nvidia-smi, and blocked the event loop."""
            import shutil
            import subprocess

            if shutil.which("nvidia-smi") is None:
                raise InputError(404, "this server has no NVIDIA GPU tools (nvidia-smi not found)")
            done = await asyncio.to_thread(subprocess.run, ["nvidia-smi"], capture_output=True, text=True, timeout=30)
            return Response(content=done.stdout, media_type="text/plain")

    def route_for(self, method: str, path: str) -> str | None:
        """The path (with or without a final '/') one of our routes serves for ``method path``, else None."""
        for candidate in dict.fromkeys((path, path.rstrip("/") or "/", path.rstrip("/") + "/")):
            scope = {"type": "http", "method": method, "path": candidate, "root_path": ""}
            if any(route.matches(scope)[0] == Match.FULL for route in self.app.router.routes):
                return candidate
        return None

    async def __call__(self, scope, receive, send):
        state = scope.setdefault("state", {})

        async def send_with_job_id(message):  # every answer to a queued request names its job
            if message["type"] == "http.response.start" and state.get("job_id"):
                message = {**message, "headers": [*message.get("headers", []), (b"x-job-id", state["job_id"].encode())]}
            await send(message)

        await self.app(scope, receive, send_with_job_id)

    def _register_errors(self):
        @self.app.exception_handler(InputError)
        async def input_error(request: Request, exc: InputError):
            return JSONResponse({"detail": hide_server_paths(exc.message)}, status_code=exc.status)

        @self.app.exception_handler(RequestValidationError)
        async def invalid_request(request: Request, exc: RequestValidationError):
            problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
            return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

        @self.app.exception_handler(QueueFull)
        async def queue_full(request: Request, exc: QueueFull):
            return JSONResponse({"detail": str(exc), "job": exc.job.id, "retry_after_s": exc.retry_after},
                                status_code=exc.status, headers={"Retry-After": str(exc.retry_after)})

    def _register_model_routes(self):
        """POST /infer/{model} and /activelearning/{strategy}. FastAPI routes are closures registered by decorators,
        so this method is only their list; the length is the infer route's checks of one request, in the order a client
        fixes them (model, input, params), then its queued run."""
        app, limits, queue = self.app, self.limits, self.queue

        @app.post("/infer/{model}")
        async def infer(request: Request, background_tasks: BackgroundTasks, model: str, image: str = "",
                        session_id: str = "", output: str | None = None, params: str = Form("{}"),
                        file: UploadFile = File(None), label: UploadFile = File(None)):
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
                await require_image(datastore, image)
            else:
                upload, _ = await save_upload(file, limits, "image")
            try:
                job = _admit(queue, request, "infer", model, image=image or None,
                             key=f"infer/{model}/{'volume' if p.get('slice') in (None, '', 'all') else 'slice'}")
                # the model reports progress after each batch; a hung-up client's job stops there. A plain
                # function: MONAI Label deep-copies the request, which would copy a bound method's job
                req = {"model": model, **info.get("config", {}).get("infer", {}), **p,
                       "on_progress": lambda state: job.report(state)}

                def run():
                    # resolve the id to the datastore's own file (never a client path); DICOMweb downloads it
                    req["image"] = upload or datastore.get_image_uri(image)
                    if not req["image"]:
                        raise InputError(404, f"image {image!r} is not in the datastore")
                    return instance.infer(req)

                result = await _run_model(queue, request, job, run)
            except BaseException:
                remove_file(upload)
                raise
            background_tasks.add_task(remove_file, upload)
            return send_response(datastore, result, output, background_tasks)

        @app.post("/activelearning/{strategy}")
        async def activelearning(request: Request, strategy: str, params: dict | None = Body(None)):
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
            job = _admit(queue, request, "activelearning", strategy)
            result = await _run_model(queue, request, job, sample, strategy, params, user)
            if isinstance(result, dict) and isinstance(result.get("path"), str):  # the chosen image's server path
                result["path"] = relative_path(_instance().datastore(), result["path"])
            return result

    def _register_upload_routes(self):
        app, limits = self.app, self.limits

        async def add_image(request: Request, image: str | None, params: str, file: UploadFile):
            instance = _instance()
            info = parse_json_object(params, limits)
            suffix = upload_suffix(file.filename if file else None)
            image_id = image or os.path.basename(file.filename or "")[: -len(suffix)]
            check_id(image_id)
            datastore = instance.datastore()
            if await _image_exists(datastore, image_id):
                raise InputError(409, f"image {image_id!r} already exists; choose another id")
            info["user"] = request.state.identity.name
            check_info_fits(datastore, info, limits, f"image {image_id!r}")
            path, _ = await save_upload(file, limits, "image")
            try:
                image_id = await asyncio.to_thread(datastore.add_image, image_id, path, info)
            finally:
                remove_file(path)
            return {"image": image_id}

        @app.put("/datastore/image")
        async def put_image(request: Request, image: str | None = None, params: str = Form("{}"),
                            file: UploadFile = File(...)):
            return await add_image(request, image, params, file)

        @app.put("/datastore/")
        async def put_image_legacy(request: Request, image: str | None = None, params: str = Form("{}"),
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
            await require_image(datastore, image)
            path, checked = await save_upload(label, limits, "label", label=True)
            try:
                geometry = await asyncio.to_thread(_image_geometry, datastore, image)
                if geometry is not None:
                    check_label_matches(checked, geometry, image)
                    checked = dataclasses.replace(checked, slices=geometry.slices)  # training counts the image's
                check_label_info(info, checked)
                info["user"] = request.state.identity.name
                check_info_fits(datastore, info, limits, f"label {image!r}")

                def save():
                    label_id = datastore.save_label(image, path, tag or "final", info)
                    res = instance.on_save_label(image, label_id) or {}
                    res.update({"image": image, "label": label_id})
                    return res

                return await asyncio.to_thread(save)
            finally:
                remove_file(path)

    def _register_queue_routes(self):
        app, queue = self.app, self.queue

        def visible(request: Request):
            """The jobs the caller may see: a user their own; an admin everyone's (images only of their own)."""
            me = request.state.identity
            estimates = queue.estimates()
            rows = [queue.describe(j, estimates, owner_view=j.user == me.name)
                    for j in queue.jobs() if j.user == me.name or me.has("admin")]
            if me.has("admin"):
                from monailabel.utils.async_tasks.utils import background_tasks

                rows += training_jobs(list(background_tasks.get("train", [])))
            return rows

        @app.get("/queue/")
        async def queue_list(request: Request):
            return {**queue.summary(), "jobs": visible(request)}

        @app.get("/queue/{job_id}")
        async def queue_job(request: Request, job_id: str):
            check_id(job_id, "job")
            found = next((row for row in visible(request) if row["id"] == job_id), None)
            if found is None:
                raise InputError(404, f"no job {job_id!r} of yours is queued or recently finished "
                                      f"(the last {queue.history} jobs are kept)")
            return found

    def _register_proxy_routes(self):
        app, limits = self.app, self.limits

        async def proxy(request: Request, op: str, path: str):
            body = await request.body() if request.method == "POST" else None
            if body is not None and len(body) > limits.max_upload_bytes:
                raise InputError(413, f"request body is larger than {limits.max_upload_bytes} bytes")
            query = [(k, v) for k, v in request.query_params.multi_items()]
            status, content, media = await dicomweb.forward(request.method, op, path, query, request.headers, body)
            return Response(content=content, status_code=status, media_type=media)

        @app.get("/proxy/dicom/{op}/{path:path}")
        async def proxy_read(request: Request, op: str, path: str):
            if op not in ("wado", "qido"):
                raise InputError(404, "GET /proxy/dicom/ serves wado/ and qido/ only")
            return await proxy(request, op, path)

        @app.post("/proxy/dicom/{op}/{path:path}")
        async def proxy_store(request: Request, op: str, path: str):
            if op != "stow":
                raise InputError(405, "POST /proxy/dicom/ serves stow/ only; read with GET")
            return await proxy(request, op, path)


def _admit(queue: ModelQueue, request: Request, kind: str, target: str, key=None, image=None):
    """A queued job for the signed-in user; its id goes back in ``X-Job-Id``, also when refused."""
    try:
        job = queue.admit(request.state.identity.name, kind, target, key=key, image=image)
    except QueueFull as e:
        request.state.job_id = e.job.id
        raise
    request.state.job_id = job.id
    return job


async def _hung_up(request: Request):
    """Completes when the client disconnects (the body is read: the server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_model(queue: ModelQueue, request: Request, job, fn, *args):
    """Run on the model thread; map the app's own input complaints to 4xx, crashes to a 500 that says so."""
    from fastapi import HTTPException
    from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

    try:
        return await queue.run(job, fn, *args, hung_up=_hung_up(request))
    except (InputError, QueueFull):
        raise
    except Cancelled as e:  # nobody reads this answer: the client is gone (499, as nginx logs it)
        raise InputError(499, str(e))
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
