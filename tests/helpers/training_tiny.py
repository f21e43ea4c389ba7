"""A tiny stand-in for RadDiagSeg-M that follows the model contract of docs/INTERFACES.md (collate, forward ->
loss parts, trainable_parameters, save_pretrained), used to test the training loop's mechanics (DDP, resume)
in seconds. Also a script: `torchrun --nproc_per_node K tests/helpers/training_tiny.py OUT [options]` trains it and
writes, per rank, the loss and a digest of the parameters after every step to OUT/trace_rank{r}.jsonl.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TinyProcessor:
    def collate(self, samples):
        images = torch.stack([torch.as_tensor(s["image"]) for s in samples])[:, None]
        labels = torch.tensor([s["label"] for s in samples])
        masks = torch.stack([torch.as_tensor(s["mask"], dtype=torch.float32) for s in samples])[:, None]
        return {"images": images, "labels": labels, "masks": masks, "index": torch.tensor([s["index"] for s in samples])}


class TinyModel(nn.Module):
    """Frozen 'encoder' conv + trainable text head and mask head; loss = CE + 2 BCE + 0.5 Dice."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoder = nn.Conv2d(1, 4, 3, padding=1)
        self.text_head = nn.Linear(4, 3)
        self.mask_head = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.processor = TinyProcessor()

    def trainable_parameters(self):
        return list(self.text_head.parameters()) + list(self.mask_head.parameters())

    def forward(self, batch):
        feats = torch.relu(self.encoder(batch["images"]))
        loss_text = nn.functional.cross_entropy(self.text_head(feats.mean((2, 3))), batch["labels"])
        logits = self.mask_head(feats)
        loss_bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["masks"])
        prob = torch.sigmoid(logits)
        inter = (prob * batch["masks"]).sum((1, 2, 3))
        loss_dice = (1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + batch["masks"].sum((1, 2, 3)) + 1)).mean()
        loss = loss_text + 2.0 * loss_bce + 0.5 * loss_dice
        return {"loss": loss, "loss_text": loss_text, "loss_bce": loss_bce, "loss_dice": loss_dice,
                "n_masks": torch.tensor(float(len(batch["labels"])))}

    def save_pretrained(self, folder):
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"kind": "tiny"}))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))


def tiny_dataset(n=40, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = int(rng.integers(0, 3))
        image = rng.normal(size=(8, 8)).astype(np.float32) + label
        mask = (image > label).astype(np.uint8)
        samples.append({"image": image, "label": label, "mask": mask, "index": i})
    return samples


def epoch_order_fn(n, seed=0):
    def order(epoch):
        return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]

    return order


def param_digest(model):
    h = hashlib.sha256()
    for p in model.trainable_parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def run(out, max_steps=4, batch_size=2, grad_accum=2, save_every=2, resume=False, pause_at=None, data_dir=None):
    """Train the tiny model; returns (TrainResult, model). `pause_at`: after that step, write OUT/paused and sleep."""
    from raddiagseg.training import TrainConfig, train

    out = Path(out)
    data_dir = Path(data_dir or out.parent)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "manifest.jsonl").touch()
    model = TinyModel()
    data = tiny_dataset()
    rank = int(__import__("os").environ.get("RANK", "0"))
    trace = out / f"trace_rank{rank}.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def progress(info):
        with open(trace, "a") as f:
            f.write(json.dumps({"step": info["step"], "loss": info["loss"], "digest": param_digest(model),
                                "indices": info["sample_indices"]}) + "\n")
        if pause_at is not None and info["step"] == pause_at:
            (out / "paused").write_text(str(info["step"]))
            time.sleep(600)

    def evaluate(m):
        return -float(sum(p.detach().abs().sum() for p in m.trainable_parameters()))

    config = TrainConfig(data=str(data_dir), out=str(out), stage="finetune", preset="demo", max_steps=max_steps,
                         batch_size=batch_size, grad_accum=grad_accum, lr=0.05, warmup=1, val_every=save_every,
                         save_every=save_every, resume=resume, progress_bar=False, device="cpu")
    result = train(config, progress=progress, model=model, dataset=data, epoch_order=epoch_order_fn(len(data)),
                   collate=model.processor.collate, evaluate=evaluate, progress_on_all_ranks=True)
    (out / f"final_rank{rank}.json").write_text(json.dumps({"digest": param_digest(model), "steps": result.steps}))
    return result, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at", type=int)
    a = parser.parse_args()
    run(a.out, a.max_steps, a.batch_size, a.grad_accum, a.save_every, a.resume, a.pause_at)
    sys.exit(0)
