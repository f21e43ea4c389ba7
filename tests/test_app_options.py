"""Issue 10 options in the app without a server: infer params (tts m x n, rvls2m, cot), the question the model
gets, the reasoning in the response, and the `uncertain` strategy scoring by test-time-scaling disagreement."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from raddiagseg import templates

from lib import infer_params, response
from lib.image_io import InputError


def test_defaults_leave_the_model_as_trained():
    params = infer_params.parse({})
    assert params.tts_options() is None and params.rvls2m is None and not params.cot
    assert "rvls2m" not in params.generation_options() and params.model_question() == templates.DEFAULT_QUESTION


def test_options_parse_and_reach_the_generate_calls():
    params = infer_params.parse({"tts": "true", "tts_answers": "3", "tts_masks": 2, "rvls2m": "off", "cot": "1"})
    assert params.tts_options() == {"num_answers": 3, "num_masks": 2, "rvls2m": False}
    assert params.generation_options()["rvls2m"] is False
    assert params.model_question() == templates.COT_QUESTION
    custom = infer_params.parse({"question": "Is the liver abnormal?", "cot": True, "rvls2m": "default"})
    assert custom.rvls2m is None
    assert custom.model_question().startswith("Is the liver abnormal?") and custom.model_question().endswith("before the answer.")
    for bad in ({"tts_answers": 0}, {"tts_masks": 17}, {"rvls2m": "perhaps"}, {"cot": "x"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            infer_params.parse(bad)


def test_response_reads_the_conclusion_and_keeps_the_reasoning():
    answer = templates.vqaseg_cot_answer(True, "ct", "Liver tumour", ["liver", "liver tumour"])
    masks = [np.eye(4, dtype=bool), np.zeros((4, 4), bool)]
    result = SimpleNamespace(answer=answer, agreement={}, segments=[
        SimpleNamespace(label="liver", token="<seg000>", mask=masks[0], score=0.9),
        SimpleNamespace(label="liver tumour", token="<seg001>", mask=masks[1], score=0.0)])
    summary, named = response.slice_summary(result)
    assert summary["detection"] is True and summary["diagnosis"] == "Liver tumour"
    assert summary["reasoning"].startswith("Modality: CT scan.") and "Conclusion" not in summary["reasoning"]
    assert [n for n, _, _ in named] == ["liver", "liver tumour"]


def test_uncertain_tts_method_scores_by_reported_disagreement():
    from lib.activelearning.uncertain import Uncertain

    calls = []

    class Runner:
        def answer(self, images, questions, options, batch_size=8, show_progress=False, tts=False):
            calls.append(tts)
            return [SimpleNamespace(agreement={"uncertainty": u}) for u in (0.2, 0.6)[: len(images)]], {}

    strategy = Uncertain(store=None, runner=Runner(), n_samples=5, method="tts", tts_masks=2)
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (3, 8, 8)).astype(np.int16))
    path = Path(__file__).parent / "_tmp_uncertain.nii.gz"
    sitk.WriteImage(image, str(path))
    try:
        score = strategy.score(str(path))
    finally:
        path.unlink()
    assert calls == [{"num_answers": 5, "num_masks": 2}] and score == pytest.approx(0.4)
    with pytest.raises(ValueError, match="method"):
        Uncertain(None, None, method="entropy")
