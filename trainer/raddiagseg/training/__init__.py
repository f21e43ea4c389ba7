"""Two-stage training of RadDiagSeg-M (pretrain: Ref-Seg + VQA; finetune: VQA-Seg + VQA) and the demo model.

`from raddiagseg.training import TrainConfig, train`. `TrainConfig` is torch-free; `train` and
`TrainResult` import torch on first use, so the CLI stays fast to start.
"""

from raddiagseg.training.config import TrainConfig

__all__ = ["TrainConfig", "train", "TrainResult"]


def __getattr__(name):
    if name in ("train", "TrainResult"):
        from raddiagseg.training import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
