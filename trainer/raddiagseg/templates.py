"""Question and answer templates (paper 001, Figures 3, 9, 10); the names they use: `raddiagseg.vocabulary`.

One place that data building, training, the model's demo tokenizer corpus, the scorer and
the app all read, so that what the model is taught is exactly what the others parse.
"""

import re

from raddiagseg.vocabulary import load as vocabulary
from raddiagseg.vocabulary import target_names

NUM_SEG_TOKENS = 16
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG_TOKENS))
SEG_TOKEN_RE = re.compile(r"<seg\d{3}>")  # a seg token in an answer text: every SEG_TOKENS entry, in any answer
IMAGE_TOKEN = "<image>"

MODALITY_NAMES = {"ct": "CT scan", "xray": "chest X-ray", "mri": "MRI scan"}

DEFAULT_QUESTION = (
    "Please analyze the image and answer the following:\n"
    "1. Is there any abnormality present?\n"
    "2. If yes, what is the diagnosis?\n"
    "3. If yes, provide segmentation masks of the organ and abnormality."
)

NEGATIVE_ANSWER = "1. No"

REFSEG_QUESTION = "Please segment {target} in the {modality}."
REFSEG_ANSWER = "Here is the mask for {target} {seg}."

# Diagnosis chain-of-thought (paper 003's "diagnosis CoT"): the answer reasons modality -> finding ->
# diagnosis, then gives the usual 3-step answer after COT_CONCLUSION; parsers read what follows it.
COT_QUESTION = DEFAULT_QUESTION + "\nReason step by step (modality, finding, diagnosis) before the answer."
COT_CONCLUSION = "Conclusion:"
COT_NEGATIVE_FINDING = "no abnormality is seen"
COT_UNKNOWN_FINDING = "an abnormality"

# Reasoning segmentation (paper 002): the question describes the target without naming it.
REASONSEG_QUESTIONS = (
    "Please segment {description} in the {modality}.",
    "Show me {description} in this {modality}.",
    "Which region is {description}? Segment it in the {modality}.",
)
REASONSEG_ANSWER = "{description}: {target}.\n" + REFSEG_ANSWER


def seg_token(i):
    if not 0 <= i < NUM_SEG_TOKENS:
        raise ValueError(f"at most {NUM_SEG_TOKENS} seg tokens per answer, asked for index {i}")
    return SEG_TOKENS[i]


def vqaseg_answer(detection, diagnosis=None, target_labels=()):
    """The 3-step answer. Positive: detection, diagnosis and one line `- <label> <segNNN>` per target, in order."""
    if not detection:
        return NEGATIVE_ANSWER
    lines = ["1. Yes", f"2. {diagnosis}"]
    if target_labels:
        lines.append("3. Segmentation masks:" if len(target_labels) > 1 else "3. Segmentation mask:")
        lines += [f"- {label} {seg_token(i)}" for i, label in enumerate(target_labels)]
    return "\n".join(lines)


def diagnosis_finding(diagnosis):
    """What the image shows for vocabulary diagnosis `diagnosis` (its `finding`), or a generic phrase."""
    for d in vocabulary()["diagnoses"]:
        if diagnosis and d["label"].lower() == diagnosis.lower():
            return d.get("finding") or COT_UNKNOWN_FINDING
    return COT_UNKNOWN_FINDING


def cot_reasoning(detection, modality, diagnosis=None):
    """The reasoning lines of a chain-of-thought answer, from the ground truth: modality -> finding -> diagnosis."""
    lines = [f"Modality: {MODALITY_NAMES.get(modality, modality)}."]
    if not detection:
        lines += [f"Finding: {COT_NEGATIVE_FINDING}.", "So the image is normal."]
    else:
        lines += [f"Finding: {diagnosis_finding(diagnosis)}."]
        lines += [f"So the diagnosis is {diagnosis}." if diagnosis else "So the image is abnormal."]
    return "\n".join(lines)


def vqaseg_cot_answer(detection, modality, diagnosis=None, target_labels=()):
    """A chain-of-thought 3-step answer: reasoning, then `COT_CONCLUSION` and the plain `vqaseg_answer`."""
    return f"{cot_reasoning(detection, modality, diagnosis)}\n{COT_CONCLUSION}\n{vqaseg_answer(detection, diagnosis, target_labels)}"


def reasonseg_question(description, modality, variant=0):
    template = REASONSEG_QUESTIONS[variant % len(REASONSEG_QUESTIONS)]
    return template.format(description=description, modality=MODALITY_NAMES.get(modality, modality))


def reasonseg_answer(description, target_label):
    """Resolves the description to its target, then the Ref-Seg answer ("Here is the mask for liver <seg000>.")."""
    return REASONSEG_ANSWER.format(description=description[:1].upper() + description[1:], target=target_label, seg=seg_token(0))


def refseg_question(target_label, modality):
    return REFSEG_QUESTION.format(target=target_label, modality=MODALITY_NAMES.get(modality, modality))


def refseg_answer(target_label):
    return REFSEG_ANSWER.format(target=target_label, seg=seg_token(0))


def template_corpus():
    """Every text the templates can produce, for training the demo tokenizer offline."""
    texts = [DEFAULT_QUESTION, NEGATIVE_ANSWER]
    vocab = vocabulary()
    for t in vocab["targets"]:
        for label in target_names(t["name"]):
            for modality in MODALITY_NAMES:
                texts.append(refseg_question(label, modality))
            texts.append(refseg_answer(label))
    for d in vocab["diagnoses"]:
        organ, abn = d["organ"], d["abnormality"]
        labels = [organ] + ([abn] if abn else [])
        texts.append(vqaseg_answer(True, d["label"], labels))
        texts += [d["label"], *d["synonyms"]]
    return texts
