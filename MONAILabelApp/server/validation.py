"""Checks on what clients send: ids, request params and question text (uploaded files: ``uploads``).

Every failure is an :class:`InputError` carrying an HTTP status and one sentence telling the
client what to fix; the server turns it into a 4xx and keeps serving.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MAX_JSON_DEPTH = 32  # params and info objects a client sends
SURROGATE = re.compile("[\ud800-\udfff]")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # always fullmatch: "$" would allow a final "\n"
# params a client may send to /infer: name -> checker; the model's own options are added at runtime
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".png")
MODALITIES = ("ct", "xray", "mri")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32")
BASE_PARAMS = ("question", "slice", "modality", "window", "max_new_tokens", "do_sample", "tts", "rvls2m",
               "result_extension", "result_dtype", "result_compress", "client_id")
# request keys that steer the server rather than the model; a client never sets them
RESERVED_PARAMS = {
    "image", "model", "label", "file", "device", "save_label", "label_tag", "output", "session",
    "session_id", "description", "cache_transforms", "logging", "result_dir", "output_dir",
}


class InputError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Limits:
    max_upload_bytes: int = 512 * 1024 * 1024
    max_question_chars: int = 2000
    max_params_bytes: int = 64 * 1024
    max_voxels: int = 1024 * 1024 * 1024 // 4  # 256 Mi voxels (e.g. 512 x 512 x 1000)
    max_decoded_bytes: int = 1024 * 1024 * 1024  # pixel data after decompression (int16 at 512 Mi voxels)
    max_side: int = 8192
    max_new_tokens: int = 1024
    max_info_bytes: int = 64 * 1024  # one image's or label's info in the index (after merging updates)
    max_index_bytes: int = 64 * 1024 * 1024  # the whole datastore index, which any user downloads


def check_id(value: str, what: str = "image") -> str:
    """Datastore ids are names, never paths: letters, digits, '.', '_' and '-' only."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value) or ".." in value:
        raise InputError(400, f"invalid {what} id {value[:80]!r}: use a datastore id (letters, digits, '.', '_', '-'), not a path")
    return value


def parse_json_object(text: str | None, limits: Limits, what: str = "params") -> dict:
    if text is None or text == "":
        return {}
    if len(text.encode("utf-8", "ignore")) > limits.max_params_bytes:
        raise InputError(413, f"{what} is larger than {limits.max_params_bytes} bytes")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(400, f"{what} is not valid JSON: {e.msg} at position {e.pos}")
    except RecursionError:
        raise InputError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(value, dict):
        raise InputError(400, f"{what} must be a JSON object, got {type(value).__name__}")
    _check_json_value(value, what)
    return value


def _check_json_value(value, what: str) -> None:
    """Refuse what later layers cannot handle: deep nesting (recursive copies, pydantic) and lone
    surrogates such as "\\udfff" (JSON allows them; UTF-8 responses and log lines do not)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InputError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in children:
            for text in (key, child):
                if isinstance(text, str) and SURROGATE.search(text):
                    raise InputError(400, f"{what} contains a lone UTF-16 surrogate (e.g. \\udfff): send valid Unicode text")
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_infer_params(params: dict, limits: Limits, model_options: dict | None = None) -> dict:
    """Keep only whitelisted params with valid values; anything else is a 400 naming the key."""
    model_options = {k: v for k, v in (model_options or {}).items() if k not in RESERVED_PARAMS}
    out = {}
    for key, value in params.items():
        if key == "question":
            if not isinstance(value, str) or not value.strip():
                raise InputError(400, "question must be a non-empty string")
            if len(value) > limits.max_question_chars:
                raise InputError(413, f"question has {len(value)} characters; the limit is {limits.max_question_chars}")
            if "\x00" in value:
                raise InputError(400, "question contains a NUL character")
        elif key == "slice":
            if value not in (None, "all") and (not _is_int(value) or value < 0):
                raise InputError(400, "slice must be a non-negative integer (index along the acquisition axis) or \"all\"")
        elif key == "modality":
            if value is not None and value not in MODALITIES:
                raise InputError(400, f"modality must be one of {', '.join(MODALITIES)}")
        elif key == "window":
            if value is not None and not (
                isinstance(value, list) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and value[1] > 0
            ):
                raise InputError(400, "window must be [level, width] in HU with width > 0, e.g. [40, 400]")
        elif key == "max_new_tokens":
            if not _is_int(value) or not 1 <= value <= limits.max_new_tokens:
                raise InputError(400, f"max_new_tokens must be an integer in 1..{limits.max_new_tokens}")
        elif key == "rvls2m":  # on / off / null = as the model was trained
            if value is not None and not isinstance(value, bool):
                raise InputError(400, "rvls2m must be true, false or null")
        elif key in ("tts", "result_compress", "do_sample"):
            if not isinstance(value, bool):
                raise InputError(400, f"{key} must be true or false")
        elif key == "result_extension":
            if value not in RESULT_EXTENSIONS:
                raise InputError(400, f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}")
        elif key == "result_dtype":
            if value not in RESULT_DTYPES:
                raise InputError(400, f"result_dtype must be one of {', '.join(RESULT_DTYPES)}")
        elif key == "client_id":
            if value is not None and (not isinstance(value, str) or len(value) > 128):  # the stock client sends null
                raise InputError(400, "client_id must be null or a string of at most 128 characters")
        elif key in model_options:
            _check_like(key, value, model_options[key])
        else:
            allowed = sorted({*BASE_PARAMS, *model_options})
            raise InputError(400, f"param {key[:60]!r} is not accepted; allowed: {', '.join(allowed)}")
        out[key] = value
    return out


def _check_like(key, value, default):
    """A model option must have the type of its default (or be one of the listed choices)."""
    if isinstance(default, (list, tuple)):
        if value not in default:
            raise InputError(400, f"{key} must be one of {list(default)[:20]}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(400, f"{key} must be true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(400, f"{key} must be a number")
        if _is_int(default) and not _is_int(value):
            raise InputError(400, f"{key} must be an integer")
    elif isinstance(default, str):
        if not isinstance(value, str) or len(value) > 2000:
            raise InputError(400, f"{key} must be a string of at most 2000 characters")
    else:
        raise InputError(400, f"{key} cannot be set by clients")
