"""`raddiagseg demo`: the shipped demo model, end to end on one CPU.

phantoms (train seed) -> build -> CLIP alignment (stage 0, see clip_align.py; the CLIP encoder is
then frozen, as the paper freezes BiomedCLIP, and by default the projector too, see PRETRAIN_TRAINABLE)
-> pretrain (Ref-Seg + VQA) -> finetune (VQA-Seg + VQA)
-> phantoms (held-out seed) -> `raddiagseg predict` + `raddiagseg score` -> model folder with
MODEL_CARD.md and the score report. Every step is skipped on `--resume` when its output exists,
so an interrupted build continues where it stopped.
"""

import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from raddiagseg.fileio import replace_folder

log = logging.getLogger(__name__)

# Phantom data sizes. Many short volumes rather than few long ones: neighbouring slices of one
# volume are near copies, and what generalises to a new seed is the number of distinct patients
# (measured: CLIP caption accuracy on unseen volumes 0.58 with 40 volumes x ~44 slices, 0.76 with
# 160 x 12 at the same step count).
# Fewer X-rays (900) overfit them: the finetuned LM answered "COVID-19 infection" for most unseen X-rays; 2700 tell
# normal X-rays apart (measured: benchmarks/RESULTS.md, "Demo-model data sizes"). Phantoms cost seconds, training
# steps minutes: more distinct images, same steps.
TRAIN_DATA = dict(ct_volumes=240, xrays=2700, ct_slices=12)
TEST_DATA = dict(ct_volumes=20, xrays=120, ct_slices=12)
DEMO_STEPS = dict(align=3000, pretrain=500, finetune=2000)
# The paper fine-tunes on VQA-Seg + VQA only; measured on the demo build, that erased Ref-Seg ("segment the
# liver": held-out CT Dice 0.55 after pretrain, 0.01 after finetune), which the app and its train task use.
FINETUNE_RATIO = {"vqaseg": 0.5, "vqa": 0.25, "refseg": 0.25}
# What stages 1 and 2 change in what trains (model.set_trainable flags). The projector stays as stage 0 aligned it:
# measured (benchmarks/RESULTS.md, "Demo-model recipes"), a linear probe read pancreas tumours from the aligned
# projector tokens far better than from the finetuned ones, and freezing it took held-out CT detection / diagnosis F1
# from 0.761 / 0.853 to 0.931 / 0.951 with X-ray diagnosis F1 0.947 -> 0.983.
PRETRAIN_TRAINABLE = {"projector": False}
FINETUNE_TRAINABLE = {"projector": False}
# Training phantoms and augmentation, per stage: the shipped model's are generator version 1 with the basic
# augmentation everywhere. Stage 0 (the CLIP alignment) is where the model learns to see lesions, and the CLIP encoder
# and projector are frozen after it; measured (benchmarks/RESULTS.md, "Demo rebuild with scanner variation"): stage 0
# on scanner-variation phantoms lost the normal CTs (caption accuracy 0.635), and stage 0 on version 1 with stages 1-2
# on variation "mixed" with "scanner" augmentation (`--variation mixed --augmentation scanner`) scored no better than
# v7 on version-2 phantoms and lost clean Dice, and stage 0 with the "acquisition" augmentation fixed X-ray gamma and
# mirroring but not the CT contrast shift, at a clean cost ("Stage 0 with acquisition augmentation"), so none of these
# is the default. benchmarks/robustness.py measures a model under the shifts.
ALIGN_VARIATION = "none"
ALIGN_AUGMENTATION = "basic"
TRAIN_VARIATION = "none"
AUGMENTATION = "basic"
# What the shipped demo model should reach on held-out phantoms, per modality (the card says which it meets).
TARGETS = {"detection_f1": 0.95, "diagnosis_f1": 0.90, "dice_org": 0.85, "dice_abn": 0.60}


@dataclass
class DemoSettings:
    out: str = "MONAILabelApp/model/raddiagseg-demo"
    work: Optional[str] = None
    train_seed: int = 1234
    test_seed: int = 98765
    align_steps: Optional[int] = None
    pretrain_steps: Optional[int] = None
    finetune_steps: Optional[int] = None
    batch_size: Optional[int] = None
    precision: str = "auto"
    num_workers: int = 0
    resume: bool = False
    train_ct_volumes: int = TRAIN_DATA["ct_volumes"]
    train_xrays: int = TRAIN_DATA["xrays"]
    test_ct_volumes: int = TEST_DATA["ct_volumes"]
    test_xrays: int = TEST_DATA["xrays"]
    ct_slices: int = TRAIN_DATA["ct_slices"]
    val_samples: int = 64  # validation subset of each stage (evenly spread over the val split)
    model_overrides: dict = field(default_factory=dict)  # build_model("demo", **overrides), e.g. {"clip": {"depth": 4}}
    device: Optional[str] = None  # "cpu", "cuda", ...; default: cuda when available
    workers: Optional[int] = None  # phantom-drawing processes (default: all CPUs)
    pretrain_trainable: dict = field(default_factory=lambda: dict(PRETRAIN_TRAINABLE))  # set_trainable flags of stage 1
    finetune_trainable: dict = field(default_factory=lambda: dict(FINETUNE_TRAINABLE))  # set_trainable flags of stage 2
    variation: str = TRAIN_VARIATION  # phantom variation of stages 1-2's training data (data.phantoms.VARIATIONS)
    augmentation: str = AUGMENTATION  # training augmentation of stages 1-2 ("basic" or "scanner")
    align_variation: str = ALIGN_VARIATION  # phantom variation of stage 0's training data
    align_augmentation: str = ALIGN_AUGMENTATION  # stage 0's augmentation (clip_align.AUGMENT_RANGES)


def _phantoms(folder, ct_volumes, xrays, seed, resume, ct_slices, workers, variation="none"):
    from raddiagseg.data.builder import build_phantom_dataset

    manifest = folder / "manifest.jsonl"
    if resume and manifest.is_file():
        log.info("reusing %s", manifest)
        return manifest, True
    if folder.exists():
        shutil.rmtree(folder)
    return build_phantom_dataset(folder, ct_volumes=ct_volumes, xrays=xrays, seed=seed, ct_slices=ct_slices,
                                 workers=workers, variation=variation), False


def _stage(stage, data, out, settings, init=None):
    from raddiagseg.training import TrainConfig, train

    steps = settings.pretrain_steps if stage == "pretrain" else settings.finetune_steps
    steps = steps or DEMO_STEPS[stage]
    done = out / "result.json"
    if settings.resume and done.is_file():
        result = json.loads(done.read_text())
        log.info("reusing finished %s run %s", stage, out)
        return (Path(result["best_checkpoint"]), result), True
    config = TrainConfig(
        data=str(data), out=str(out), stage=stage, preset="demo", init=str(init) if init else None,
        max_steps=steps, batch_size=settings.batch_size, precision=settings.precision,
        num_workers=settings.num_workers, seed=settings.train_seed, resume=settings.resume and (out / "last").exists(),
        val_every=max(1, steps // 4), ratio=dict(FINETUNE_RATIO) if stage == "finetune" else None,
        val_samples=settings.val_samples, device=settings.device, model_overrides=dict(settings.model_overrides),
        trainable=dict(settings.finetune_trainable if stage == "finetune" else settings.pretrain_trainable),
        augmentation=settings.augmentation,
    )
    result = train(config)
    summary = {"best_checkpoint": str(result.best_checkpoint), "best_metric": result.best_metric,
               "metric_name": result.metric_name, "best_step": result.best_step, "steps": result.steps,
               "wall_time_s": result.wall_time_s}
    return (result.best_checkpoint, summary), False


def _align(data, out, settings, also_val=None):
    """Stage 0: a fresh demo model whose CLIP encoder is caption-aligned, then frozen; saved to `out`.
    `also_val` {name: manifest}: also report the caption accuracy on these val splits (stages 1-2's data)."""
    import torch

    from raddiagseg import build_model
    from raddiagseg.training.clip_align import align_clip_encoder

    summary_path = out / "alignment.json"
    if settings.resume and summary_path.is_file() and (out / "config.json").is_file():
        log.info("reusing aligned model %s", out)
        return (out, json.loads(summary_path.read_text())), True
    torch.manual_seed(settings.train_seed)
    model = build_model("demo", **settings.model_overrides)
    steps = settings.align_steps or DEMO_STEPS["align"]
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = align_clip_encoder(model, data, steps=steps, seed=settings.train_seed, device=device,
                                 num_workers=settings.num_workers, augmentation=settings.align_augmentation,
                                 also_val=also_val)
    model.set_trainable(clip=False)
    staging = out.parent / (out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    (staging / "alignment.json").write_text(json.dumps(summary, indent=2))
    replace_folder(staging, out)  # the previous folder stays until the new one is complete
    return (out, summary), False


class _StepTimes:
    """Wall time of each build step, kept in WORK/timings.json: a build resumed with `--resume` reuses finished
    steps, and its card must still say what each of them cost when it ran."""

    def __init__(self, path, resume):
        self.path = Path(path)
        self.times = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}
        self.reused = []

    def run(self, key, step):
        """Run `step()` -> (result, reused); record its time unless it was reused from an earlier run."""
        t = time.perf_counter()
        result, reused = step()
        if reused:
            self.reused.append(key)
            self.times.setdefault(key, None)  # unknown when the earlier run predates timings.json
        else:
            self.times[key] = time.perf_counter() - t
        self.path.write_text(json.dumps(self.times, indent=1))
        return result


def build_demo(settings: DemoSettings):
    """Build the demo model folder `settings.out`; returns the path of its MODEL_CARD.md."""
    from raddiagseg import cli
    from raddiagseg.training.checkpoints import save_model
    from raddiagseg.model import load_model

    out = Path(settings.out)
    work = Path(settings.work) if settings.work else out.parent / ".raddiagseg-demo-work"
    work.mkdir(parents=True, exist_ok=True)
    steps = _StepTimes(work / "timings.json", settings.resume)

    def data():
        sets, reused = {}, []
        for variation in dict.fromkeys((settings.align_variation, settings.variation)):
            folder = work / ("data-train" if variation == "none" else f"data-train-{variation}")
            sets[variation], done = _phantoms(folder, settings.train_ct_volumes, settings.train_xrays, settings.train_seed,
                                              settings.resume, settings.ct_slices, settings.workers, variation)
            reused.append(done)
        test, done = _phantoms(work / "data-heldout", settings.test_ct_volumes, settings.test_xrays,
                               settings.test_seed, settings.resume, settings.ct_slices, settings.workers)
        return (sets[settings.align_variation], sets[settings.variation], test), all(reused) and done

    align_data, train_data, test_data = steps.run("data_s", data)
    also_val = {settings.variation: train_data} if train_data != align_data else None
    aligned, align_summary = steps.run("align_s", lambda: _align(align_data, work / "aligned", settings, also_val))
    pretrained, pre_summary = steps.run("pretrain_s", lambda: _stage("pretrain", train_data, work / "pretrain", settings,
                                                                     init=aligned))
    finetuned, fine_summary = steps.run("finetune_s", lambda: _stage("finetune", train_data, work / "finetune", settings,
                                                                     init=pretrained))

    # Score on the held-out seed with the benchmark commands themselves, so the card's numbers are theirs.
    t = time.perf_counter()
    evaluation = work / "heldout-eval"
    if evaluation.exists():
        shutil.rmtree(evaluation)
    evaluation.mkdir(parents=True)
    pred = evaluation / "pred.jsonl"
    report_json = evaluation / "report.json"
    device = ["--device", settings.device] if settings.device else []
    for argv in (["predict", "--model", str(finetuned), "--data", str(test_data), "--out", str(pred), "--split", "all", *device],
                 ["score", "--pred", str(pred), "--data", str(test_data), "--out", str(report_json),
                  "--name", "raddiagseg-demo"]):
        code = cli.main(argv)
        if code:
            raise RuntimeError(f"`raddiagseg {' '.join(argv)}` failed with exit code {code}")
    steps.times["evaluate_s"] = time.perf_counter() - t
    report = json.loads(report_json.read_text())

    # The shipped folder: fp16 weights (half the size), the score report, the card.
    staging = out.parent / (out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    model = load_model(finetuned, device="cpu")
    save_model(model, staging, dtype=__import__("torch").float16)
    for name in ("report.json", "report.md", "report.csv"):
        if (evaluation / name).is_file():
            shutil.copyfile(evaluation / name, staging / f"heldout_{name}")
    timings = dict(steps.times)
    export_s = time.perf_counter() - t - timings["evaluate_s"]
    timings["total_s"] = None if None in timings.values() else sum(timings.values()) + export_s
    from raddiagseg.training import reference  # replay + validation phantoms the app's train task regenerates

    reference.write_reference(staging, reference.phantom_reference(settings.train_seed, settings.test_seed, work / "reference",
                                                                   settings.variation))
    # the domain guard's statistics: phantoms of the training seed (fit) and of an unseen one (calibration)
    code = cli.main(["domain-stats", "--model", str(staging), "--fit-seed", str(settings.train_seed),
                     "--variation", settings.variation,
                     "--ct-volumes", str(min(80, settings.train_ct_volumes)), "--xrays", str(min(600, settings.train_xrays)),
                     "--work", str(work / "domain")])
    if code:
        raise RuntimeError(f"`raddiagseg domain-stats` failed with exit code {code}")
    from raddiagseg import domain

    card = staging / "MODEL_CARD.md"
    card.write_text(model_card(settings, report, timings, align_summary, pre_summary, fine_summary, steps.reused)
                    + "\n" + domain.card_section(staging))
    replace_folder(staging, out)  # the previous folder stays until the new one is complete
    return out / "MODEL_CARD.md"


def _fmt(value):
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def targets_section(report):
    """Markdown: each held-out metric of TARGETS per modality, marked met or not met."""
    names = {"detection_f1": "detection F1", "diagnosis_f1": "diagnosis F1", "dice_org": "Dice-Org", "dice_abn": "Dice-Abn"}
    head = "| modality | " + " | ".join(f"{names[k]} (target ≥ {v:.2f})" for k, v in TARGETS.items()) + " |"
    lines = ["## Against the targets", "", head, "|---" * (len(TARGETS) + 1) + "|"]
    missed = 0
    for modality in ("ct", "xray"):
        m = report.get(modality) or {}
        cells = []
        for key, target in TARGETS.items():
            value = m.get(key)
            met = value is not None and value >= target
            missed += not met
            cells.append(f"{_fmt(value)} {'met' if met else '**not met**'}")
        lines.append(f"| {modality} | " + " | ".join(cells) + " |")
    lines += ["", "All targets met." if not missed else f"{missed} of {2 * len(TARGETS)} targets not met."]
    return "\n".join(lines) + "\n"


def model_card(settings, report, timings, align, pre, fine, reused=()):
    from raddiagseg.data.layouts import default_workers

    rows = []
    for modality in ("ct", "xray", "overall"):
        m = report.get(modality) or {}
        rows.append(f"| {modality} | {_fmt(m.get('n'))} | {_fmt(m.get('detection_f1'))} | {_fmt(m.get('diagnosis_f1'))} "
                    f"| {_fmt(m.get('diagnosis_acc'))} | {_fmt(m.get('dice_org'))} | {_fmt(m.get('dice_abn'))} "
                    f"| {_fmt(m.get('refseg_dice'))} | {_fmt(m.get('vqa_closed_acc'))} |")
    minutes = {k: "unknown" if v is None else f"{v / 60:.1f} min" for k, v in timings.items()}
    names = {"data_s": "data", "align_s": "CLIP alignment", "pretrain_s": "pretrain", "finetune_s": "finetune"}
    reused_note = ("" if not reused else "\n- Reused from an earlier run of the same work folder (`--resume`), timed when they ran: "
                   + ", ".join(names.get(k, k) for k in reused) + ".")
    config = {k: v for k, v in asdict(settings).items() if k not in ("out", "work", "device", "workers")}
    return f"""# RadDiagSeg-M demo model

A small model of the RadDiagSeg-M architecture (`demo` preset: SAM image encoder, CLIP ViT, Perceiver
projector, Gemma-2 decoder, SAM mask decoder; 16 seg tokens) trained from scratch on **synthetic
phantoms only**. It exists so that the app, the Slicer extension and the tests work out of the box.
**It is not a medical device and has never seen a real patient image: do not use it on real data.**

## How it was made
`raddiagseg demo` (this folder is its output), settings: `{json.dumps(config)}`

- Training data: phantoms with seed {settings.train_seed} ({settings.train_ct_volumes} CT volumes of {settings.ct_slices} slices in the MSD liver and
  pancreas layouts, {settings.train_xrays} chest X-rays in the COVID-QU-Ex layout, VQA-RAD/SLAKE-style and Ref-Seg
  phantoms), built with `raddiagseg build` into the RadDiagSeg-D tasks: variation "{settings.align_variation}" with
  "{settings.align_augmentation}" augmentation in stage 0, variation "{settings.variation}" with "{settings.augmentation}"
  augmentation in stages 1-2.
- Stage 0 (CLIP alignment, `raddiagseg/training/clip_align.py`): {align['steps']} steps of the CLIP loss between
  images (through the CLIP encoder and the projector) and captions written from their ground truth; caption
  accuracy on unseen validation volumes
  {_fmt(align.get('val_acc'))} (train {_fmt(align.get('train_acc'))}{_other_val(align, settings)}). The CLIP encoder is frozen afterwards.
- What stages 1 and 2 change in what trains (`model.set_trainable`): {_flags(settings.pretrain_trainable)} and
  {_flags(settings.finetune_trainable)}; everything else as the demo preset (the LM, SAM encoder and mask decoder train).
- Stage 1 (pretrain, Ref-Seg + VQA): {pre['steps']} steps, best {pre['metric_name']} = {_fmt(pre['best_metric'])} at step {pre['best_step']}.
- Stage 2 (finetune, VQA-Seg : VQA : Ref-Seg = {FINETUNE_RATIO['vqaseg']} : {FINETUNE_RATIO['vqa']} : {FINETUNE_RATIO['refseg']}): {fine['steps']} steps, best {fine['metric_name']} = {_fmt(fine['best_metric'])} at step {fine['best_step']}.
- Wall time on {platform.machine()} CPU ({default_workers()} cores): data {minutes['data_s']}, CLIP alignment {minutes['align_s']}, pretrain {minutes['pretrain_s']},
  finetune {minutes['finetune_s']}, held-out evaluation {minutes['evaluate_s']}, total {minutes['total_s']}.{reused_note}
- Weights stored in float16.

## Held-out evaluation
Phantoms from seed {settings.test_seed} (never used in training; {settings.test_ct_volumes} CT volumes, {settings.test_xrays}
X-rays), all splits, scored by `raddiagseg predict --split all` then `raddiagseg score` (report: `heldout_report.json`,
`heldout_report.md`). Dice values are over true-positive valid answers only (paper 001).

| modality | n | detection F1 | diagnosis F1 | diagnosis acc | Dice-Org | Dice-Abn | Ref-Seg Dice | VQA closed acc |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Reproduce: `raddiagseg predict --model MONAILabelApp/model/raddiagseg-demo --data DATA/manifest.jsonl --out pred.jsonl --split all`
then `raddiagseg score --pred pred.jsonl --data DATA/manifest.jsonl`, where DATA comes from
`raddiagseg phantoms --seed {settings.test_seed} ...` + `raddiagseg build` (or `build_phantom_dataset(DATA,
ct_volumes={settings.test_ct_volumes}, xrays={settings.test_xrays}, seed={settings.test_seed}, ct_slices={settings.ct_slices})`).

{targets_section(report)}
## Limits
Synthetic anatomy and lesions only; one axial 2D slice or one X-ray per question; answers follow the
RadDiagSeg-D templates; the vocabulary is the one in `raddiagseg/resources/vocabulary.json`.
"""


def _other_val(align, settings):
    value = align.get(f"val_acc_{settings.variation}")
    return "" if value is None else f"; on stages 1-2's variation-\"{settings.variation}\" phantoms {_fmt(value)}"


def _flags(flags):
    return ", ".join(f"{k}={'trains' if v is True else 'frozen' if v is False else v}" for k, v in flags.items()) or "nothing"
