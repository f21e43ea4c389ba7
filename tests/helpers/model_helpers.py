"""Phantom-like samples drawn with numpy for the model tests (no files, no downloads)."""

import numpy as np
import pytest
import torch

from raddiagseg import templates


def ellipse(shape, center, radii):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1.0


def phantom_sample(kind, size=96, seed=0, question=templates.DEFAULT_QUESTION):
    """A 'CT slice' with an organ ellipse and a brighter lesion inside; answer from the 3-step template with 2 masks."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    if kind == "liver":
        organ = ellipse(shape, (0.45 * size, 0.35 * size), (0.28 * size, 0.22 * size))
        lesion = ellipse(shape, (0.40 * size, 0.30 * size), (0.10 * size, 0.09 * size))
        diagnosis, labels = "Liver tumour", ["liver", "liver tumour"]
    else:
        organ = ellipse(shape, (0.62 * size, 0.62 * size), (0.12 * size, 0.30 * size))
        lesion = ellipse(shape, (0.62 * size, 0.74 * size), (0.07 * size, 0.08 * size))
        diagnosis, labels = "Pancreas tumour", ["pancreas", "pancreas tumour"]
    body = ellipse(shape, (0.5 * size, 0.5 * size), (0.47 * size, 0.47 * size))
    image = 0.15 * body + 0.35 * organ + 0.35 * lesion + rng.normal(0, 0.02, shape)
    return {
        "id": f"{kind}_{seed}",
        "task": "vqaseg",
        "modality": "ct",
        "image": np.clip(image, 0, 1).astype(np.float32),
        "question": question,
        "answer": templates.vqaseg_answer(True, diagnosis, labels),
        "masks": [organ.astype(np.uint8), (lesion & organ).astype(np.uint8)],
    }


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread: on 2 cores shared with other jobs, 2 OpenMP threads thrash (steps up to 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHORT_QUESTION = "Is there an abnormality? If yes, diagnose and segment it."


def four_samples():
    """Two liver and two pancreas phantoms of different sizes: the overfit and forward tests' batch."""
    return [
        phantom_sample("liver", size=96, seed=0, question=SHORT_QUESTION),
        phantom_sample("pancreas", size=96, seed=1, question=SHORT_QUESTION),
        phantom_sample("liver", size=80, seed=2, question=SHORT_QUESTION),
        phantom_sample("pancreas", size=112, seed=3, question=SHORT_QUESTION),
    ]
