"""Processor: turns training samples (`data.dataset` samples: image, question, answer, one mask per seg token) into model tensors, and prompts into token ids.

Sequence layout (as PaliGemma): `<image>`×N, bos, question, "\n" | answer, eos. Labels are -100
on the prompt and padding, so only the answer (seg tokens included) is learnt. Picklable, so
DataLoader workers can collate.
"""

import numpy as np
import torch
import torch.nn.functional as F

from raddiagseg.model.tokenizer import special_token_ids

IGNORE_INDEX = -100


class RadDiagSegProcessor:
    def __init__(self, tokenizer, config):
        self.tokenizer = tokenizer
        self.num_image_tokens = config.projector.num_queries
        self.vision_size = config.vision.image_size
        self.clip_size = config.clip.image_size
        self.mask_size = config.mask_loss_size
        self.max_question_tokens = config.max_question_tokens
        self.max_answer_tokens = config.max_answer_tokens
        self.ids = special_token_ids(tokenizer, config.num_seg_tokens)
        self.seg_id_to_index = {tid: i for i, tid in enumerate(self.ids["seg"])}
        self.seg_tokens = [tokenizer.convert_ids_to_tokens(t) for t in self.ids["seg"]]

    # --- text -------------------------------------------------------------------------------
    def _encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question):
        """Token ids of the prompt for `question` (image placeholders included)."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        q = self._encode(question.strip())[: self.max_question_tokens]
        return [self.ids["image"]] * self.num_image_tokens + [self.ids["bos"]] + q + self._encode("\n")

    def answer_ids(self, answer):
        ids = self._encode(answer)
        if len(ids) + 1 > self.max_answer_tokens:
            raise ValueError(f"answer has {len(ids)} tokens, more than max_answer_tokens={self.max_answer_tokens - 1}")
        return ids + [self.ids["eos"]]

    def count_seg_tokens(self, ids):
        return sum(1 for t in ids if t in self.seg_id_to_index)

    # --- images -----------------------------------------------------------------------------
    @staticmethod
    def _as_image(image):
        array = np.asarray(image, dtype=np.float32)
        if array.ndim != 2 or min(array.shape) < 2:
            raise ValueError(f"expected a 2D image (H, W), got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array))

    @staticmethod
    def _resize(x, size, mode="bilinear"):
        x = x[:, None] if x.dim() == 3 else x[None, None]
        return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)[:, 0]

    def images(self, images):
        """List of (H, W) arrays in [0, 1] -> dict(vision (B,S,S), clip (B,C,C), image_sizes (B,2))."""
        tensors = [self._as_image(im) for im in images]
        return {
            "vision": torch.stack([self._resize(t, self.vision_size)[0] for t in tensors]),
            "clip": torch.stack([self._resize(t, self.clip_size)[0] for t in tensors]),
            "image_sizes": torch.tensor([t.shape for t in tensors], dtype=torch.long),
        }

    def resize_mask(self, mask):
        m = torch.from_numpy(np.ascontiguousarray(np.asarray(mask) > 0)).float()
        return (self._resize(m, self.mask_size)[0] > 0.5).float()

    # --- batches ----------------------------------------------------------------------------
    def collate(self, samples):
        """list[training sample] -> dict of tensors for `RadDiagSegModel.forward`.

        masks (M, S, S) float {0, 1} at `mask_loss_size`, listed sample by sample in seg-token
        order; mask_image_index (M,) says which sample each belongs to.
        """
        if not samples:
            raise ValueError("collate needs at least one sample")
        sequences, labels, masks, mask_index = [], [], [], []
        for b, s in enumerate(samples):
            prompt = self.prompt_ids(s["question"])
            answer = self.answer_ids(s["answer"])
            n_seg = self.count_seg_tokens(answer)
            sample_masks = list(s.get("masks") or [])
            if n_seg != len(sample_masks):
                raise ValueError(
                    f"sample {s.get('id', b)!r}: answer has {n_seg} seg tokens but {len(sample_masks)} masks were given"
                )
            image_shape = np.asarray(s["image"]).shape
            for m in sample_masks:
                if np.asarray(m).shape != image_shape:
                    raise ValueError(f"sample {s.get('id', b)!r}: mask shape {np.asarray(m).shape} != image shape {image_shape}")
                masks.append(self.resize_mask(m))
                mask_index.append(b)
            sequences.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        length = max(len(s) for s in sequences)
        pad = self.ids["pad"]
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        label_ids = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), length), dtype=torch.long)
        for b, (seq, lab) in enumerate(zip(sequences, labels)):
            input_ids[b, : len(seq)] = torch.tensor(seq)
            label_ids[b, : len(lab)] = torch.tensor(lab)
            attention[b, : len(seq)] = 1
        batch = self.images([s["image"] for s in samples])
        batch.update(
            input_ids=input_ids,
            attention_mask=attention,
            labels=label_ids,
            masks=torch.stack(masks) if masks else torch.zeros((0, self.mask_size, self.mask_size)),
            mask_image_index=torch.tensor(mask_index, dtype=torch.long),
        )
        return batch
