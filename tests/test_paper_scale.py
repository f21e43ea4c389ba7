"""The paper preset at real scale (issue 25), checked at small sizes: real-format random weight files, the
`raddiagseg train --preset paper` path from them (one process and torchrun x2), frozen bf16 weights, and the GPU
scripts' exit on a machine without a GPU."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HAS_NVIDIA = shutil.which("nvidia-smi") is not None and subprocess.run(
    ["nvidia-smi", "-L"], capture_output=True).returncode == 0


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "trainer"), *filter(None, [os.environ.get("PYTHONPATH")])]))


@pytest.mark.skipif(HAS_NVIDIA, reason="this machine has an NVIDIA GPU: the scripts would measure")
@pytest.mark.parametrize("command", [
    ["bash", "benchmarks/gpu_checks.sh", "{out}"],
    ["bash", "benchmarks/gpu_options.sh", "{out}"],
    [PYTHON, "benchmarks/gpu_checks.py", "--results", "{out}/RESULTS.md"],
])
def test_gpu_scripts_exit_0_in_one_line_without_a_gpu(tmp_path, command):
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run([c.format(out=out) for c in command], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(_env(), CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "nothing measured" in lines[0] and ("no NVIDIA GPU" in lines[0] or "no CUDA GPU" in lines[0])
    assert time.monotonic() - started < 60
    assert not out.exists()  # nothing written, RESULTS.md untouched


def test_streamed_paligemma_folder_loads_through_the_lm_loader_in_the_default_dtype(tmp_path):
    from raddiagseg.model.config import LanguageConfig
    from raddiagseg.model.language_model import gemma2_config
    from raddiagseg.model.tokenizer import special_token_ids
    from raddiagseg.model.weight_files import _random_tensor, paligemma_style_tokenizer, write_paligemma_folder
    from raddiagseg.model.weights import load_gemma2_folder

    tokenizer = paligemma_style_tokenizer()
    ids = special_token_ids(tokenizer, 16)
    assert tokenizer.tokenize("lung <seg127>")[-1] == "<seg127>" and "<image>" in tokenizer.get_vocab()
    lm = LanguageConfig(vocab_size=1536, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32)
    folder = write_paligemma_folder(tmp_path / "pg", lm, tokenizer, shard_bytes=60_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # several shards, as the hub's 3 B folder has
    assert all(k.startswith("language_model.model.") for k in index["weight_map"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "paligemma" and config["text_config"]["hidden_size"] == 64

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = load_gemma2_folder(folder, gemma2_config(lm, 1536, ids))
    finally:
        torch.set_default_dtype(previous)
    down = model.model.layers[2].mlp.down_proj.weight
    assert down.dtype == torch.bfloat16
    assert torch.equal(down, _random_tensor("model.layers.2.mlp.down_proj.weight", tuple(down.shape), torch.bfloat16, 0))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_frozen_bf16_weights_train_fp32_lora_and_seg_rows_under_autocast():
    from raddiagseg import build_model
    from raddiagseg.training.commands import parse_model_options

    from paper_train_step import TINY
    from model_helpers import phantom_sample

    torch.manual_seed(0)
    model = build_model("paper", **parse_model_options(TINY, "paper")).set_frozen_dtype(torch.bfloat16).train()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[n] == torch.float32 for n in trainable)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n not in trainable)
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens_delta" in n for n in trainable)
    assert not any(n.startswith(("vision_backbone.", "clip_encoder.")) for n in trainable)

    batch = model.processor.collate([phantom_sample("liver", size=64)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and int(out["n_masks"]) > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for n, g in grads.items() if "lora_" in n or "projector." in n)
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "trainable_tokens_delta" in n)


@pytest.mark.parametrize("extra, message", [
    (["--frozen-dtype", "bfloat16", "--precision", "fp32"], "needs bf16 autocast"),
    (["--lm-dir", "{tmp}/nowhere"], "--lm-dir {tmp}/nowhere does not exist"),
    (["--model-option", "language.no_such_field=1"], "expected PART.FIELD=VALUE with a field of the paper config"),
])
def test_train_command_refuses_bad_paper_options_in_one_line(tmp_path, extra, message):
    (tmp_path / "manifest.jsonl").touch()
    args = [a.format(tmp=tmp_path) for a in extra]
    result = subprocess.run([PYTHON, "-m", "raddiagseg", "train", "--data", str(tmp_path), "--stage", "finetune",
                             "--preset", "paper", "--out", str(tmp_path / "run"), *args],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(tmp=tmp_path) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_paper_train_step_script_one_and_two_processes_at_a_tiny_size(tmp_path):
    """Real-format files -> `raddiagseg train --preset paper` (1 process, then torchrun x2 with the same effective
    batch) -> the checkpoint reloads and answers -> the large files are gone. DDP replicates LoRA, so both runs end
    with the same trainable weights."""
    work, report_path = tmp_path / "work", tmp_path / "report.json"
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "paper_train_step.py"), "--work", str(work), "--tiny",
                             "--steps", "2", "--nproc", "1,2", "--json", str(report_path)],
                            capture_output=True, text=True, timeout=900, env=_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    one, two = report["runs"]
    for run in (one, two):
        params = run["answer"]["parameters"]
        assert params["vision_backbone"]["trainable"] == params["clip_encoder"]["trainable"] == 0
        assert params["projector"]["trainable"] == params["projector"]["total"] > 0
        assert 0 < params["mask_decoder"]["trainable"] < params["mask_decoder"]["total"]
        assert 0 < params["language_model"]["trainable"] < params["language_model"]["total"] / 2
        assert run["answer"]["tokens"] > 0 and run["peak_rss_gb"] > 0 and len(run["step_s"]) == 2
        assert list(run["answer"]["scripted_segments"]) == ["liver", "liver tumour"]  # seg states -> masks
        assert run["effective_batch"] == 2
    assert one["answer"]["trainable"] == two["answer"]["trainable"]
    ddp = report["ddp_vs_one_process"]
    assert ddp["same_keys"] and ddp["loss_max_abs_diff"] < 1e-3
    assert ddp["weights_max_abs_diff"] < 0.05 * ddp["adam_max_move"]
    assert not (work / "weights").exists()  # the large files are deleted
    assert not any((work / f"run-{n}proc" / "best").exists() for n in (1, 2))
    assert "processes, same effective batch 2" in result.stdout


def test_deepspeed_zero2_on_two_processes_ends_where_one_process_does(tmp_path):
    """`--engine deepspeed` (ZeRO-2 on CPU, gloo) at a tiny paper size: one process and `torchrun` x2 with the same
    effective batch. ZeRO reduces gradients in buckets in the order backward produces them, so a rank whose
    micro-batch has no masks must still run the mask decoder (RadDiagSegModel.decode_every_batch): without it the
    ranks' buckets disagree (gloo aborts, or gradients of different weights are summed)."""
    pytest.importorskip("deepspeed")
    work, report_path = tmp_path / "work", tmp_path / "report.json"
    result = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "paper_train_step.py"), "--work", str(work), "--tiny",
                             "--steps", "3", "--nproc", "1,2", "--engine", "deepspeed", "--json", str(report_path)],
                            capture_output=True, text=True, timeout=900, env=_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["engine"] == "deepspeed"
    for run in report["runs"]:
        assert list(run["answer"]["scripted_segments"]) == ["liver", "liver tumour"]
    ddp = report["ddp_vs_one_process"]
    assert ddp["same_keys"] and ddp["loss_max_abs_diff"] < 1e-3
    assert ddp["weights_max_abs_diff"] < 0.05 * ddp["adam_max_move"]


DEMO = ROOT / "MONAILabelApp" / "model" / "raddiagseg-demo"


def _demo_cases(model, n):
    import numpy as np

    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range

    ct = phantoms.generate_ct(np.random.default_rng(3), "liver", size=128, slices=n + 4, tumours=2)
    return [model.encode_images([to_unit_range(ct.hu[i + 2].astype(np.float32), "ct", None)]) for i in range(n)]


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no shipped demo model")
def test_decode_step_masks_leave_answers_and_masks_bit_for_bit_unchanged(monkeypatch):
    """The same greedy batch (left padding, rows finishing at different steps) with transformers building the masks
    each step and with `LanguageModel.step_masks`: identical tokens and identical masks."""
    import numpy as np

    from raddiagseg import load_model, templates
    from raddiagseg.model.language_model import LanguageModel

    torch.manual_seed(0)
    model = load_model(DEMO).eval()
    features = _demo_cases(model, 2)
    questions = [templates.DEFAULT_QUESTION, "Is there a tumour in the liver?"]  # different lengths: left padding
    after = model.generate_batch(None, questions, features=features, max_new_tokens=48)
    calls = []
    fast = LanguageModel.step_masks
    monkeypatch.setattr(LanguageModel, "step_masks", lambda self, a, d: calls.append(fast(self, a, d)) and None)
    before = model.generate_batch(None, questions, features=features, max_new_tokens=48)
    assert calls and all(c is not None for c in calls)  # the fast path was available at every step it replaced
    assert [r.token_ids for r in after] == [r.token_ids for r in before]
    assert len({len(r.token_ids) for r in after}) == 2  # one row finished before the other
    for a, b in zip(after, before):
        assert [s.label for s in a.segments] == [s.label for s in b.segments]
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.segments, b.segments))


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no shipped demo model")
def test_fused_decode_step_answers_bit_for_bit_as_transformers_modules(monkeypatch):
    """`LanguageModel.fused_step` (the default decode step) against transformers' Gemma-2 modules, on the demo model
    (fp32, plain Linear layers) and on a paper-shaped model with LoRA in bf16 (peft layers, called as modules):
    identical tokens and seg masks, and the fused step really ran."""
    import numpy as np

    from raddiagseg import build_model, load_model, templates
    from raddiagseg.model.language_model import LanguageModel
    from raddiagseg.training.commands import parse_model_options

    from paper_train_step import TINY

    fused_calls = []
    fused = LanguageModel.fused_step
    monkeypatch.setattr(LanguageModel, "fused_step", staticmethod(lambda *a: fused_calls.append(1) or fused(*a)))
    torch.manual_seed(0)
    demo = load_model(DEMO).eval()
    paper = build_model("paper", **parse_model_options(TINY, "paper")).to(torch.bfloat16).eval()
    assert paper.language_model.has_lora
    questions = [templates.DEFAULT_QUESTION, "Is there a tumour in the liver?"]  # different lengths: left padding
    for model, features in ((demo, _demo_cases(demo, 2)), (paper, None)):
        images = None if features else [np.random.default_rng(k).random((64, 64), dtype=np.float32) for k in range(2)]
        answers = {}
        for path in (True, False):
            monkeypatch.setattr(LanguageModel, "fused_decode", path)
            fused_calls.clear()
            answers[path] = model.generate_batch(images, questions, features=features, max_new_tokens=24)
            assert bool(fused_calls) == path
        assert [r.token_ids for r in answers[True]] == [r.token_ids for r in answers[False]]
        assert any(len(r.token_ids) > 1 for r in answers[True])
        for a, b in zip(answers[True], answers[False]):
            assert [(s.label, s.score) for s in a.segments] == [(s.label, s.score) for s in b.segments]  # same bits
            assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.segments, b.segments))
        assert model is paper or any(r.segments for r in answers[True])  # the demo's answers carried masks


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no shipped demo model")
def test_int8_weight_only_keeps_the_demo_models_answers_and_masks():
    import numpy as np

    pytest.importorskip("torchao")
    from raddiagseg import load_model, templates
    from raddiagseg.model.quantize import Int8WeightOnlyLinear, quantize_model

    base = load_model(DEMO).eval()
    quant = load_model(DEMO).eval()
    assert quantize_model(quant, "int8") == sum(isinstance(m, torch.nn.Linear) for m in base.language_model.causal_lm.modules())
    layer = quant.language_model.causal_lm.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int8WeightOnlyLinear) and layer.qweight.dtype == torch.int8
    for rows in (3, 64):  # a decode step (the int8 kernel) and a prefill (bf16 weights made block by block)
        x = torch.randn(2, rows, layer.in_features)
        reference = base.language_model.causal_lm.model.layers[0].mlp.down_proj(x)
        assert float((layer(x) - reference).abs().max()) < 0.02 * float(reference.abs().max())
    same, dices = 0, []
    features = _demo_cases(base, 4)
    for f in features:
        a = base.generate(None, templates.DEFAULT_QUESTION, features=f, max_new_tokens=64)
        b = quant.generate(None, templates.DEFAULT_QUESTION, features=f.to(quant.device, quant.dtype), max_new_tokens=64)
        if a.token_ids == b.token_ids:
            same += 1
            dices += [2 * np.logical_and(x.mask, y.mask).sum() / max(x.mask.sum() + y.mask.sum(), 1)
                      for x, y in zip(a.segments, b.segments)]
    assert same >= 3 and dices and min(dices) > 0.95
    with pytest.raises(ValueError, match="quantize must be one of int8, int8-all"):
        quantize_model(quant, "int4")


def test_gpu_checks_code_runs_its_three_phases_as_a_cpu_dry_run(tmp_path):
    """The GPU script's phases (answer, whole volume, training step) on a tiny paper-shaped model on CPU, without
    SimpleITK and nibabel (the GPU image has neither), so the code a GPU lease will run has run before; the section
    lands in the RESULTS.md it is given."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
    args = ["benchmarks/gpu_checks.py", "--device", "cpu", "--tiny", "--repeats", "1", "--slices", "2", "--batch-size", "2",
            "--max-new-tokens", "4", "--train-steps", "2", "--train-batch", "1", "--budget", "1500", "--results", str(results)]
    without_readers = ("import runpy, sys; sys.modules['SimpleITK'] = sys.modules['nibabel'] = None; "  # as on the GPU image
                       f"sys.argv = {args!r}; sys.path.insert(0, 'benchmarks'); runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([PYTHON, "-c", without_readers], cwd=ROOT, capture_output=True, text=True, timeout=1800, env=_env())
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    text = results.read_text()
    assert "## Other section\n\nkept" in text and "## Paper preset on a GPU (issue 25" in text
    section = text[text.index("## Paper preset on a GPU"):]
    for line in ("- Answer (512x512 CT slice", "- Whole volume (2 slices", "- Training step (finetune stage, batch 1"):
        assert line in section
    assert "not measured" not in section


@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no shipped demo model")
def test_compiled_decode_step_keeps_the_demo_models_answers_and_masks(monkeypatch, caplog):
    """`compile_decode` (static cache, torch.compile) against the default fused step on the demo model: a batch of CT
    slices and X-rays with questions of different lengths (left padding, rows finishing at different steps) gets the
    same tokens and masks; the compiled step really ran; where compiling fails the same step runs uncompiled, with the
    same answers and one warning."""
    import logging

    import numpy as np

    from raddiagseg import load_model, templates
    from raddiagseg.data import phantoms
    from raddiagseg.imaging import to_unit_range
    from raddiagseg.model import static_decode

    model = load_model(DEMO).eval()
    rng = np.random.default_rng(5)
    ct = phantoms.generate_ct(rng, "liver", size=128, slices=6, tumours=2)
    xray = phantoms.generate_xray(rng, "COVID-19", size=128)
    images = [*(to_unit_range(ct.hu[k].astype(np.float32), "ct", None) for k in (2, 3)), xray.image / np.float32(255)]
    questions = [templates.DEFAULT_QUESTION, "Is there a tumour in the liver?", templates.DEFAULT_QUESTION]

    def answer(compile_decode):
        model.language_model.compile_decode = compile_decode
        return model.generate_batch(images, questions, max_new_tokens=48)

    base = answer(False)
    steps = []
    real = static_decode.StaticDecoder.step
    monkeypatch.setattr(static_decode.StaticDecoder, "step", lambda self, *a: steps.append(1) or real(self, *a))
    compiled = answer(True)
    assert steps and not model.language_model._static_step["failed"]
    assert len({len(r.token_ids) for r in base}) > 1 and any(r.segments for r in base)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in base]
    for a, b in zip(compiled, base):
        assert [s.label for s in a.segments] == [s.label for s in b.segments]
        for x, y in zip(a.segments, b.segments):  # seg-token states equal up to the compiler's summation order
            assert (x.mask != y.mask).mean() < 1e-3 and abs(x.score - y.score) < 1e-3

    # weights changed in place (a load, a training step): the step is rebuilt, not decoded with stale copies
    with torch.no_grad():
        model.language_model.causal_lm.model.norm.weight.mul_(1.5)
    changed = answer(False)
    assert [r.token_ids for r in answer(True)] == [r.token_ids for r in changed]
    # past torch.compile's graph limit a new shape decodes uncompiled; the compiled shapes stay compiled
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    del model.language_model._static_step
    answer(True)  # batch of 3 (bucket 4): compiled
    with caplog.at_level(logging.WARNING, logger="raddiagseg.model.static_decode"):
        single = model.generate_batch(images[:1], questions[:1], max_new_tokens=48)  # bucket 1: past the limit
    assert any("graph limit reached" in r.getMessage() for r in caplog.records)
    caplog.clear()
    model.language_model.compile_decode = False
    assert single[0].token_ids == model.generate_batch(images[:1], questions[:1], max_new_tokens=48)[0].token_ids
    assert not model.language_model._static_step["failed"]
    with torch.no_grad():
        model.language_model.causal_lm.model.norm.weight.div_(1.5)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    del model.language_model._static_step
    monkeypatch.setattr(static_decode.torch, "compile", lambda fn, **kw: no_compiler)
    with caplog.at_level(logging.WARNING, logger="raddiagseg.model.static_decode"):
        fallback = answer(True)
    assert [r.token_ids for r in fallback] == [r.token_ids for r in base]
    assert model.language_model._static_step["failed"]
    assert sum("compiled decode step unavailable" in r.getMessage() for r in caplog.records) == 1


def test_compile_decode_says_why_a_model_decodes_uncompiled(caplog):
    """An int8 LM cannot use the compiled step: one warning naming why, and the answers are those of the fused step."""
    import logging

    import numpy as np

    from raddiagseg import load_model, templates
    from raddiagseg.data import phantoms
    from raddiagseg.model.quantize import quantize_model

    model = load_model(DEMO).eval()
    quantize_model(model, "int8")
    image = phantoms.generate_xray(np.random.default_rng(2), "Normal", size=128).image / np.float32(255)
    base = model.generate(image, templates.DEFAULT_QUESTION, max_new_tokens=24)
    model.language_model.compile_decode = True
    with caplog.at_level(logging.WARNING, logger="raddiagseg.model.static_decode"):
        again = [model.generate(image, templates.DEFAULT_QUESTION, max_new_tokens=24) for _ in range(2)]
    assert [r.token_ids for r in again] == [base.token_ids] * 2
    said = [r.getMessage() for r in caplog.records if "cannot be compiled" in r.getMessage()]
    assert len(said) == 1 and "int8" in said[0], said
