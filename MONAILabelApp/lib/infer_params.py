"""The infer request parameters a client may set: one schema, read by the app and by the serving layer.

`PARAMS` names every parameter with its default and its reader (client value -> typed value, or an
`InputError` whose message says what to send instead). `parse` (the infer task, also under a stock
`monailabel start_server`) and `server.validation.check_infer_params` (serve.py, before the request
reaches MONAI Label) both read it, so both layers accept and refuse the same values. MONAI Label adds
its own keys to a request (model, image, device, label_tag, ...); `parse` ignores those.

Readers accept what JSON clients and MONAI Label's own clients send: booleans also as "true"/"on"/"1"
and "false"/"off"/"0", integers also as digit strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from raddiagseg import templates
from raddiagseg.data.records import MODALITIES
from raddiagseg.imaging import InputError  # one error type for the model view, the params and the server

__all__ = ["InputError", "InferParams", "PARAMS", "DEFAULTS", "parse", "MODALITIES", "RESULT_EXTENSIONS",
           "MAX_NEW_TOKENS", "MAX_QUESTION_CHARS", "MAX_TTS", "MAX_VOXELS"]

MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS = 512
MAX_TTS = 16
MAX_VOXELS = 512 * 512 * 1024  # 256 Mi voxels (e.g. 512 x 512 x 1024): images and uploads above it are refused
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".png")
COT_INSTRUCTION = templates.COT_QUESTION[len(templates.DEFAULT_QUESTION):]  # "\nReason step by step ..."
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
DEFAULT_WORDS = ("", "default", "auto", "none")  # an optional boolean: the model decides


Reader = Callable[[Any], Any]


def _integer(key: str, low: int, high: int) -> Reader:
    def read(value):
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise InputError(f"{key} must be an integer between {low} and {high}")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise InputError(f"{key} must be an integer between {low} and {high}, got {value!r}") from None
        if not low <= number <= high:
            raise InputError(f"{key} must be between {low} and {high}, got {number}")
        return number
    return read


def _boolean(key: str) -> Reader:
    def read(value):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise InputError(f"{key} must be true or false (or on/off), got {value!r}")
    return read


def _optional_boolean(key: str) -> Reader:
    """None (the model decides) for absent, empty or "default"; else a boolean."""
    boolean = _boolean(key)

    def read(value):
        if value is None or (isinstance(value, str) and value.strip().lower() in DEFAULT_WORDS):
            return None
        return boolean(value)
    return read


def _choice(key: str, choices: tuple, optional: bool = False) -> Reader:
    def read(value):
        if optional and value in (None, ""):
            return None
        if value not in choices:
            raise InputError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value
    return read


def _question(value):
    if not isinstance(value, str):
        raise InputError("question must be text")
    if not value.strip():
        raise InputError("question must be a non-empty string")
    if len(value) > MAX_QUESTION_CHARS:
        raise InputError(f"question is too long ({len(value)} characters, at most {MAX_QUESTION_CHARS})")
    if "\x00" in value:
        raise InputError("question contains a NUL character")
    return value


def _slice(value):
    """An index along the file's through-plane axis; None (absent, "" or "all") asks about the whole volume."""
    if value in (None, "", "all"):
        return None
    return _integer("slice", 0, 100000)(value)


def _window(value):
    if value in (None, "", []):
        return None
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) for v in value):
        raise InputError("window must be [level, width] in HU, e.g. [40, 400]")
    try:
        level, width = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError("window must be [level, width] in HU, e.g. [40, 400]") from None
    if not (math.isfinite(level) and math.isfinite(width)):
        raise InputError("window must be [level, width] in HU, e.g. [40, 400]")
    if width <= 0:
        raise InputError("window width must be positive")
    return level, width


def _temperature(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a number, got {value!r}") from None
    if isinstance(value, bool) or not 0.05 <= number <= 5.0:
        raise InputError(f"temperature must be between 0.05 and 5, got {value!r}")
    return number


@dataclass(frozen=True)
class Param:
    default: Any
    read: Reader


PARAMS: dict[str, Param] = {
    "question": Param(templates.DEFAULT_QUESTION, _question),
    "slice": Param(None, _slice),
    "modality": Param(None, _choice("modality", MODALITIES, optional=True)),
    "window": Param(None, _window),
    "max_new_tokens": Param(96, _integer("max_new_tokens", 1, MAX_NEW_TOKENS)),
    "do_sample": Param(False, _boolean("do_sample")),
    "temperature": Param(1.0, _temperature),
    "batch_size": Param(8, _integer("batch_size", 1, 64)),
    "result_extension": Param(".nii.gz", _choice("result_extension", RESULT_EXTENSIONS)),
    "tts": Param(False, _boolean("tts")),
    "tts_answers": Param(4, _integer("tts_answers", 1, MAX_TTS)),
    "tts_masks": Param(4, _integer("tts_masks", 1, MAX_TTS)),
    "rvls2m": Param(None, _optional_boolean("rvls2m")),
    "cot": Param(False, _boolean("cot")),
    "skip_slices": Param(True, _boolean("skip_slices")),
    "force": Param(False, _boolean("force")),  # answer even outside the model's domain (the answer stays flagged)
}
# the infer task's config: what MONAI Label shows a client and merges into every request
DEFAULTS = {key: p.default for key, p in PARAMS.items() if key not in ("slice", "modality", "window")}


@dataclass
class InferParams:
    question: str
    slice: int | None
    modality: str | None
    window: tuple[float, float] | None
    max_new_tokens: int
    do_sample: bool
    temperature: float
    batch_size: int
    result_extension: str
    tts: bool = False  # test-time scaling: majority of sampled answers, consensus of perturbed masks
    tts_answers: int = 4  # m: answers (greedy + m-1 sampled)
    tts_masks: int = 4  # n: perturbed prompts per answer and seg token
    rvls2m: bool | None = None  # RVLS2M region prompts: None = as the model was trained, True/False overrides
    cot: bool = False  # ask for chain-of-thought reasoning before the answer (the conclusion is parsed)
    skip_slices: bool = True  # whole volume: skip slices that cannot change a finding (raddiagseg.findings)
    force: bool = False  # answer an image the domain guard flags as outside the model's domain (still flagged)

    def generation_options(self) -> dict:
        options = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature}
        if self.rvls2m is not None:
            options["rvls2m"] = self.rvls2m
        return options

    def tts_options(self) -> dict | None:
        """generate_tts settings when test-time scaling is on, else None."""
        if not self.tts:
            return None
        options = {"num_answers": self.tts_answers, "num_masks": self.tts_masks}
        if self.rvls2m is not None:
            options["rvls2m"] = self.rvls2m
        return options

    def model_question(self) -> str:
        """The question sent to the model: with `cot`, the CoT question (or the user's plus the reasoning instruction)."""
        if not self.cot:
            return self.question
        if self.question == templates.DEFAULT_QUESTION:
            return templates.COT_QUESTION
        return self.question.rstrip() + COT_INSTRUCTION


def read_param(key: str, value: Any) -> Any:
    """One client value of a schema parameter, typed; absent (None) is the parameter's default."""
    param = PARAMS[key]
    return param.default if value is None else param.read(value)


def parse(request: dict) -> InferParams:
    """InferParams from a MONAI Label infer request (its `params` already merged in)."""
    return InferParams(**{key: read_param(key, request.get(key)) for key in PARAMS})
