"""RadDiagSeg-D benchmark: scoring predictions (`score`), running a model (`predict`), reports, `evaluate_model`."""

from raddiagseg.evaluation.predict import evaluate_model, predict
from raddiagseg.evaluation.scoring import score

__all__ = ["evaluate_model", "predict", "score"]
