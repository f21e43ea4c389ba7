"""`raddiagseg train` (one stage) and `raddiagseg demo` (phantoms -> both stages -> score -> shipped model folder)."""

import json

from raddiagseg.cli import CommandError
from raddiagseg.training.config import ENGINES, PRECISIONS, PRESETS, STAGES


def register(subparsers):
    p = subparsers.add_parser(
        "train", help="train one stage (pretrain: Ref-Seg + VQA, finetune: VQA-Seg + VQA); works under torchrun",
        description="Train one stage of RadDiagSeg-M. Under `torchrun --nproc_per_node K` it runs DDP with the same "
                    "effective batch (--batch-size x --grad-accum) as one process.")
    p.add_argument("--data", required=True, help="folder with manifest.jsonl (from `raddiagseg build`) or the manifest")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--preset", default="demo", choices=PRESETS)
    p.add_argument("--init", help="checkpoint folder to start from (e.g. the pretrain run's best/)")
    p.add_argument("--out", required=True, help="run folder (best/, last/, metrics.csv, tb/, loss_curves.png)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: from the preset)")
    p.add_argument("--epochs", type=float, help="epochs over the training split, when --max-steps is not given")
    p.add_argument("--batch-size", type=int, help="micro-batch size (effective batch = batch size x grad accum)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=float, help="warmup steps (>= 1) or fraction of the steps (< 1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ratio", help="task mix, e.g. 0.6:0.4 (finetune vqaseg:vqa, pretrain refseg:vqa) or vqaseg=0.6,vqa=0.4")
    p.add_argument("--val-every", type=int, help="validate (and keep the best checkpoint) every N steps")
    p.add_argument("--val-samples", type=int, default=64, help="validation subset size (0 = the whole val split)")
    p.add_argument("--save-every", type=int, help="write the resumable last/ checkpoint every N steps (default: --val-every)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 autocast on a GPU that supports it, fp32 on CPU")
    p.add_argument("--engine", default="ddp", choices=ENGINES, help="deepspeed = ZeRO-2 (needs deepspeed)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--no-augment", action="store_true", help="train without data augmentation")
    p.add_argument("--augmentation", default="basic", choices=("basic", "scanner"),
                   help="basic: small warp, mild intensity; scanner: rotation, zoom, contrast, gamma, blur/sharpen, "
                        "noise, X-ray polarity and side-free mirroring")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the best/ model folder")
    p.add_argument("--rvls2m", action="store_true", help="train with RVLS2M region prompts (paper 003), saved in the model config")
    p.add_argument("--rvls2m-grid", type=int, help="RVLS2M grid cells per side (default: the model config's)")
    p.add_argument("--rvls2m-top-k", type=int, help="RVLS2M: how many most-similar cells form the region")
    p.add_argument("--rvls2m-strategy", choices=("topk", "mean"), help="RVLS2M τ strategy")
    p.add_argument("--cot", action="store_true", help="diagnosis chain-of-thought answers (modality -> finding -> diagnosis) for vqaseg")
    p.add_argument("--trainable", action="append", default=[], metavar="PART=VALUE",
                   help="change what trains, e.g. clip=true, projector=false, lm=lora (repeatable; saved with the model)")
    p.add_argument("--sam-checkpoint", help="fresh model: MedSAM/SAM .pth for the vision backbone and mask decoder")
    p.add_argument("--clip-dir", help="fresh model: open_clip BiomedCLIP folder for the CLIP encoder")
    p.add_argument("--lm-dir", help="fresh model: PaliGemma2 HF folder (Gemma-2 LM weights and its tokenizer)")
    p.add_argument("--model-option", action="append", default=[], metavar="PART.FIELD=VALUE",
                   help="fresh model: change a field of the preset's config, e.g. language.lora_rank=16 (repeatable)")
    p.add_argument("--frozen-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the parameters that do not train (bfloat16: the paper preset's frozen LM in half the "
                        "memory; trainable parameters stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the LM's layer activations in backward: less memory, about 30 %% slower")
    p.set_defaults(func=run_train)

    d = subparsers.add_parser(
        "demo", help="build the demo model: phantoms -> build -> pretrain -> finetune -> predict + score -> model folder")
    d.add_argument("--out", default="MONAILabelApp/model/raddiagseg-demo", help="model folder to write")
    d.add_argument("--work", help="working folder for data and runs (default: OUT/../.raddiagseg-demo-work)")
    d.add_argument("--train-seed", type=int, default=1234, help="phantom seed of the training data")
    d.add_argument("--test-seed", type=int, default=98765, help="phantom seed of the held-out evaluation data")
    d.add_argument("--align-steps", type=int, help="CLIP alignment steps (stage 0)")
    d.add_argument("--pretrain-steps", type=int)
    d.add_argument("--finetune-steps", type=int)
    d.add_argument("--batch-size", type=int)
    d.add_argument("--precision", default="auto", choices=PRECISIONS)
    d.add_argument("--num-workers", type=int, default=0)
    d.add_argument("--resume", action="store_true", help="reuse finished steps in --work and resume unfinished runs")
    d.add_argument("--val-samples", type=int, default=64, help="validation samples per check in each stage")
    d.add_argument("--model-option", action="append", default=[], metavar="PART.FIELD=VALUE",
                   help="change the demo architecture, e.g. clip.depth=4 or projector.num_queries=32 (repeatable)")
    d.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    d.add_argument("--workers", type=int, help="processes drawing phantoms (default: all CPUs)")
    d.add_argument("--pretrain-trainable", action="append", metavar="PART=VALUE",
                   help="change what stage 1 trains, e.g. projector=false (repeatable)")
    d.add_argument("--finetune-trainable", action="append", metavar="PART=VALUE",
                   help="change what stage 2 trains, e.g. clip=true (repeatable)")
    from raddiagseg.training import demo as demo_recipe

    d.add_argument("--variation", choices=("none", "scanner", "mixed"), default=demo_recipe.TRAIN_VARIATION,
                   help="phantom variation of stages 1-2's training data (`raddiagseg phantoms --variation`; default "
                        f"{demo_recipe.TRAIN_VARIATION}; mixed: half the studies vary like real scanners)")
    d.add_argument("--augmentation", choices=("basic", "scanner"), default=demo_recipe.AUGMENTATION,
                   help=f"training augmentation of stages 1-2 (default {demo_recipe.AUGMENTATION}; scanner adds "
                        "rotation, zoom, contrast, gamma, blur/sharpen, noise, mirroring, X-ray polarity)")
    d.add_argument("--align-variation", choices=("none", "scanner", "mixed"), default=demo_recipe.ALIGN_VARIATION,
                   help=f"phantom variation of stage 0's (CLIP alignment) data (default {demo_recipe.ALIGN_VARIATION})")
    d.add_argument("--align-augmentation", choices=("basic", "scanner", "acquisition"), default=demo_recipe.ALIGN_AUGMENTATION,
                   help=f"stage 0's augmentation (default {demo_recipe.ALIGN_AUGMENTATION})")
    d.set_defaults(func=run_demo)


def config_from_args(args):
    from raddiagseg.training.config import TrainConfig, parse_ratio_text

    ratio = parse_ratio_text(args.ratio, args.stage) if args.ratio else None
    return TrainConfig(
        data=args.data, out=args.out, stage=args.stage, preset=args.preset, init=args.init,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, ratio=ratio, val_every=args.val_every,
        val_samples=args.val_samples or None, save_every=args.save_every, seed=args.seed,
        num_workers=args.num_workers, precision=args.precision, engine=args.engine, device=args.device,
        resume=args.resume, augment=not args.no_augment, augmentation=args.augmentation, save_dtype=args.save_dtype,
        rvls2m=_rvls2m_settings(args), cot=args.cot, trainable=_trainable_flags(args.trainable),
        model_overrides=_model_overrides(args), frozen_dtype=args.frozen_dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def _model_overrides(args):
    """--model-option fields plus the weight sources (--sam-checkpoint, --clip-dir, --lm-dir) of a fresh model."""
    overrides = parse_model_options(args.model_option, args.preset)
    for key in ("sam_checkpoint", "clip_dir", "lm_dir"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    return overrides


def _rvls2m_settings(args):
    if not args.rvls2m:
        if args.rvls2m_grid or args.rvls2m_top_k or args.rvls2m_strategy:
            raise CommandError("--rvls2m-grid/--rvls2m-top-k/--rvls2m-strategy need --rvls2m")
        return None
    settings = {"enabled": True, "grid": args.rvls2m_grid, "top_k": args.rvls2m_top_k, "strategy": args.rvls2m_strategy}
    return {k: v for k, v in settings.items() if v is not None}


def run_train(args):
    config = config_from_args(args)
    try:
        config = config.resolved()
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    from raddiagseg.training import train

    result = train(config)
    print(f"best checkpoint: {result.best_checkpoint} ({result.metric_name} = {result.best_metric}, step {result.best_step})")
    return 0


def _trainable_flags(items):
    """['clip=true', 'lm=lora'] -> {'clip': True, 'lm': 'lora'}, checked against TrainableConfig."""
    import dataclasses

    from raddiagseg.model.config import TrainableConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainableConfig)}
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise CommandError(f"--trainable {item!r}: expected PART=VALUE with PART one of {', '.join(sorted(fields))}")
        value = _option_value(text.strip().lower(), fields[name])
        if name == "lm" and value not in ("full", "lora", "frozen"):
            value = None
        if value is None:
            raise CommandError(f"--trainable {item!r}: {text!r} is not a valid value for {name}")
        out[name] = value
    return out


def _option_value(text, default):
    """`text` read as the type of `default` (str fields take it as it is); None when it is not one."""
    if isinstance(default, str) or default is None:
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(default, bool):
        return value if isinstance(value, bool) else None
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(default, tuple):
        return tuple(value) if isinstance(value, list) else None
    return None


def parse_model_options(items, preset="demo"):
    """['clip.depth=4', 'projector.num_queries=32'] -> {'clip': {'depth': 4}, 'projector': {'num_queries': 32}}."""
    import dataclasses

    from raddiagseg.model.config import preset_config

    config = preset_config(preset)
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        part, _, name = key.strip().partition(".")
        section = getattr(config, part, None)
        if not sep or not name or not dataclasses.is_dataclass(section) or name not in {f.name for f in dataclasses.fields(section)}:
            raise CommandError(f"--model-option {item!r}: expected PART.FIELD=VALUE with a field of the {preset} config, "
                               "e.g. clip.depth=4")
        default = getattr(section, name)
        value = _option_value(text, default)
        if value is None:
            kind = {bool: "true or false", int: "an integer", float: "a number", tuple: "a JSON list"}.get(type(default), "valid")
            raise CommandError(f"--model-option {item!r}: {text!r} is not {kind}")
        out.setdefault(part, {})[name] = value
    return out


def run_demo(args):
    from raddiagseg.training.demo import DemoSettings, build_demo

    settings = DemoSettings(
        out=args.out, work=args.work, train_seed=args.train_seed, test_seed=args.test_seed,
        align_steps=args.align_steps, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, batch_size=args.batch_size,
        precision=args.precision, num_workers=args.num_workers, resume=args.resume, val_samples=args.val_samples,
        model_overrides=parse_model_options(args.model_option), device=args.device, workers=args.workers,
        variation=args.variation, augmentation=args.augmentation, align_variation=args.align_variation,
        align_augmentation=args.align_augmentation,
    )
    if args.pretrain_trainable is not None:
        settings.pretrain_trainable = _trainable_flags(args.pretrain_trainable)
    if args.finetune_trainable is not None:
        settings.finetune_trainable = _trainable_flags(args.finetune_trainable)
    if args.val_samples < 1:
        raise CommandError("--val-samples must be ≥ 1")
    card = build_demo(settings)
    print(f"demo model written: {card.parent} (card: {card})")
    return 0
