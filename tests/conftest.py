"""Shared pytest setup. Tests run on CPU with small data they generate.

Import paths come from `pythonpath` in the repository's pyproject.toml; the fixtures shared by several modules
live in tests/helpers/ and are registered here."""

import os

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["live_server", "model_helpers", "app_server"]
