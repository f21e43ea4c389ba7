"""Team-serving layer around MONAI Label: auth, CORS, input checks, an inference queue, safe datastore writes.

MONAI Label builds its FastAPI app at import time from ``MONAI_LABEL_*`` settings; this package
configures those settings, replaces the few routes that need validation or must run off the
event loop, and wraps the result in pure ASGI middleware (see ``application.build_app``).
"""
