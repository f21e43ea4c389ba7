"""The infer request parameters a client may set, validated; nothing else reaches the model.

MONAI Label adds its own keys to a request (model, image, device, label_tag, …); those are
ignored here. Every accepted key is checked for type and range and a bad value is an
`InputError` whose message says what to send instead.
"""

from dataclasses import dataclass

from raddiagseg import templates

from lib.image_io import InputError, label_extension

MAX_QUESTION_CHARS = 2000
MODALITIES = ("ct", "xray", "mri")

DEFAULTS = {
    "question": templates.DEFAULT_QUESTION,
    "max_new_tokens": 96,
    "do_sample": False,
    "temperature": 1.0,
    "batch_size": 8,
    "result_extension": ".nii.gz",
    "tts": False,
    "tts_answers": 4,
    "tts_masks": 4,
    "rvls2m": None,
    "cot": False,
    "skip_slices": True,
    "force": False,
}
MAX_TTS = 16
COT_INSTRUCTION = templates.COT_QUESTION[len(templates.DEFAULT_QUESTION):]  # "\nReason step by step ..."


@dataclass
class InferParams:
    question: str
    slice: int | None
    modality: str | None
    window: tuple | None
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

    def generation_options(self):
        options = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature}
        if self.rvls2m is not None:
            options["rvls2m"] = self.rvls2m
        return options

    def tts_options(self):
        """generate_tts settings when test-time scaling is on, else None."""
        if not self.tts:
            return None
        options = {"num_answers": self.tts_answers, "num_masks": self.tts_masks}
        if self.rvls2m is not None:
            options["rvls2m"] = self.rvls2m
        return options

    def model_question(self):
        """The question sent to the model: with `cot`, the CoT question (or the user's plus the reasoning instruction)."""
        if not self.cot:
            return self.question
        if self.question == templates.DEFAULT_QUESTION:
            return templates.COT_QUESTION
        return self.question.rstrip() + COT_INSTRUCTION


def _int(request, key, low, high, default):
    value = request.get(key, default)
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise InputError(f"{key} must be an integer between {low} and {high}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InputError(f"{key} must be an integer between {low} and {high}, got {value!r}") from None
    if not low <= number <= high:
        raise InputError(f"{key} must be between {low} and {high}, got {number}")
    return number


def _bool(request, key, default):
    value = request.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise InputError(f"{key} must be true or false, got {value!r}")


def _optional_bool(request, key):
    """None when absent, empty or "default" (the model decides), else a boolean."""
    value = request.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default", "auto", "none")):
        return None
    return _bool(request, key, None)


def parse(request):
    """InferParams from a MONAI Label infer request (its `params` already merged in)."""
    question = request.get("question") or DEFAULTS["question"]
    if not isinstance(question, str):
        raise InputError("question must be text")
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"question is too long ({len(question)} characters, at most {MAX_QUESTION_CHARS})")

    slice_index = request.get("slice")
    slice_index = None if slice_index in (None, "", "all") else _int(request, "slice", 0, 100000, None)

    modality = request.get("modality") or None
    if modality is not None and modality not in MODALITIES:
        raise InputError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")

    window = request.get("window") or None
    if window is not None:
        try:
            level, width = (float(v) for v in window)
        except (TypeError, ValueError):
            raise InputError("window must be [level, width] in HU, e.g. [40, 400]") from None
        if width <= 0:
            raise InputError("window width must be positive")
        window = (level, width)

    temperature = request.get("temperature", DEFAULTS["temperature"])
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a number, got {temperature!r}") from None
    if not 0.05 <= temperature <= 5.0:
        raise InputError(f"temperature must be between 0.05 and 5, got {temperature}")

    extension = request.get("result_extension") or DEFAULTS["result_extension"]
    label_extension(extension, is_volume=False) if extension != ".png" else None

    return InferParams(
        question=question,
        slice=slice_index,
        modality=modality,
        window=window,
        max_new_tokens=_int(request, "max_new_tokens", 1, 512, DEFAULTS["max_new_tokens"]),
        do_sample=_bool(request, "do_sample", DEFAULTS["do_sample"]),
        temperature=temperature,
        batch_size=_int(request, "batch_size", 1, 64, DEFAULTS["batch_size"]),
        result_extension=extension,
        tts=_bool(request, "tts", DEFAULTS["tts"]),
        tts_answers=_int(request, "tts_answers", 1, MAX_TTS, DEFAULTS["tts_answers"]),
        tts_masks=_int(request, "tts_masks", 1, MAX_TTS, DEFAULTS["tts_masks"]),
        rvls2m=_optional_bool(request, "rvls2m"),
        cot=_bool(request, "cot", DEFAULTS["cot"]),
        skip_slices=_bool(request, "skip_slices", DEFAULTS["skip_slices"]),
        force=_bool(request, "force", DEFAULTS["force"]),
    )
