"""Weight-only int8 for CPU inference (opt-in: `quantize_model(model)`, `raddiagseg predict --quantize int8`, the
app's `--conf quantize int8`; `benchmarks/int8_lm.py` compares it with bf16).

Every Linear of the chosen components keeps its weight as int8 with one scale per output row (symmetric, chosen
by torchao's quantization primitives) and multiplies with PyTorch's own CPU kernel `aten._weight_int8pack_mm`,
which reads the int8 weight directly. Why not torchao's `Int8WeightOnlyConfig`: in eager mode on CPU its linear
turns the whole int8 weight back into the activation dtype at every call (its fast path needs torch.compile),
which reads more memory than the bf16 weight it replaces. The int8 kernel pays for one row at a time (a decode
step: half the bytes of the bf16 weight read); for a prefill of many rows it is 3-4x slower than bf16, so from
DEQUANT_ROWS rows on the layer makes bf16 weights block by block and multiplies in bf16 instead. Relative error
0.9-1.0 % of the output's range either way.

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
# From this many input rows on, the int8 kernel is slower than making bf16 weights (DEQUANT_BLOCK rows at a time) and
# multiplying in bf16. Measured on the 2-core box, one 9216 x 2304 Gemma-2 matrix, bf16 activations: 300 rows: bf16
# 33.6 ms, int8 kernel 134.5 ms, dequantized blocks 38.9 ms; 64 rows: 8.6 / 29.1 / 11.8 ms; 32 rows: 5.6 / 14.7 /
# 23.3 ms; 1 row (a decode step, 32768 x 2304): bf16 8.0 ms, int8 kernel 4.6 ms.
DEQUANT_ROWS = 48
DEQUANT_BLOCK = 1024


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
        if flat.shape[0] >= DEQUANT_ROWS:  # a prefill: bf16 weights made block by block, one bf16 matmul each
            y = torch.cat([torch.nn.functional.linear(flat, self.qweight[start:start + DEQUANT_BLOCK]
                                                      * self.scale[start:start + DEQUANT_BLOCK, None])
                           for start in range(0, self.out_features, DEQUANT_BLOCK)], dim=1)
        else:  # a decode step: the int8 kernel reads half the bytes of the bf16 weight
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
