"""Metric formulas checked by hand and against MONAI's Dice."""

import numpy as np
import pytest

from raddiagseg.evaluation import metrics
from raddiagseg.evaluation.scoring import diagnosis_named


def test_binary_f1_by_hand():
    # TP 2, FP 1, FN 1 -> P = R = F1 = 2/3
    p, r, f1 = metrics.precision_recall_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert (p, r, f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert metrics.precision_recall_f1([0, 0], [0, 0]) == (0.0, 0.0, 0.0)


def test_diagnosis_f1_against_ones():
    # c = [1, 0, 1, 1]: precision 1, recall 3/4, F1 = 6/7
    assert metrics.correctness_f1([1, 0, 1, 1]) == pytest.approx(6 / 7)
    assert metrics.correctness_f1([0, 0]) == 0.0


def test_dice_matches_monai():
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    pred, gt = rng.random((2, 32, 32)) > 0.6
    ours = metrics.dice(pred, gt)
    theirs = compute_dice(torch.tensor(pred)[None, None].float(), torch.tensor(gt)[None, None].float(), include_background=True)
    assert ours == pytest.approx(float(theirs))
    assert metrics.dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert metrics.dice(np.zeros((4, 4)), np.ones((4, 4))) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice(np.zeros((4, 4)), np.zeros((4, 5)))


def test_giou_ciou_by_hand():
    # IoUs 1/2 and 0; cIoU = (4 + 0) / (8 + 8)
    giou, ciou = metrics.giou_ciou([(4, 4, 8), (0, 4, 4)])
    assert giou == pytest.approx(0.25) and ciou == pytest.approx(0.25)
    assert metrics.giou_ciou([]) == (None, None)


def test_vqa_token_recall_and_f1():
    recall, f1 = metrics.token_recall_f1("The LEFT lung.", "left lung")
    assert recall == 1.0 and f1 == pytest.approx(0.8)
    assert metrics.token_recall_f1("", "liver") == (0.0, 0.0)


@pytest.mark.parametrize(
    "gt, text, synonyms, expected",
    [
        ("Liver tumour", "liver tumour", True, True),
        ("Liver tumour", "there are LIVER TUMOURS", False, True),  # the paper's substring rule
        ("Liver tumour", "hepatic tumour", True, True),
        ("Liver tumour", "hepatic tumour", False, False),
        ("COVID-19 infection", "non-covid infection", True, False),  # synonym inside another diagnosis' name
        ("COVID-19 infection", "covid infection", True, True),
        ("Non-COVID infection", "COVID-19 infection", True, False),
        ("Liver tumour", None, True, False),
    ],
)
def test_diagnosis_named(gt, text, synonyms, expected):
    assert diagnosis_named(gt, text, synonyms)[0] is expected


def test_closed_vqa_correctness():
    from raddiagseg.evaluation.scoring import score_vqa

    def closed(gt, pred):
        return score_vqa({"id": "q", "task": "vqa", "answer": gt, "answer_type": "closed"}, {"answer": pred})["closed_correct"]

    assert closed("yes", "Yes, it is.") and not closed("yes", "No.") and not closed("no", "maybe")
    assert closed("No", "no") and closed("left", "The left side") and not closed("left", "right")
