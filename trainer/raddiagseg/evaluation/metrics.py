"""The benchmark's metric formulas, on plain numbers and numpy masks (paper 001 appendix, paper 003, MultiMedEval VQA).

Kept free of I/O so each formula can be checked by hand in the tests.
"""

import re
import string

import numpy as np

OPEN_ACCURACY_RECALL = 0.75  # an open VQA answer counts as correct when it recalls >= 75 % of the GT tokens (MultiMedEval)


def binary_counts(y_true, y_pred):
    """(tp, fp, fn, tn) with positive = True."""
    y_true, y_pred = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp = int(np.sum(y_true & y_pred))
    fp = int(np.sum(~y_true & y_pred))
    fn = int(np.sum(y_true & ~y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    return tp, fp, fn, tn


def precision_recall_f1(y_true, y_pred):
    """Binary precision, recall and F1 (positive = True); 0.0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    tp, fp, fn, _ = binary_counts(y_true, y_pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def correctness_f1(correct):
    """Paper 001's diagnosis F1: the F1 of the correctness vector c against a vector of ones."""
    return precision_recall_f1(np.ones(len(correct), bool), np.asarray(correct, bool))[2]


def overlap(pred, gt):
    """(|P ∩ G|, |P|, |G|) of two same-shape binary masks."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, ground truth {gt.shape}")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred)), int(np.count_nonzero(gt))


def dice_from_overlap(intersection, n_pred, n_gt):
    """2|P∩G| / (|P| + |G|); two empty masks agree perfectly (1.0)."""
    return 1.0 if n_pred + n_gt == 0 else 2.0 * intersection / (n_pred + n_gt)


def iou_from_overlap(intersection, n_pred, n_gt):
    """|P∩G| / |P∪G|; two empty masks agree perfectly (1.0), as LISA's gIoU counts them."""
    union = n_pred + n_gt - intersection
    return 1.0 if union == 0 else intersection / union


def dice(pred, gt):
    return dice_from_overlap(*overlap(pred, gt))


def giou_ciou(overlaps):
    """Paper 003 / LISA: gIoU = mean per-mask IoU, cIoU = Σ intersections / Σ unions. `overlaps`: [(I, |P|, |G|)]."""
    if not overlaps:
        return None, None
    ious = [iou_from_overlap(*o) for o in overlaps]
    inter = sum(o[0] for o in overlaps)
    union = sum(o[1] + o[2] - o[0] for o in overlaps)
    return float(np.mean(ious)), (inter / union if union else 1.0)


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def answer_tokens(text):
    """The set of lower-case words of a VQA answer, punctuation removed (MultiMedEval's tokenisation)."""
    return set(_PUNCTUATION.sub(" ", (text or "").lower()).split())


def token_recall_f1(pred, gt):
    """(recall, F1) of the predicted answer's words against the GT answer's words."""
    pred_tokens, gt_tokens = answer_tokens(pred), answer_tokens(gt)
    common = len(pred_tokens & gt_tokens)
    recall = common / len(gt_tokens) if gt_tokens else 0.0
    precision = common / len(pred_tokens) if pred_tokens else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return recall, f1


def mean(values):
    """Mean of a list, None for an empty one (so reports show '–' rather than a fake 0)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
