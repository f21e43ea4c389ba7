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


def test_uncertain_balanced_picks_from_the_modality_with_fewest_labels(tmp_path):
    """On MONAI Label's own datastore: X-rays disagree more than CT slices, so the plain ranking picks an X-ray
    whatever was labelled; balanced, once an X-ray is labelled and no CT, it picks the most uncertain CT."""
    import SimpleITK as sitk
    from monailabel.datastore.local import LocalDatastore
    from PIL import Image

    from lib.activelearning.uncertain import INFO_KEY, Uncertain

    rng = np.random.default_rng(0)
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("ct_a", "ct_b"):
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(-1000, 1000, (3, 8, 8)).astype(np.int16)),
                        str(studies / f"{name}.nii.gz"))
    for name in ("cxr_a", "cxr_b", "cxr_c"):
        Image.fromarray(rng.integers(0, 255, (16, 16)).astype(np.uint8)).save(studies / f"{name}.png")
    uncertainty = {"ct_a": 0.1, "ct_b": 0.3, "cxr_a": 0.9, "cxr_b": 0.8, "cxr_c": 0.7}

    class Runner:  # the model's disagreement, by image: X-rays (16 px wide) the most uncertain
        def answer(self, images, questions, options, batch_size=8, show_progress=False, tts=False):
            return [SimpleNamespace(agreement={"uncertainty": 0.6 if im.shape[-1] == 16 else 0.2}) for im in images], {}

    class Store:
        def get(self):
            return None, "v1"

    store = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.png"], auto_reload=False)
    for image_id, value in uncertainty.items():  # scores as an earlier call left them (no model run for these)
        modality = "ct" if image_id.startswith("ct") else "xray"
        store.update_image_info(image_id, {INFO_KEY: {"score": value, "model_version": "v1", "modality": modality}})
    label = tmp_path / "label.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(label)
    store.save_label("cxr_a", str(label), "final", {})
    plain = Uncertain(Store(), Runner(), method="tts")
    balanced = Uncertain(Store(), Runner(), method="tts", balance=True)
    assert plain({"strategy": "uncertain"}, store)["id"] == "cxr_b"
    assert balanced({"strategy": "uncertain"}, store) == {"id": "ct_b", "score": 0.3}
    store.save_label("ct_b", str(label), "final", {})  # one of each labelled: the higher score wins again
    assert balanced({"strategy": "uncertain"}, store)["id"] == "cxr_b"
    # an image without a score is scored through the model on the way, its modality read from the file
    store.update_image_info("cxr_c", {INFO_KEY: {}})
    assert balanced({"strategy": "uncertain"}, store)["id"] == "cxr_b"
    info = store.get_image_info("cxr_c")[INFO_KEY]
    assert (info["score"], info["modality"], info["model_version"]) == (pytest.approx(0.6), "xray", "v1")


# (params, accepted?): both layers must give the same answer for each
SHARED_PARAM_TABLE = [
    ({"rvls2m": "on"}, True), ({"rvls2m": "off"}, True), ({"rvls2m": True}, True), ({"rvls2m": "default"}, True),
    ({"max_new_tokens": 512}, True), ({"max_new_tokens": "64"}, True), ({"tts": "true", "tts_answers": 16}, True),
    ({"slice": "all"}, True), ({"slice": 3}, True), ({"window": [40, 400]}, True), ({"modality": "mri"}, True),
    ({"result_extension": ".seg.nrrd"}, True), ({"temperature": 0.7}, True), ({"batch_size": 64}, True),
    ({"force": "on"}, True), ({"force": "maybe"}, False),
    ({"max_new_tokens": 513}, False), ({"max_new_tokens": 1024}, False), ({"max_new_tokens": True}, False),
    ({"rvls2m": "maybe"}, False), ({"modality": "pet"}, False), ({"result_extension": ".exe"}, False),
    ({"window": [40, -1]}, False), ({"window": "40,400"}, False), ({"slice": -1}, False), ({"slice": "abc"}, False),
    ({"question": "   "}, False), ({"question": 42}, False), ({"question": "a\x00b"}, False),
    ({"question": "x" * 2001}, False), ({"temperature": 0}, False), ({"batch_size": 65}, False),
    ({"tts_answers": 17}, False), ({"cot": "often"}, False), ({"do_sample": "maybe"}, False),
]


@pytest.mark.parametrize("params, accepted", SHARED_PARAM_TABLE)
def test_app_and_server_accept_and_refuse_the_same_params(params, accepted):
    """One schema: the infer task's parse and serve.py's check agree, and refuse with the same error type and text."""
    from server.validation import InputError as ServerInputError
    from server.validation import Limits, check_infer_params

    assert ServerInputError is InputError
    errors = []
    for check in (infer_params.parse, lambda p: check_infer_params(p, Limits(), infer_params.DEFAULTS)):
        try:
            check(params)
        except InputError as error:
            errors.append(error)
    if accepted:
        assert errors == []
        return
    assert len(errors) == 2 and all(e.status in (400, 413) for e in errors)
    key = next(iter(params))
    assert all(key in e.message for e in errors), [e.message for e in errors]
    if "question" not in params:
        assert errors[0].message == errors[1].message
