"""RadDiagLib: everything the RadDiag Slicer module does that does not need Slicer.

Network calls to the RadDiag MONAI Label server, parsing of its answers, segment specs,
label-map reading, label info for corrections, consent and background jobs. Nothing here
imports slicer, qt, ctk or vtk, so it runs (and is tested) in a plain Python 3.9+.
"""

from .constants import DEFAULT_MODEL, DEFAULT_QUESTION, DEFAULT_SERVER_URL
from .client import RadDiagClient, InferResult, ServerError
from .segments import SegmentSpec, segment_specs, export_order
from .labelinfo import build_label_info
from .jobs import BackgroundJob
from .consent import UploadConsent, DictSettings
from .answer import answer_html, domain_warning, modality_line, model_notice
from .findings import FINDING_COLUMNS, FindingRow, finding_rows
from .options import RVLS2M_CHOICES, infer_options
from .history import UrlHistory
from .training import TrainingProgress, gate_report, training_progress
from .workflow import DiagnosisResult, diagnose, image_id_for, retrain, submit_correction

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_QUESTION", "DEFAULT_SERVER_URL",
    "RadDiagClient", "InferResult", "ServerError",
    "SegmentSpec", "segment_specs", "export_order", "build_label_info",
    "BackgroundJob", "UploadConsent", "DictSettings", "answer_html", "domain_warning", "modality_line", "model_notice",
    "FINDING_COLUMNS", "FindingRow", "finding_rows", "UrlHistory", "RVLS2M_CHOICES", "infer_options",
    "TrainingProgress", "gate_report", "training_progress",
    "DiagnosisResult", "diagnose", "image_id_for", "retrain", "submit_correction",
]
