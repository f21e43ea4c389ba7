"""Where does a finding get lost? Linear probes on a model's CLIP patches and projector tokens.

For each model folder, a logistic regression is fitted on pooled (mean, max) features of VQA-Seg
training images and scored on held-out images, for the alignment caption ("ct pancreas: Pancreas
tumour", ...). A probe that reads the finding from the CLIP patches but not from the projector
tokens (the LM's only view of the image) points at the projector; one that reads it from the tokens
of a model whose LM still misses it points at the LM.

Usage:
  .venv/bin/python benchmarks/token_probe.py --train DATA/manifest.jsonl --test HELDOUT/manifest.jsonl MODEL [MODEL ...]
"""

import argparse
import sys

import numpy as np
import torch



def features(model, dataset, limit, batch=32):
    """(patch features, token features, captions) of up to `limit` evenly spread rows."""
    from raddiagseg.training.clip_align import caption, pool_tokens, resize_images

    picks = np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).astype(int)
    size = model.clip_encoder.config.image_size
    patches, tokens = [], []
    with torch.inference_mode():
        for start in range(0, len(picks), batch):
            idx = picks[start : start + batch].tolist()
            p = model.clip_encoder(model.clip_encoder.preprocess(resize_images(dataset, idx, size)))
            patches.append(pool_tokens(p).float().numpy())
            tokens.append(pool_tokens(model.projector(p)).float().numpy())
    return np.concatenate(patches), np.concatenate(tokens), [caption(dataset.rows[i]) for i in picks]


def probe(train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(train_x, train_y)
    hit = clf.predict(test_x) == np.array(test_y)
    per = {c: f"{hit[np.array(test_y) == c].mean():.2f}" for c in sorted(set(test_y))}
    return hit.mean(), per


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--train-images", type=int, default=1500)
    args = p.parse_args(argv)
    from raddiagseg import load_model
    from raddiagseg.data.dataset import ManifestDataset

    train = ManifestDataset(args.train, split="train", tasks=["vqaseg"])
    test = ManifestDataset(args.test, split=None, tasks=["vqaseg"])  # held-out phantoms: every split
    for folder in args.models:
        model = load_model(folder, device="cpu").eval()
        tp, tt, ty = features(model, train, args.train_images)
        hp, ht, hy = features(model, test, len(test))
        for name, a, b in (("CLIP patches", tp, hp), ("projector tokens", tt, ht)):
            acc, per = probe(a, ty, b, hy)
            print(f"{folder}: {name}: held-out caption accuracy {acc:.3f} {per}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
