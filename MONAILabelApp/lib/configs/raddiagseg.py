"""Configuration of the `raddiagseg` model for this app: where the model and work files live, and its tasks.

`--conf` keys (all optional):

    model_path          base model folder (default: MONAILabelApp/model/raddiagseg-demo, the shipped demo)
    work_dir            published models, training runs, train_stats.json
                        (default: <studies>/.raddiag for a local datastore, else ~/.cache/raddiag/monailabel/<hash>)
    feature_cache_size  slices whose image features are kept in memory (default 64; 0 disables)
    image_cache_mb      memory for decoded image files, so repeat questions on a study skip reading it
                        (default 512; 0 disables)
    device              cpu | cuda | cuda:N (default: cuda when available)
    dtype               auto | float32 | bfloat16 | mixed (image encoders bf16, LM + mask decoder fp32);
                        default auto: bf16 on GPU; on CPU bf16 for the paper preset, mixed for the demo
                        preset when the CPU has native bf16, else fp32 (lib/model_store.serving_precision)
    reference_manifest  manifest (or its folder) of the data the model was trained on: the train task replays its
                        train rows and checks candidates on its val rows (default: the model folder's
                        reference.json; without either, forgetting is unguarded, as train_stats says)
    uncertain_samples   sampled answers per image for the `uncertain` strategy (default 3)
    uncertain_method    sampling (pairwise disagreement of sampled answers, default) | tts (the
                        disagreement test-time scaling reports: uncertain_samples answers x 3 perturbed prompts)
    uncertain_balance   true: pick from the modality with the fewest labelled images (default false)
    compile_decode      true: compile the LM's decode step (raddiagseg.model.static_decode; default false)
"""

import hashlib
import os
from pathlib import Path

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning.uncertain import Uncertain
from lib.slice_cache import SliceCache
from lib.image_cache import ImageCache
from lib.infers.raddiagseg import RadDiagSegInfer
from lib.model_runner import ModelRunner
from lib.model_store import ModelStore
from lib.trainers.raddiagseg import RadDiagSegTrain


def _positive_int(conf, key, default):
    value = conf.get(key, default)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} must be an integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"--conf {key} must be >= 0, got {value}")
    return value


def _flag(conf, key, default=False):
    from lib.infer_params import FALSE_WORDS, TRUE_WORDS

    value = str(conf.get(key, default)).strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"--conf {key} must be true or false, got {conf.get(key)!r}")
    return value in TRUE_WORDS


def default_work_dir(studies):
    if studies and not str(studies).startswith(("http://", "https://")) and os.path.isdir(studies):
        return Path(studies) / ".raddiag"
    digest = hashlib.sha1(str(studies).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "raddiag" / "monailabel" / digest


class RadDiagSegAppConfig:
    """The app's side of the `raddiagseg` model: its store, caches, runner and MONAI Label tasks (the model's own
    settings are `raddiagseg.model.config.RadDiagSegConfig`). main.py builds it; MONAI Label does not scan for it."""

    name = "raddiagseg"

    def __init__(self, app_dir, studies, conf):
        self.model_path = Path(conf.get("model_path") or Path(app_dir) / "model" / "raddiagseg-demo").expanduser()
        self.work_dir = Path(conf.get("work_dir") or default_work_dir(studies)).expanduser()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cache = SliceCache(_positive_int(conf, "feature_cache_size", 64))
        self.images = ImageCache(_positive_int(conf, "image_cache_mb", 512) * 2**20)
        self.store = ModelStore(self.model_path, self.work_dir, device=conf.get("device") or None,
                                dtype=conf.get("dtype") or "auto", quantize=conf.get("quantize") or None,
                                compile_decode=_flag(conf, "compile_decode"))
        self.store.on_change.append(lambda version: self.cache.clear())
        try:
            self.runner = ModelRunner(self.store, self.cache, drafts=conf.get("answer_drafts") or "slice")
        except ValueError as error:
            raise ValueError(f"--conf {error}") from None
        self.reference_manifest = conf.get("reference_manifest") or None
        self.uncertain_samples = max(2, _positive_int(conf, "uncertain_samples", 3))
        self.uncertain_method = conf.get("uncertain_method", "sampling")
        if self.uncertain_method not in ("sampling", "tts"):
            raise ValueError(f"--conf uncertain_method must be sampling or tts, got {self.uncertain_method!r}")
        self.uncertain_balance = _flag(conf, "uncertain_balance")

    def infer(self):
        return RadDiagSegInfer(self.store, self.runner, images=self.images)

    def trainer(self):
        return RadDiagSegTrain(self.store, self.work_dir, reference_manifest=self.reference_manifest)

    def strategies(self):
        return {
            "uncertain": Uncertain(self.store, self.runner, n_samples=self.uncertain_samples, method=self.uncertain_method,
                                   balance=self.uncertain_balance),
            "random": Random(),
            "first": First(),
        }
