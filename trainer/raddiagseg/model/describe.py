"""Parameter accounting of a model: per component, total and trainable (the `describe` command's data)."""

import torch


def describe_model(model):
    counts = model.parameter_counts()
    total = sum(t for t, _ in counts.values())
    trainable = sum(t for _, t in counts.values())
    return {
        "preset": model.config.preset,
        "components": {name: {"parameters": t, "trainable": tr} for name, (t, tr) in counts.items()},
        "total": {"parameters": total, "trainable": trainable},
        "image_tokens": model.config.projector.num_queries,
        "vision_input": model.config.vision.image_size,
        "clip_input": model.config.clip.image_size,
        "vocab_size": model.config.language.vocab_size,
    }


def describe_preset(preset):
    """Build `preset` on the meta device (no memory, no weights) and count its parameters."""
    from raddiagseg.model.builder import build_from_config
    from raddiagseg.model.config import preset_config

    with torch.device("meta"):
        model = build_from_config(preset_config(preset))
    return describe_model(model)


def describe_checkpoint(path):
    from raddiagseg import load_model

    return describe_model(load_model(path))


def _human(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_table(info):
    rows = [f"RadDiagSeg-M preset {info['preset']!r}: {info['image_tokens']} image tokens, vision input {info['vision_input']}, "
            f"CLIP input {info['clip_input']}, vocab {info['vocab_size']}",
            f"{'component':<18}{'parameters':>16}{'':>10}{'trainable':>16}{'':>10}"]
    items = list(info["components"].items()) + [("total", info["total"])]
    for name, c in items:
        rows.append(f"{name:<18}{c['parameters']:>16,}{_human(c['parameters']):>10}{c['trainable']:>16,}{_human(c['trainable']):>10}")
    return "\n".join(rows)
