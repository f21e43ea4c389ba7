"""The target and diagnosis vocabulary (`resources/vocabulary.json`) and lookups by name or synonym.

Targets have a canonical name, synonyms, a role (organ / abnormality), a colour and codes; diagnoses name
their organ and abnormality. `templates` writes questions and answers with these names; the scorer, the
dataset builders, the findings and the app look names up here.
"""

import functools
import json
import random
from importlib import resources


@functools.lru_cache(maxsize=1)
def load():
    """The parsed `resources/vocabulary.json`: targets (names, synonyms, roles, colours, codes) and diagnoses."""
    text = resources.files("raddiagseg").joinpath("resources/vocabulary.json").read_text()
    return json.loads(text)


def targets():
    """Canonical target name -> its vocabulary entry."""
    return {t["name"]: t for t in load()["targets"]}


def target_names(name):
    """All names (canonical first, then synonyms) that refer to target `name`."""
    entry = targets().get(name)
    return [name] + list(entry["synonyms"]) if entry else [name]


def normalise_label(text):
    """Label text as compared: lower case, hyphens as spaces, surrounding punctuation and bullets stripped."""
    return " ".join(text.lower().replace("-", " ").strip(" \t\n:,;.-*•").split())


def canonical_target(text):
    """Map label text (a name or synonym, any case, surrounding punctuation ignored) to its canonical target name, or None.

    A synonym shared by several targets (e.g. "tumour") maps to None: callers that know the
    candidate targets should use `matches_target` instead.
    """
    key = normalise_label(text)
    hits = {t["name"] for t in load()["targets"] if key in (normalise_label(n) for n in [t["name"], *t["synonyms"]])}
    return hits.pop() if len(hits) == 1 else None


def matches_target(text, name):
    """True when label text names target `name` by its canonical name or one of its synonyms."""
    key = normalise_label(text)
    return any(key == normalise_label(n) for n in target_names(name))


def implicit_descriptions(name):
    """The vocabulary's implicit descriptions of target `name` (reasoning segmentation); [] when it has none."""
    entry = targets().get(name)
    return list(entry.get("implicit", [])) if entry else []


def sample_label(name, rng: random.Random, synonym_prob=0.3):
    """A name for target `name`: the canonical one, or with probability `synonym_prob` a random synonym."""
    names = target_names(name)
    if len(names) > 1 and rng.random() < synonym_prob:
        return rng.choice(names[1:])
    return name
