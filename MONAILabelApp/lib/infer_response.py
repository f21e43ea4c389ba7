"""The infer response (the `params` part of the reply, or the whole reply with `output=json`) as types.

MONAILabelApp/README.md ("Response JSON") describes each key; tests/test_app_server.py checks live replies
against these declarations. The request side is `lib.infer_params.InferParams`.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Segment(TypedDict):
    name: str  # canonical vocabulary name
    role: str  # organ | abnormality | unknown
    label_value: int  # 1..N, the value in the label file
    color: list[int]  # RGB 0..255
    terminology: dict[str, Any] | None  # {category, type, slicer}; None for a name outside the vocabulary


class Modality(TypedDict):
    value: str  # ct | xray | mri: how the image was read
    source: str  # param | dicom | intensities: why (lib.domain_guard.modality_of)


class DomainVerdict(TypedDict):
    in_domain: bool | None  # None: the model folder has no domain statistics
    score: float | None
    threshold: float | None
    reason: str  # one sentence for the user; whole volumes add slices_in_domain, slices_checked


class InferResponse(TypedDict):
    answer: str
    detection: bool | None
    diagnosis: str | None
    question: str
    options: dict[str, Any]  # {"tts": settings or None, "rvls2m": None/True/False, "cot": bool}
    modality: Modality
    domain: DomainVerdict
    segments: list[Segment]
    label_names: dict[str, int]
    slices: list[dict[str, Any]]  # per answered slice: slice, answer, detection, diagnosis, segments, ...
    volume: dict[str, Any] | None  # whole-volume summary, None for a 2D image or one slice
    findings: list[dict[str, Any]]  # whole volume: 3D findings (raddiagseg.findings)
    agreement: dict[str, Any] | None  # with tts, for a 2D image or one slice
    reasoning: str | None  # with cot, for a 2D image or one slice
    model: dict[str, Any]  # {"name", "trained_on", "clinical_use", "notice", "version"} (raddiagseg.domain.model_identity)
    feature_cache: dict[str, int]
    image_cache: dict[str, int]
    latencies: dict[str, Any]  # seconds per stage; model_stages inside the model
