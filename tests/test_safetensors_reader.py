"""Checkpoint weights are read with plain file reads (no memory map), into parameters of any dtype."""

import pytest
import torch
from safetensors.torch import save_file

from raddiagseg.model.weights import copy_safetensors_into


def saved(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).half(),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_reads_every_tensor_into_targets_of_the_same_or_another_dtype(tmp_path):
    path, tensors = saved(tmp_path)
    targets = {
        "bf16": torch.zeros(3, 5, dtype=torch.bfloat16),  # same dtype: read in place
        "f32": torch.zeros(7, dtype=torch.bfloat16),  # cast
        "f16": torch.zeros(2, 2, 2),  # fp16 file -> fp32 model, as the shipped demo model loads
        "mask": torch.zeros(3, dtype=torch.bool),
        "scalar": torch.zeros(()),
        "empty": torch.zeros(0, 4),
    }
    copy_safetensors_into(path, targets)
    for name, expected in tensors.items():
        assert torch.equal(targets[name], expected.to(targets[name].dtype)), name


def test_truncated_file_is_a_clear_error(tmp_path):
    path, _ = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    targets = {"bf16": torch.zeros(3, 5, dtype=torch.bfloat16), "f32": torch.zeros(7), "f16": torch.zeros(2, 2, 2),
               "mask": torch.zeros(3, dtype=torch.bool), "scalar": torch.zeros(()), "empty": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match="truncated"):
        copy_safetensors_into(path, targets)


def test_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    from raddiagseg.model.weights import safetensors_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        safetensors_header(path)
