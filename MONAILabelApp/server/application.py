"""Assemble the served ASGI app: MONAI Label's own FastAPI app, configured through its settings,
with our routes and middleware around it (CORS limited to listed origins -> auth -> app)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from .auth import TokenStore
from .validation import Limits

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    app_dir: str
    studies: str
    auth_config: str
    conf: dict = field(default_factory=dict)
    cors_origins: list = field(default_factory=list)
    max_queue: int = 16
    max_queue_per_user: int | None = None  # None: half the queue
    limits: Limits = field(default_factory=Limits)


def configure_monailabel(options: ServeOptions) -> None:
    """Set MONAI Label's settings through the environment before it is imported, as
    ``monailabel start_server`` does, so training subprocesses inherit them too."""
    app_dir = os.path.realpath(options.app_dir)
    studies = options.studies
    if not studies.startswith(("http://", "https://")):
        studies = os.path.realpath(studies)
        os.makedirs(studies, exist_ok=True)
    for d in ("model", "logs", "bin"):
        os.makedirs(os.path.join(app_dir, d), exist_ok=True)
    env = {
        "MONAI_LABEL_APP_DIR": app_dir,
        "MONAI_LABEL_STUDIES": studies,
        "MONAI_LABEL_APP_CONF": json.dumps(options.conf),
        "MONAI_LABEL_AUTH_ENABLE": "false",  # we authenticate in front; its Keycloak check is broken
        "MONAI_LABEL_CORS_ORIGINS": "[]",
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "MONAI_LABEL_SESSIONS": "false",
        "MONAI_LABEL_TASKS_BATCH_INFER": "false",
        "RADDIAG_SERVER_PID": str(os.getpid()),  # training subprocesses stop when this server is gone (lib/train_guard.py)
    }
    os.environ.update(env)
    # tools the app may look up on PATH (e.g. dcmqi for DICOM SEG) live next to this Python
    bin_dirs = [os.path.join(app_dir, "bin"), os.path.dirname(sys.executable)]
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *bin_dirs])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), app_dir] if p)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    from monailabel.config import settings

    settings.MONAI_LABEL_APP_DIR = app_dir
    settings.MONAI_LABEL_STUDIES = studies
    settings.MONAI_LABEL_APP_CONF = dict(options.conf)
    settings.MONAI_LABEL_AUTH_ENABLE = False
    settings.MONAI_LABEL_CORS_ORIGINS = []
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_SESSIONS = False
    settings.MONAI_LABEL_TASKS_BATCH_INFER = False


def prepare_datastore(options: ServeOptions):
    """Create the app once (model load, datastore scan) and make its file writes crash-safe."""
    from monailabel.interfaces.utils.app import app_instance

    from .datastore_safety import install_atomic_writes, remove_partial_files
    from .uploads import remove_orphaned_uploads

    install_atomic_writes()  # before the datastore is created: its first index read may need recovery
    for path in remove_orphaned_uploads():
        logger.info("removed %s, an upload of a server that was killed", os.path.basename(path))
    if not options.studies.startswith(("http://", "https://")):
        remove_partial_files(os.path.realpath(options.studies))
    instance = app_instance()
    datastore = instance.datastore()
    if install_atomic_writes(datastore):
        root = getattr(datastore, "_datastore_path", None)
        if root and root != os.path.realpath(options.studies):
            remove_partial_files(root)
    return instance


def build_app(options: ServeOptions):
    """Return the ASGI app to hand to uvicorn (MONAI Label inside, our layers outside)."""
    from starlette.middleware.cors import CORSMiddleware

    from .middleware import SecurityMiddleware
    from .routes import Overrides
    from .work_queue import ModelQueue

    tokens = TokenStore.load(options.auth_config)
    configure_monailabel(options)
    from monailabel.app import app as monailabel_app

    # MONAI Label installs CORS for any origin with credentials; drop it, ours is outermost
    monailabel_app.user_middleware = [m for m in monailabel_app.user_middleware if m.cls is not CORSMiddleware]
    monailabel_app.middleware_stack = None
    queue = ModelQueue(capacity=options.max_queue, per_user=options.max_queue_per_user)
    overrides = Overrides(queue, options.limits)
    secured = SecurityMiddleware(monailabel_app, tokens, options.limits, overrides)
    app = CORSMiddleware(
        secured,
        allow_origins=list(options.cors_origins),
        allow_credentials=bool(options.cors_origins),
        allow_methods=["GET", "POST", "PUT", "DELETE", "HEAD"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["X-Job-Id", "Retry-After"],  # a browser client may read its job id and the wait
        max_age=600,
    )
    app.queue = queue  # for tests and diagnostics
    return app
