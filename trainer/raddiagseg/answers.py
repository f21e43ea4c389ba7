"""Reading a model's answer text into detection, diagnosis and named seg tokens.

The scorer and the app both need to know what an answer *says*; models (ours while it trains,
and other people's) rarely write the exact template of `templates.vqaseg_answer`. This module
reads the 3-step answer leniently ("1. Yes", "1) yes.", "Yes, there is…", inline one-line answers,
bullets, echoed questions) and records every decision it takes in `ParsedAnswer.notes`, so a
benchmark report can show why a sample was scored the way it was.

Chain-of-thought answers (`templates.vqaseg_cot_answer`) reason first and conclude after
"Conclusion:"; only the conclusion is read as the answer, the reasoning is kept in
`ParsedAnswer.reasoning`.
"""

import dataclasses
import re

from raddiagseg.templates import SEG_TOKEN_RE
# "Conclusion:" / "**Conclusion**:" / "Final answer:" ending the reasoning of a chain-of-thought answer (the last one counts)
_CONCLUSION_RE = re.compile(r"(?:^|\n|(?<=[.!?])\s)\W*(?:conclusion|final answer)\W*:", re.IGNORECASE)
_REASONING_START_RE = re.compile(r"^\W*(?:reasoning|modality|finding)s?\s*:", re.IGNORECASE)

# A step number: "1." "1)" "(1)" "1:" "Step 1:" "**1.**" at the start of the text or after white space / punctuation.
_STEP_RE = re.compile(r"(?:^|(?<=[\s.;,:!?*#]))(?:step\s*)?\(?([123])\s*[.):](?=[\s*]|$)", re.IGNORECASE)

_YES_WORDS = ("yes", "true", "positive", "present", "abnormal", "y")
_NO_WORDS = ("no", "false", "negative", "absent", "normal", "none", "nothing", "n")
_FIRST_WORD_RE = re.compile(r"^[\W_]*([a-z]+)\b")
# Sentences that say yes or no without starting with the word itself.
_NEGATIVE_PHRASES = re.compile(
    r"\b(no (?:evidence of )?(?:visible |obvious |significant )?(?:abnormalit(?:y|ies)|lesions?|findings?|tumou?rs?|infections?)"
    r"|(?:is|appears|looks) (?:completely )?normal|unremarkable|not present|not detected|not seen)\b"
)
_POSITIVE_PHRASES = re.compile(
    r"\b(there (?:is|are) (?:an? )?(?:\w+ )?(?:abnormalit(?:y|ies)|lesions?|tumou?rs?|infections?|opacit(?:y|ies))"
    r"|abnormalit(?:y|ies) (?:is |are )?(?:present|detected|seen|visible))"
)
# Where the diagnosis text stops when no "3." follows it.
_SEGMENTATION_START_RE = re.compile(rf"segmentation masks?\b|\n\s*[-*•]|{SEG_TOKEN_RE.pattern}", re.IGNORECASE)
_DIAGNOSIS_PREFIX_RE = re.compile(
    r"^(?:if yes,?\s*)?(?:(?:the\s+)?(?:most likely\s+)?diagnosis(?:\s+is)?\s*[:\-]?\s*)", re.IGNORECASE
)
# What separates one "label <segNNN>" from the text before it.
_LABEL_BOUNDARY_RE = re.compile(r"\n|[:;,•*]|(?:(?<=\s)|^)-\s|\band\b|(?:(?<=\s)|^)\(?\d[.)]\s|\.\s", re.IGNORECASE)
# What precedes the label itself: "Here is the mask for", "the", a bare "Segmentation masks" heading.
_LABEL_PREFIX_RE = re.compile(
    r"^(?:here (?:is|are)\s+)?(?:the\s+)?(?:segmentation\s+)?(?:masks?(?:\s+(?:for|of)\b|$)\s*)?(?:the\s+)?",
    re.IGNORECASE,
)
_LABEL_STRIP = " \t-*•:,;.·"


@dataclasses.dataclass
class ParsedAnswer:
    """What an answer says. `detection` is None when step 1 cannot be read as yes or no."""

    detection: bool | None
    diagnosis: str | None
    segments: list = dataclasses.field(default_factory=list)  # [(label text, "<segNNN>")] in answer order
    notes: list = dataclasses.field(default_factory=list)  # one line per parse decision
    reasoning: str | None = None  # chain-of-thought text before the conclusion


def parse_answer(text):
    """Parse a (3-step) answer. Never raises on odd text: what could not be read is None plus a note."""
    notes = []
    if not isinstance(text, str) or not text.strip():
        return ParsedAnswer(None, None, [], ["empty answer"])
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    reasoning, text = split_reasoning(text, notes)
    if not text:
        return ParsedAnswer(None, None, [], notes + ["no answer after the reasoning"], reasoning)
    steps = _split_steps(text)
    if 1 in steps:
        step1 = steps[1]
        notes.append(f"step 1 text: {_quote(step1)}")
    else:
        step1 = text
        notes.append("no step numbers: read step 1 from the start of the answer")
    detection, rest = read_yes_no(step1, notes)

    if 2 in steps:
        diagnosis = clean_diagnosis(steps[2], notes)
        notes.append(f"step 2 read as diagnosis {_quote(diagnosis)}")
    elif rest:
        diagnosis = clean_diagnosis(rest, notes)
        if diagnosis:
            notes.append(f"no step 2: diagnosis taken from the text after step 1's yes/no: {_quote(diagnosis)}")
    else:
        diagnosis = None
        if detection:
            notes.append("no diagnosis given")
    segments = read_segments(text, notes)
    return ParsedAnswer(detection, diagnosis, segments, notes, reasoning)


def split_reasoning(text, notes=None):
    """(reasoning or None, the conclusion to parse) of an answer; answers without "Conclusion:" come back whole."""
    notes = [] if notes is None else notes
    matches = list(_CONCLUSION_RE.finditer(text))
    if matches:
        last = matches[-1]
        reasoning = text[: last.start()].strip() or None
        notes.append(f"chain of thought: read the conclusion after {last.group(0).strip()!r}")
        return reasoning, text[last.end() :].strip()
    if _REASONING_START_RE.match(text):
        steps = list(_STEP_RE.finditer(text))
        first = next((m for m in steps if m.group(1) == "1"), None)
        if first is None:
            notes.append("reasoning without a conclusion (answer cut short?): no answer to read")
            return text, ""
        notes.append("reasoning without 'Conclusion:': read the answer from its step 1")
        return text[: first.start()].strip() or None, text[first.start() :].strip()
    return None, text


def read_yes_no(text, notes=None):
    """(True | False | None, the text after the yes/no word) for a detection answer."""
    notes = [] if notes is None else notes
    body = text.strip()
    if "?" in body.rstrip("?"):  # the model echoed the question: read what follows it
        body = body[body.rstrip("?").rindex("?") + 1 :].strip()
        notes.append("step 1 repeats the question: read the text after its '?'")
    low = body.lower()
    match = _FIRST_WORD_RE.match(low)
    head, colon, tail = low.partition(":")
    if colon and len(head) <= 40 and (not match or match.group(1) not in _YES_WORDS + _NO_WORDS):
        after = _FIRST_WORD_RE.match(tail)  # "Abnormality present: No"
        if after and after.group(1) in _YES_WORDS + _NO_WORDS:
            notes.append(f"step 1 is labelled {head.strip()!r}: read the word after its ':'")
            body, low = body[len(head) + 1 :].strip(), tail.strip()
            match = _FIRST_WORD_RE.match(low)
    if match:
        word = match.group(1)
        rest = body[match.end() :].strip(" \t\n.,;:!-")
        if word in _YES_WORDS:
            notes.append(f"detection read as yes from the word {word!r}")
            return True, rest
        if word in _NO_WORDS:
            notes.append(f"detection read as no from the word {word!r}")
            return False, rest
    first_sentence = re.split(r"(?<=[.!\n])\s", low, maxsplit=1)[0]
    if _NEGATIVE_PHRASES.search(first_sentence):
        notes.append(f"detection read as no from the phrase {_NEGATIVE_PHRASES.search(first_sentence).group(0)!r}")
        return False, body
    if _POSITIVE_PHRASES.search(first_sentence):
        notes.append(f"detection read as yes from the phrase {_POSITIVE_PHRASES.search(first_sentence).group(0)!r}")
        return True, body
    notes.append(f"detection unreadable: {_quote(body)} is neither yes nor no")
    return None, body


def clean_diagnosis(text, notes=None):
    """The diagnosis phrase of step 2: echoed question, 'Diagnosis:' and a trailing mask list removed."""
    notes = [] if notes is None else notes
    body = text.strip()
    if "?" in body.rstrip("?"):
        body = body[body.rstrip("?").rindex("?") + 1 :]
        notes.append("step 2 repeats the question: read the text after its '?'")
    cut = _SEGMENTATION_START_RE.search(body)
    if cut and cut.start() > 0:
        body = body[: cut.start()]
        notes.append("diagnosis cut where the mask list starts")
    body = _DIAGNOSIS_PREFIX_RE.sub("", body.strip().lstrip("*_#` "))
    body = " ".join(body.split()).strip(" .,;:-*_#`")
    return body or None


def token_labels(text):
    """[(label, token)] for every seg token in `text`, repeats included, in order.

    The one reading of which label a seg token names (the model names its masks with it, the scorer matches
    masks with it): the words written just before the token, after the last boundary (line break, bullet,
    numbering, ':', ',', ';', 'and', '. ') and after any earlier seg token; for "name: <segNNN>" the words
    before the colon. "Here is the mask for" and a bare "Segmentation masks" heading are not part of a label."""
    labels, previous_end = [], 0
    for match in SEG_TOKEN_RE.finditer(text):
        labels.append((_label_before(text[previous_end : match.start()]), match.group(0)))
        previous_end = match.end()
    return labels


def _label_before(before):
    boundaries = list(_LABEL_BOUNDARY_RE.finditer(before))
    label = _clean_label(before[boundaries[-1].end() :] if boundaries else before)
    if not label and boundaries and boundaries[-1].group(0) == ":":  # "hepatic lesion: <seg002>"
        start = boundaries[-2].end() if len(boundaries) > 1 else 0
        label = _clean_label(before[start : boundaries[-1].start()])
    return label


def _clean_label(text):
    return " ".join(_LABEL_PREFIX_RE.sub("", text.strip()).split()).strip(_LABEL_STRIP)


def read_segments(text, notes=None):
    """[(label, token)] of `token_labels`, each token once (its first occurrence), with a note per decision."""
    notes = [] if notes is None else notes
    segments, repeats = [], {}
    for label, token in token_labels(text):
        if token in repeats:
            repeats[token] += 1
            continue
        repeats[token] = 0
        if not label:
            notes.append(f"{token} has no label text before it")
        else:
            notes.append(f"{token} labelled {_quote(label)}")
        segments.append((label, token))
    for token, count in repeats.items():
        if count:
            notes.append(f"{token} appears {count} more time(s): the first one is used")
    return segments


def _split_steps(text):
    """{step number: its text} for the numbered steps found in order 1 → 2 → 3 (any may be missing)."""
    starts, position = {}, 0
    for number in (1, 2, 3):
        for match in _STEP_RE.finditer(text, position):
            if int(match.group(1)) == number:
                starts[number] = match
                position = match.end()
                break
    steps, ordered = {}, sorted(starts.items(), key=lambda item: item[1].start())
    for i, (number, match) in enumerate(ordered):
        end = ordered[i + 1][1].start() if i + 1 < len(ordered) else len(text)
        steps[number] = text[match.end() : end].strip()
    return steps


def _quote(text, limit=60):
    if text is None:
        return "None"
    flat = " ".join(str(text).split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")
