"""The data order of a run: which dataset indices each rank trains on at each optimizer step.

The sample stream is the task-ratio sampler's order for epoch 0, then epoch 1, ... (a pure
function of the seed and the epoch). Optimizer step s takes the next `effective batch` indices
of that stream and cuts them into micro-batches in order; micro-batch j goes to rank
j % world_size. So a K-process run trains on exactly the micro-batches of a 1-process run with the
same effective batch, and resuming at step s only needs s: the position in the stream is s x the
effective batch (epoch = position // epoch length, offset = position % epoch length).
"""

import torch.utils.data


class EpochIndexed(torch.utils.data.Dataset):
    """Dataset view indexed by (epoch, index): sets the epoch first, so per-sample randomness
    (synonyms, augmentation: a function of seed, epoch and index) is right in every worker process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class StepBatchPlan(torch.utils.data.Sampler):
    """Batch sampler yielding this rank's micro-batches (lists of (epoch, index)) from `start_step` to `max_steps`."""

    def __init__(self, epoch_order, micro_batch, grad_accum, world_size=1, rank=0, start_step=0, max_steps=1):
        self.epoch_order = epoch_order  # epoch -> list of dataset indices (one epoch of the ratio sampler)
        self.micro_batch = int(micro_batch)
        self.grad_accum = int(grad_accum)  # per rank
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.start_step = int(start_step)
        self.max_steps = int(max_steps)
        self._cache = {}

    @property
    def step_size(self):
        """Samples consumed by one optimizer step over all ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    def _epoch(self, epoch):
        if epoch not in self._cache:
            if len(self._cache) > 1:  # keep at most two epochs in memory
                self._cache.pop(min(self._cache))
            self._cache[epoch] = list(self.epoch_order(epoch))
            if not self._cache[epoch]:
                raise ValueError("the training split has no samples for this stage's tasks")
        return self._cache[epoch]

    def position(self, step):
        """(epoch, offset in epoch) of the first sample of optimizer step `step`."""
        consumed = step * self.step_size
        length = len(self._epoch(0)) if 0 in self._cache or not self._cache else len(next(iter(self._cache.values())))
        return consumed // length, consumed % length

    def step_indices(self, step):
        """All (epoch, index) pairs of optimizer step `step`, over all ranks, in stream order."""
        epoch, offset = self.position(step)
        out = []
        while len(out) < self.step_size:
            order = self._epoch(epoch)
            take = order[offset : offset + self.step_size - len(out)]
            out += [(epoch, i) for i in take]
            epoch, offset = epoch + 1, 0
        return out

    def rank_micro_batches(self, step):
        """This rank's micro-batches of step `step`, in accumulation order."""
        indices = self.step_indices(step)
        chunks = [indices[i : i + self.micro_batch] for i in range(0, len(indices), self.micro_batch)]
        return chunks[self.rank :: self.world_size]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield from self.rank_micro_batches(step)

    def __len__(self):
        return max(0, self.max_steps - self.start_step) * self.grad_accum
