"""Weight-only int8 for CPU inference (opt-in: `quantize_model(model)`, `raddiagseg predict --quantize int8`, the
app's `--conf quantize int8`; `benchmarks/int8_lm.py` compares it with bf16).

Every Linear of the chosen components keeps its weight as int8 with one scale per output row (symmetric, chosen
by torchao's quantization primitives) and multiplies with PyTorch's own CPU kernel `aten._weight_int8pack_mm`,
which reads the int8 weight directly. Why not torchao's `Int8WeightOnlyConfig`: in eager mode on CPU its linear
turns the whole int8 weight back into the activation dtype at every call (its fast path needs torch.compile),
which reads more memory than the bf16 weight it replaces. Measured on the 2-core box for one 2304 x 9216
Gemma-2 MLP matrix (thread CPU time, bf16 activations): 1 token 5.6 -> 3.8 ms, 8 tokens 36.9 -> 12.5 ms,
300 tokens 1376 -> 499 ms, relative error 0.8-1.1 % of the output's range.

The LM's LoRA adapters are merged into its weights first and the tied LM head gets its own int8 copy (the
embedding table stays as it is: a lookup reads one row). Weights are quantized ROW_BLOCK rows at a time, so quantizing
needs little memory beyond the model (before: a bf16 copy of the head and a float32 copy of each whole weight, 12.3 GB
peak for the paper preset). Modes: "int8" (the Gemma-2 LM and its head) or "int8-all"
(also the SAM image encoder, the CLIP trunk, the projector's MLPs and the mask decoder's Linear layers).
"""

from __future__ import annotations

import torch
from torch import nn

# the kernel's activations: with fp32 ones it takes a slow path (measured 7-13x slower than a plain fp32 Linear for
# the demo LM's 256 x 768 matrices on one token), with bf16 ones its vectorised path (faster than the fp32 Linear)
COMPUTE_DTYPE = torch.bfloat16
MODES = ("int8", "int8-all")  # int8: the LM and its head; int8-all: every Linear of the image encoders too


ROW_BLOCK = 4096  # rows quantized at a time: the float32 copy torchao quantizes from stays small (a 257k-row head: 38 MB)


class Int8WeightOnlyLinear(nn.Module):
    """A Linear whose weight is int8 (one scale per output row); it multiplies in bf16 and returns the input's dtype."""

    def __init__(self, linear: nn.Linear = None, weight=None, bias=None):
        """From a Linear, or from a `weight` (out, in) and `bias` (e.g. the embedding table a tied LM head reads)."""
        super().__init__()
        from torchao.quantization import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        if linear is not None:
            weight, bias = linear.weight, linear.bias
        weight = weight.detach()
        qdata, scales = [], []
        for start in range(0, weight.shape[0], ROW_BLOCK):  # per-row scales: blocks of rows quantize alike
            block = Int8Tensor.from_hp(weight[start:start + ROW_BLOCK].float(), granularity=PerRow())
            qdata.append(block.qdata)
            scales.append(block.scale.reshape(-1).to(COMPUTE_DTYPE))
        self.out_features, self.in_features = weight.shape
        self.register_buffer("qweight", torch.cat(qdata).contiguous())
        self.register_buffer("scale", torch.cat(scales))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _replace_linears(module: nn.Module, skip=()):
    """Swap every nn.Linear under `module` (not the ones in `skip`) for an Int8WeightOnlyLinear -> how many."""
    count = 0
    for name, child in list(module.named_children()):
        if child in skip:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
            count += 1
        else:
            count += _replace_linears(child, skip)
    return count


def quantize_model(model, mode: str = "int8"):
    """Quantize `model` (a RadDiagSegModel, for inference) in place -> the number of Linear layers swapped."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ValueError("weight-only int8 needs the torchao package (pip install torchao)") from None
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ValueError(f"this torch ({torch.__version__}) has no aten._weight_int8pack_mm kernel")
    lm = model.language_model
    if lm.has_lora:  # fold the adapters into the base weights, then drop the peft wrappers
        lm.lm = lm.lm.merge_and_unload()
    causal = lm.causal_lm
    # the tied head gets its own int8 copy, quantized from the embedding table it shares (which stays as it is)
    causal.lm_head = Int8WeightOnlyLinear(weight=causal.model.embed_tokens.weight)
    count = 1 + _replace_linears(causal)
    if mode == "int8-all":
        count += _replace_linears(model.vision_backbone) + _replace_linears(model.clip_encoder)
        # nn.MultiheadAttention reads its out_proj weight directly, and the LM -> prompt projection's weight dtype is
        # read to cast its input: those two stay as they are (both small)
        count += _replace_linears(model.projector, skip={model.projector.cross_attn})
        count += _replace_linears(model.mask_decoder, skip={model.mask_decoder.text_to_prompt})
    model.quantization = {"mode": mode, "linear_layers": count}
    model.eval()
    return count
