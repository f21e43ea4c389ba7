"""Loading pretrained weights from local files: MedSAM/SAM .pth, BiomedCLIP open_clip folder, PaliGemma2 HF folder.

Every loader maps the file's keys onto our modules and checks them strictly (no missing, no
unexpected, same shapes) before copying, so a wrong file fails with one line naming the first
mismatches instead of silently leaving random weights.
"""

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SAM_PARTS = {"image_encoder.": "vision", "prompt_encoder.": "prompt", "mask_decoder.": "decoder"}
LM_PREFIXES = ("language_model.model.", "model.language_model.")  # PaliGemma layouts (hub files / transformers 5)
LM_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
)


def check_state_dict(expected, found, source, first=3):
    """Raise ValueError (one line) unless `found` (tensors or shapes) has exactly `expected`'s keys and shapes."""
    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {shape(found[k])} vs model {shape(expected[k])}"
        for k in expected
        if k in found and shape(found[k]) != shape(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:first])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:first])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:first])})")
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def _copy_into(module, state):
    expected = module.state_dict()
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False, assign=expected_is_meta(expected))


def expected_is_meta(state):
    return any(v.device.type == "meta" for v in state.values())


def _torch_load(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, non-tensor objects...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable PyTorch weights file ({reason[:200]})") from None


def unwrap_state_dict(obj, source):
    """A plain state dict from a checkpoint that may wrap it ({"model": ...}, {"state_dict": ...}) with "module." prefixes."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_sam_checkpoint(path, vision_backbone, seg_mask_decoder):
    """MedSAM/SAM `.pth` -> SAM image encoder (vision backbone) + prompt encoder + mask decoder."""
    state = unwrap_state_dict(_torch_load(path), str(path))
    targets = {
        "image_encoder.": vision_backbone.image_encoder,
        "prompt_encoder.": seg_mask_decoder.prompt_encoder,
        "mask_decoder.": seg_mask_decoder.mask_decoder,
    }
    expected = {f"{prefix}{k}": v for prefix, module in targets.items() for k, v in module.state_dict().items()}
    check_state_dict(expected, state, source=f"SAM checkpoint {path}")
    for prefix, module in targets.items():
        _copy_into(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    log.info("loaded SAM/MedSAM weights from %s (%d tensors)", path, len(state))


def load_clip_folder(folder, clip_encoder):
    """BiomedCLIP open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin) -> the ViT trunk."""
    folder = Path(folder)
    config_file = folder / "open_clip_config.json"
    weight_files = [folder / "open_clip_pytorch_model.bin", folder / "open_clip_model.safetensors"]
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not an open_clip folder: {config_file.name} is missing")
    weights = next((f for f in weight_files if f.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has no open_clip_pytorch_model.bin (or open_clip_model.safetensors)")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON ({exc})") from None
    vision_cfg = cfg.get("model_cfg", {}).get("vision_cfg", {})
    size = vision_cfg.get("image_size")
    if size is not None and int(size if not isinstance(size, (list, tuple)) else size[0]) != clip_encoder.config.image_size:
        raise ValueError(f"{config_file}: image_size {size} but the model's CLIP encoder expects {clip_encoder.config.image_size}")
    pre = cfg.get("preprocess_cfg", {})
    if "mean" in pre and "std" in pre:  # use the folder's normalisation (BiomedCLIP: OpenAI CLIP's)
        clip_encoder.config.mean, clip_encoder.config.std = tuple(pre["mean"]), tuple(pre["std"])
        clip_encoder.mean.copy_(torch.tensor(pre["mean"]).view(1, 3, 1, 1))
        clip_encoder.std.copy_(torch.tensor(pre["std"]).view(1, 3, 1, 1))
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(weights))
    else:
        raw = unwrap_state_dict(_torch_load(weights), str(weights))
    prefix = "visual.trunk."
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{weights} has no vision trunk weights (keys visual.trunk.*)")
    check_state_dict(clip_encoder.trunk.state_dict(), state, source=f"CLIP weights {weights}")
    _copy_into(clip_encoder.trunk, state)
    log.info("loaded BiomedCLIP vision trunk from %s (%d tensors)", weights, len(state))


def _lm_text_config(folder):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    cfg = json.loads(config_file.read_text())
    text = dict(cfg.get("text_config") or cfg)
    if "vocab_size" not in text and "vocab_size" in cfg:
        text["vocab_size"] = cfg["vocab_size"]
    return text


def _safetensors_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")


def _safetensors_shapes(folder):
    """{key: shape} of every tensor in the folder's safetensors file(s), read from the headers only."""
    shapes = {}
    for name in _safetensors_files(folder):
        header, _ = safetensors_header(folder / name)
        shapes.update((key, tuple(info["shape"])) for key, info in header.items())
    return shapes


def _lm_key(key):
    """Our Gemma2ForCausalLM key for a key of a PaliGemma (either layout) or plain Gemma-2 file; None for other parts."""
    for prefix in LM_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    if key.startswith("model.") and not key.startswith(("model.vision_tower", "model.multi_modal_projector")):
        return key
    return None


def load_gemma2_folder(folder, gemma2_config):
    """Gemma-2 LM of a PaliGemma2 (or plain Gemma-2) HF folder as a Gemma2ForCausalLM in torch's default dtype
    (fp32, or bf16 when the model is built under `torch.set_default_dtype(torch.bfloat16)`: a bf16 paper LM
    then never exists in fp32).

    The folder's LM sizes and every key/shape (safetensors headers) are checked against
    `gemma2_config` first; the weights then load through transformers without a random init
    of the 2.6 B parameters (its SigLIP tower and projector are skipped).
    """
    from transformers import Gemma2ForCausalLM

    folder = Path(folder)
    text_cfg = _lm_text_config(folder)
    wrong = [f"{k} {text_cfg[k]} vs model {getattr(gemma2_config, k)}" for k in LM_CONFIG_FIELDS
             if k in text_cfg and text_cfg[k] != getattr(gemma2_config, k)]
    if wrong:
        raise ValueError(f"{folder / 'config.json'} does not match the model's LM config: {'; '.join(wrong[:3])}")
    shapes = {_lm_key(k): v for k, v in _safetensors_shapes(folder).items() if _lm_key(k) is not None}
    if not shapes:
        raise ValueError(f"{folder} has no Gemma-2 LM weights (keys language_model.model.*)")
    shapes.pop("lm_head.weight", None)  # tied to embed_tokens
    with torch.device("meta"):
        expected = {k: v for k, v in Gemma2ForCausalLM(gemma2_config).state_dict().items() if k != "lm_head.weight"}
    check_state_dict(expected, shapes, source=f"LM weights in {folder}")
    mapping = {rf"^{prefix.replace('.', chr(92) + '.')}": "model." for prefix in LM_PREFIXES}
    with _quiet_transformers():
        lm = Gemma2ForCausalLM.from_pretrained(
            str(folder), config=gemma2_config, key_mapping=mapping, dtype=torch.get_default_dtype(), local_files_only=True,
            attn_implementation=gemma2_config._attn_implementation,
        )
    log.info("loaded Gemma-2 LM weights from %s (%d tensors)", folder, len(shapes))
    return lm


class _quiet_transformers:
    """Silence transformers' report of the PaliGemma vision keys it skips (we checked the LM keys ourselves)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_header(path):
    """{name: {"dtype", "shape", "data_offsets"}} of a .safetensors file and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
    except (OSError, ValueError) as exc:  # ValueError covers bad UTF-8 and JSON
        raise ValueError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a readable safetensors file (no JSON header)")
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_exactly(f, buffer):
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError(f"{f.name} ends early: truncated .safetensors file")
        done += n


def copy_safetensors_into(path, targets):
    """Copy every tensor of a .safetensors file into `targets[name]` (same shape) with plain file reads.

    Why not `safe_open(...).get_tensor`: it reads through a memory map, and every mapped page it touches
    counts in the process's RSS until the file is closed, so loading a 5.8 GB bf16 paper model peaked at
    the model plus the whole file (11.8 GB measured). Reading straight into each parameter peaks at the
    model alone, plus one tensor when the file's dtype differs from the model's (the cast needs it).
    """
    header, data_start = safetensors_header(path)
    with open(path, "rb", buffering=0) as f:
        for name, info in header.items():
            target = targets[name]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which RadDiagSeg weights never use")
            begin, end = info["data_offsets"]
            if target.numel() == 0:
                continue
            f.seek(data_start + begin)
            direct = target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
            buffer = target if direct else torch.empty(info["shape"], dtype=dtype)
            if buffer.numel() * buffer.element_size() != end - begin:
                raise ValueError(f"{path}: tensor {name} holds {end - begin} bytes, expected {tuple(info['shape'])} {dtype}")
            _read_exactly(f, buffer.reshape(-1).view(torch.uint8).numpy())
            if not direct:
                target.copy_(buffer)
