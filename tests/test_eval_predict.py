"""`raddiagseg predict` and `evaluate_model`: batching, files written, resume after a crash, amputated questions.

The plumbing is tested with a small stand-in that implements the model API of docs/INTERFACES.md
(`encode_images`, `generate_batch`) so every call can be checked; the last tests run the real,
randomly initialised demo model when it is available.
"""

import json
import types

import nibabel
import numpy as np
import pytest
from PIL import Image

from raddiagseg import templates
from raddiagseg.cli import main
from raddiagseg.data.io import VIEW_SLICE_AFFINE
from raddiagseg.evaluation import evaluate_model, predict
from raddiagseg.evaluation.predictions import AMPUTATED_QUESTIONS

SIZE = (12, 10)  # rows, cols: not square, so a transposed mask would be caught


class StandInModel:
    """Answers every 3-step question positively with one 'liver' mask = image > 0.5; records its calls."""

    def __init__(self):
        self.calls, self.training = [], False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def encode_images(self, images):
        self.calls.append(("encode", len(images)))
        return [np.asarray(i).copy() for i in images]

    def generate_batch(self, images, questions, features=None, max_new_tokens=128, **_):
        assert features is not None and len(features) == len(images) == len(questions)
        self.calls.append(("generate", tuple(questions)))
        results = []
        for image, question in zip(images, questions):
            mask = np.asarray(image) > 0.5
            if question == AMPUTATED_QUESTIONS["detection"]:
                answer, segments = "Yes.", []
            elif question == AMPUTATED_QUESTIONS["diagnosis"]:
                answer, segments = "Liver tumour", []
            elif question.startswith("Please segment"):
                answer = templates.refseg_answer("liver")
                segments = [types.SimpleNamespace(label="liver", token="<seg000>", mask=mask, score=1.0)]
            elif question == "Is this a CT?":
                answer, segments = "yes", []
            else:
                answer = "1. Yes\n2. Liver tumour\n3. Segmentation mask:\n- liver <seg000>"
                segments = [types.SimpleNamespace(label="liver", token="<seg000>", mask=mask, score=1.0)]
            results.append(types.SimpleNamespace(answer=answer, segments=segments, latencies={}))
        return results


@pytest.fixture()
def manifest(tmp_path):
    """Five test rows (3 vqaseg CT, 1 refseg, 1 vqa) and one train row; liver = right half of the slice."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    liver = np.zeros(SIZE, np.uint8)
    liver[:, SIZE[1] // 2 :] = 1
    image = np.where(liver > 0, 60.0, -100.0).astype(np.float32)  # HU: liver bright in the [40, 400] window
    affine = VIEW_SLICE_AFFINE  # as the builder stores slices: the array is what the model sees
    nibabel.save(nibabel.Nifti1Image(image, affine), str(data / "images/ct.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(liver, affine), str(data / "masks/liver.nii.gz"))
    Image.fromarray((liver * 200).astype(np.uint8)).save(data / "images/vqa.png")
    liver_target = {"name": "liver", "role": "organ", "mask": "masks/liver.nii.gz"}
    rows = []
    for i in range(3):
        rows.append({"id": f"case/{i}", "task": "vqaseg", "modality": "ct", "split": "test", "image": "images/ct.nii.gz",
                     "window": [40, 400], "question": templates.DEFAULT_QUESTION, "detection": True,
                     "diagnosis": "Liver tumour", "targets": [liver_target]})
    rows.append({"id": "ref", "task": "refseg", "modality": "ct", "split": "test", "image": "images/ct.nii.gz",
                 "question": templates.refseg_question("liver", "ct"), "targets": [liver_target]})
    rows.append({"id": "vqa", "task": "vqa", "modality": "ct", "split": "test", "image": "images/vqa.png",
                 "question": "Is this a CT?", "answer": "yes", "answer_type": "closed", "targets": []})
    rows.append({"id": "train0", "task": "vqa", "modality": "ct", "split": "train", "image": "images/vqa.png",
                 "question": "Is this a CT?", "answer": "yes", "targets": []})
    path = data / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_writes_batched_predictions_and_masks(manifest, tmp_path):
    model, out = StandInModel(), tmp_path / "run" / "pred.jsonl"
    written, skipped = predict(model, manifest, out, split="test", batch_size=2, progress=False)
    assert (written, skipped) == (5, 0)
    lines = read_lines(out)
    assert [r["id"] for r in lines] == ["case/0", "case/1", "case/2", "ref", "vqa"]  # train row left out
    assert max(n for kind, n in model.calls if kind == "encode") == 2
    first = lines[0]
    assert first["answer"].startswith("1. Yes") and set(first["masks"]) == {"<seg000>"}
    mask = np.asarray(Image.open(out.parent / first["masks"]["<seg000>"])) > 0
    assert mask.shape == SIZE and mask[:, -1].all() and not mask[:, 0].any()
    assert lines[4]["answer"] == "yes" and lines[4]["masks"] == {}
    # the standard file scores: every 3-step sample right, liver masks exact
    assert main(["score", "--pred", str(out), "--data", str(manifest), "--split", "test"]) == 0
    report = json.loads((out.parent / "report.json").read_text())["overall"]
    assert report["detection_f1"] == 1.0 and report["diagnosis_acc"] == 1.0
    assert report["dice_org"] == pytest.approx(1.0) and report["refseg_dice"] == pytest.approx(1.0)
    assert report["vqa_closed_acc"] == 1.0


def test_predict_resumes_after_an_interrupted_run(manifest, tmp_path):
    out = tmp_path / "run" / "pred.jsonl"
    predict(StandInModel(), manifest, out, split="test", batch_size=4, progress=False)
    complete = out.read_text().splitlines(keepends=True)
    out.write_text("".join(complete[:2]) + complete[2][:25])  # killed while writing the third line
    model = StandInModel()
    written, skipped = predict(model, manifest, out, split="test", batch_size=4, progress=False)
    assert (written, skipped) == (3, 2)
    ids = [r["id"] for r in read_lines(out)]
    assert ids == ["case/0", "case/1", "case/2", "ref", "vqa"]
    assert sum(n for kind, n in model.calls if kind == "encode") == 3
    # nothing left to do: the model is not even loaded
    assert predict("/no/such/model", manifest, out, split="test", progress=False) == (0, 5)


def test_predict_amputated_asks_three_questions(manifest, tmp_path):
    model, out = StandInModel(), tmp_path / "amp" / "pred.jsonl"
    predict(model, manifest, out, split="test", batch_size=8, amputated=True, progress=False)
    lines = {r["id"]: r for r in read_lines(out)}
    assert set(lines["case/0"]["answers"]) == {"detection", "diagnosis", "segmentation"}
    assert "answer" not in lines["case/0"] and "<seg000>" in lines["case/0"]["masks"]
    assert lines["ref"]["answer"].startswith("Here is the mask") and lines["vqa"]["answer"] == "yes"
    asked = {q for kind, qs in model.calls if kind == "generate" for q in qs}
    assert set(AMPUTATED_QUESTIONS.values()) <= asked and templates.DEFAULT_QUESTION not in asked
    with pytest.raises(ValueError, match="already holds amputated predictions"):  # formats are never mixed in one file
        predict(StandInModel(), manifest, out, split="test", progress=False)
    assert main(["score", "--pred", str(out), "--data", str(manifest), "--amputated"]) == 0
    report = json.loads((out.parent / "report.json").read_text())["ct"]
    assert report["detection_f1"] == 1.0 and report["diagnosis_f1"] == 1.0 and report["dice_org"] == pytest.approx(1.0)


def test_evaluate_model_in_memory_and_subset(manifest):
    model = StandInModel()
    model.training = True
    report = evaluate_model(model, manifest, split="test", batch_size=3)
    assert report["overall"]["n"] == 3 and report["overall"]["dice_org"] == pytest.approx(1.0)
    assert model.training is True  # restored after evaluation
    small = evaluate_model(StandInModel(), manifest, split="test", max_samples=2)
    assert small["overall"]["n"] + small["overall"]["n_refseg"] + small["overall"]["n_vqa"] == 2


def test_predict_cli_errors(manifest, tmp_path, capsys):
    rc = main(["predict", "--model", str(tmp_path / "nothing"), "--data", str(manifest), "--out", str(tmp_path / "p.jsonl")])
    assert rc == 2 and "not a model checkpoint folder" in capsys.readouterr().err
    rc = main(["predict", "--model", str(tmp_path), "--data", str(manifest), "--out", str(tmp_path / "p.jsonl"),
               "--split", "nosuchsplit"])
    assert rc == 2 and "no rows to predict" in capsys.readouterr().err


def _demo_model_available():
    try:
        from raddiagseg import build_model

        build_model("demo")
        return True
    except Exception:  # the model package is not there (yet) in this checkout
        return False


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    if not _demo_model_available():
        pytest.skip("raddiagseg.model demo preset not available")
    import torch

    from raddiagseg import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo_ckpt")
    build_model("demo").save_pretrained(path)
    return path


def test_predict_with_the_demo_model(demo_checkpoint, manifest, tmp_path):
    out = tmp_path / "demo" / "pred.jsonl"
    args = ["predict", "--model", str(demo_checkpoint), "--data", str(manifest), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "24"]
    assert main(args) == 0
    lines = read_lines(out)
    assert [r["id"] for r in lines] == ["case/0", "case/1", "case/2", "ref", "vqa"]
    for record in lines:
        assert isinstance(record["answer"], str)
        for rel in record["masks"].values():
            assert (np.asarray(Image.open(out.parent / rel)).shape) == SIZE
    assert main(args) == 0 and len(read_lines(out)) == 5  # resumed: nothing added
    assert main(["score", "--pred", str(out), "--data", str(manifest)]) == 0
    report = json.loads((out.parent / "report.json").read_text())
    assert report["overall"]["n"] == 3 and report["overall"]["n_missing"] == 0  # the train row is not in the split
