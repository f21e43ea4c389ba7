"""Issue 10 from the command line: `build --reasonseg`, `train --rvls2m --cot` (saved in the model config), and the
options benchmark's RESULTS.md section (replaced, never duplicated, other sections kept)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from raddiagseg.cli import main
from raddiagseg.data.layouts import write_phantoms

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("optcli")
    paths = write_phantoms(root / "src", ct_volumes=3, xrays=9, seed=2, ct_size=64, ct_slices=6, xray_size=64,
                           vqa_images=0, refseg_images=0)
    out = root / "built"
    args = ["build", "--out", str(out), "--msd", *map(str, paths["msd"]), "--covidqu", str(paths["covidqu"]), "--reasonseg"]
    assert main(args) == 0
    return out


def test_build_reasonseg_flag_writes_reasonseg_rows(data):
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    assert any(r["task"] == "reasonseg" for r in rows)
    report = json.loads((data / "build_report.json").read_text())
    assert any(key.startswith("reasonseg/") for key in report["counts"])


def test_train_with_rvls2m_and_cot_saves_the_option_in_the_config(data, tmp_path):
    torch.set_num_threads(1)
    from raddiagseg import build_model, load_model

    torch.manual_seed(0)
    build_model("demo").save_pretrained(tmp_path / "init")
    args = ["train", "--data", str(data), "--stage", "finetune", "--init", str(tmp_path / "init"), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "2", "--val-every", "2", "--val-samples", "2", "--device", "cpu",
            "--ratio", "vqaseg=0.5,reasonseg=0.5", "--rvls2m", "--rvls2m-grid", "4", "--rvls2m-top-k", "3", "--cot"]
    assert main(args) == 0
    model = load_model(tmp_path / "run" / "last")
    assert (model.config.rvls2m.enabled, model.config.rvls2m.grid, model.config.rvls2m.top_k) == (True, 4, 3)
    # settings without the flag are refused, not silently ignored
    assert main(["train", "--data", str(data), "--stage", "finetune", "--out", str(tmp_path / "x"), "--rvls2m-grid", "4"]) != 0
    assert not (tmp_path / "x").exists()


def test_options_benchmark_replaces_its_own_results_section(tmp_path):
    spec = importlib.util.spec_from_file_location("options_bench", ROOT / "benchmarks" / "options.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Serving under load\n\nkeep me\n")
    bench.write_results(results, "first table")
    bench.write_results(results, "second table")
    text = results.read_text()
    assert text.count(bench.SECTION) == 1 and "second table" in text and "first table" not in text
    assert "## Serving under load\n\nkeep me" in text
    bench.write_results(results, "gpu table", bench.SECTION + " (H100)")  # another title: its own section
    text = results.read_text()
    assert "second table" in text and "gpu table" in text and text.count(bench.SECTION) == 2
    report = {"overall": {"dice_org": 0.5, "dice_abn": None, "diagnosis_f1": 1.0, "reasonseg_acc": 0.25}}
    line = bench.table({"plain": {"report": report, "latency_p50": 0.1234}})[-1]
    assert line == "| plain | 0.500 | – | 1.000 | – | – | – | – | – | 0.250 | 0.123 |"
