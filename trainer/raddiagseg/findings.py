"""Whole-volume answers as 3D findings: lesions and organs as connected objects, measured in millimetres.

A model answers one axial slice at a time. Taking the union of those answers makes a volume answer
contradict itself (a "pancreas tumour" on one slice of a liver tumour, a "liver" on a slice with no
liver). Here the slice answers are read together:

- a slice answered abnormal whose neighbouring slices are both answered normal is an isolated
  one-slice answer and is discarded (with thin enough slices a real lesion reaches a neighbour);
- the volume's diagnosis is the majority of the remaining abnormal slices; masks of slices that
  answered another diagnosis are discarded, except an abnormality that lies in the diagnosis' organ
  and touches its abnormality on an adjacent slice: the lesion was seen, its organ misnamed, so it
  is renamed to the diagnosis' abnormality;
- the organ the diagnosis names is completed on the slices whose answer gave no organ mask, by asking
  for it (Ref-Seg); its pieces not connected to a finding and smaller than a fifth of the largest are
  discarded;
- each 3D connected component (26-connectivity across adjacent slices) of an abnormality is one
  finding; one lying mostly outside the diagnosis' organ (or in a volume where that organ was found on
  no slice) is discarded, and so is a speck on one slice beside a larger piece of the same mask (a
  fragment of that slice's mask, seen on no other slice);
- the answer names only the diagnosis' organ and abnormality: other organs' masks are discarded.

Diagnoses are counted by their vocabulary label (synonyms are one vote); a tie goes to the diagnosis
whose slices' abnormality masks scored higher (mean mask score), then to the one seen first.

Everything discarded or renamed is listed with its reason. Measurements use the voxel → LPS matrix of
the view array, so oblique and anisotropic volumes are measured in physical units. `answer_volume`
also decides which slices to answer: slices outside the body are never asked, and for the 3-step
question every second slice is asked first and the others only next to a slice not answered normal;
a skipped slice lies between two normal ones, so if it were abnormal it would be isolated and
discarded: skipping changes no finding.

This module knows nothing of the app, MONAI Label or Slicer; the app and `raddiagseg score-volumes`
pass it their own way of asking the model.
"""

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from raddiagseg import templates, vocabulary
from raddiagseg.answers import parse_answer

ORGAN_SHARE = 0.5  # an abnormality component must lie at least this much inside the diagnosis' organ
ORGAN_PIECE_SHARE = 0.2  # organ pieces smaller than this share of the largest one, with no finding, are discarded
BODY_HU = -500.0  # CT voxels above this are body (soft tissue, fat is about -100 HU)
BODY_SHARE = 0.01  # a CT slice with less body than this share of its pixels is outside the body
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)  # 4-neighbourhood within a slice
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


# ---------------------------------------------------------------------------------------------
# names: free text of the model -> vocabulary entries
def diagnosis_entry(diagnosis):
    """The vocabulary diagnosis named by free text (label or synonym, any case), or None."""
    if not diagnosis:
        return None
    key = vocabulary.normalise_label(diagnosis)
    for entry in vocabulary.load()["diagnoses"]:
        names = [entry["label"], *entry.get("synonyms", [])]
        if any(vocabulary.normalise_label(n) == key for n in names):
            return entry
    for entry in vocabulary.load()["diagnoses"]:  # e.g. "Liver tumour, likely HCC"
        if vocabulary.normalise_label(entry["label"]) in key:
            return entry
    return None


def canonical_name(label_text, diagnosis=None):
    """Canonical target name for label text; ambiguous synonyms ("tumour") are resolved by the diagnosis."""
    name = vocabulary.canonical_target(label_text)
    if name:
        return name
    entry = diagnosis_entry(diagnosis)
    if entry:
        for candidate in (entry.get("abnormality"), entry.get("organ")):
            if candidate and vocabulary.matches_target(label_text, candidate):
                return candidate
    return vocabulary.normalise_label(label_text) or "segment"


def target_modalities(name):
    """Modalities the vocabulary ties target `name` to (all of them when it does not say or the name is unknown)."""
    entry = vocabulary.targets().get(name)
    return set(entry.get("modality") or templates.MODALITY_NAMES) if entry else set(templates.MODALITY_NAMES)


def restrict_to_modality(result, modality):
    """(result, note): a GenerationResult that says nothing the vocabulary ties to another modality.

    A diagnosis of another modality (a "Pancreas tumour" on a chest X-ray) withholds the whole answer (its masks
    belong to that diagnosis); a target of another modality (a "liver" on an X-ray) loses its mask and its line.
    `note` says what was withheld, or is None when the answer was already consistent."""
    import dataclasses

    parsed = parse_answer(result.answer)
    entry = diagnosis_entry(parsed.diagnosis) if parsed.detection is True else None
    title = templates.MODALITY_NAMES.get(modality, f"{modality.upper()} image")  # e.g. a DICOM US: "US image"
    if entry and entry.get("modality") and entry["modality"] != modality:
        note = (f"The model named {entry['label']}, a {templates.MODALITY_NAMES.get(entry['modality'], entry['modality'])} "
                f"diagnosis, on a {title}: the answer is withheld.")
        return dataclasses.replace(result, answer=note, segments=[]), note
    diagnosis = parsed.diagnosis if parsed.detection is True else None
    dropped = [s for s in result.segments if modality not in target_modalities(canonical_name(s.label, diagnosis))]
    if not dropped:
        return result, None
    answer = result.answer
    for segment in dropped:
        answer = answer.replace(f"{segment.label} {segment.token}", "").replace(segment.token, "")
    answer = "\n".join(line for line in answer.splitlines() if line.strip(" -*•"))
    names = ", ".join(dict.fromkeys(canonical_name(s.label, diagnosis) for s in dropped))
    note = f"Not shown: {names}, not a target of a {title}."
    kept = [s for s in result.segments if s not in dropped]
    return dataclasses.replace(result, answer=f"{answer}\n{note}", segments=kept), note


def role(name):
    entry = vocabulary.targets().get(name)
    return entry["role"] if entry else "unknown"


# ---------------------------------------------------------------------------------------------
@dataclass
class SliceAnswer:
    """One answered slice. `index`: position along the view's slice axis; `number`: the slice's index in
    the file (what clients call `slice`); masks: [(canonical name, bool (H, W), score)]."""

    index: int
    number: int
    answer: str
    detection: bool | None
    diagnosis: str | None
    masks: list = field(default_factory=list)


def read_slice_answer(result, index, number=None):
    """SliceAnswer from a model GenerationResult (answer text + segments with masks and scores)."""
    parsed = parse_answer(result.answer)
    diagnosis = parsed.diagnosis if parsed.detection is True else None  # a Ref-Seg or unreadable answer has none
    masks = [(canonical_name(s.label, diagnosis), np.asarray(s.mask, dtype=bool), float(getattr(s, "score", 0.0)))
             for s in result.segments]
    entry = diagnosis_entry(diagnosis)
    diagnosis = entry["label"] if entry else diagnosis  # "hepatic tumour" and "Liver tumour" are one vote
    return SliceAnswer(index, index if number is None else number, result.answer, parsed.detection, diagnosis, masks)


@dataclass
class VolumeAnswer:
    detection: bool | None  # None: no slice answer said yes or no (e.g. a Ref-Seg question)
    diagnosis: str | None
    names: list  # segment names in label-value order (organs first)
    masks: dict  # name -> bool array in the view's shape
    findings: list  # dicts, see `measure`; label_value filled by `set_label_values`
    summary: dict  # the response's `volume` block
    finding_masks: list = field(default_factory=list)  # bool array in the view's shape per finding, same order

    def set_label_values(self, values):
        for finding in self.findings:
            finding["label_value"] = values.get(finding["name"])

    def answer_text(self):
        """The 3-step answer of the volume, then one line per finding with its size and slice range."""
        names = self.names[: templates.NUM_SEG_TOKENS]
        if self.detection is None:  # not a yes/no question: the masks only
            lines = ["Segmentation masks:", *(f"- {name} {templates.seg_token(i)}" for i, name in enumerate(names))]
        else:
            lines = [templates.vqaseg_answer(self.detection, self.diagnosis or "abnormality of uncertain type", names)]
        if self.findings:
            lines.append("Findings:")
            lines += [f"- {describe_finding(f)}" for f in self.findings]
        return "\n".join(lines)


def describe_finding(finding):
    """'liver tumour 1 of 2: 14.3 mL, max diameter 32.1 mm, slices 40-52, in the liver'."""
    first, last = finding["slices"]
    span = f"slice {first}" if first == last else f"slices {first}-{last}"
    text = f"{finding['name']}"
    if finding.get("count", 1) > 1:
        text += f" {finding['index']} of {finding['count']}"
    text += f": {finding['volume_ml']:.1f} mL, max diameter {finding['max_diameter_mm']:.1f} mm, {span}"
    if finding["role"] == "abnormality" and finding.get("organ"):
        text += f", in the {finding['organ']}"
    return text


# ---------------------------------------------------------------------------------------------
# measurements
def voxel_ml(view_to_lps):
    return abs(float(np.linalg.det(np.asarray(view_to_lps, dtype=float)[:3, :3]))) / 1000.0


def volume_ml(voxels, view_to_lps):
    """Volume in mL of `voxels` voxels (a count or a mask), as findings state it (3 decimals)."""
    count = int(np.count_nonzero(voxels)) if isinstance(voxels, np.ndarray) else int(voxels)
    return round(count * voxel_ml(view_to_lps), 3)


def max_diameter_mm(mask, view_to_lps):
    """Largest distance between two voxel centres of `mask`, in mm (convex hull of its surface voxels)."""
    surface = mask & ~ndimage.binary_erosion(mask)
    points = np.argwhere(surface).astype(float)
    if len(points) < 2:
        return 0.0
    matrix = np.asarray(view_to_lps, dtype=float)
    points = points @ matrix[:3, :3].T
    if len(points) > 64:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat (a lesion on one slice) or on a line: joggled, the hull keeps every extreme point
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return float(pdist(points).max())


def measure(mask, view_to_lps, slice_numbers, scores=None):
    """volume_ml, max_diameter_mm, slices [first, last] (file numbers), centroid_lps_mm, score of a 3D mask.

    `scores`: {view slice index: mask score}; the finding's score is their mean weighted by its voxels."""
    counts = mask.sum(axis=(1, 2))
    indices = np.nonzero(counts)[0]
    numbers = [int(slice_numbers[i]) for i in indices]
    centre = np.argwhere(mask).mean(axis=0)
    matrix = np.asarray(view_to_lps, dtype=float)
    centroid = matrix[:3, :3] @ centre + matrix[:3, 3]
    score = None
    if scores:
        weights = [(counts[i], scores[i]) for i in indices if i in scores]
        total = sum(w for w, _ in weights)
        score = round(float(sum(w * s for w, s in weights) / total), 3) if total else None
    return {
        "volume_ml": volume_ml(counts.sum(), matrix),
        "max_diameter_mm": round(max_diameter_mm(mask, matrix), 1),
        "slices": [min(numbers), max(numbers)],
        "centroid_lps_mm": [round(float(c), 1) for c in centroid],
        "score": score,
    }


def components(mask):
    """Connected components (26-neighbourhood) of a 3D mask, largest first, as bool arrays."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    return [labels == (i + 1) for i in np.argsort(-sizes, kind="stable")]


def span(numbers):
    numbers = sorted(numbers)
    return f"slice {numbers[0]}" if len(numbers) == 1 else f"slices {numbers[0]}-{numbers[-1]}"


# ---------------------------------------------------------------------------------------------
def isolated_slices(answers, n_slices):
    """Slices answered abnormal whose every neighbour (index ± 1 inside the volume) was answered normal or
    not asked (outside the body, or skipped between two normal slices). Volumes under 3 slices have none."""
    if n_slices < 3:
        return set()
    by_index = {a.index: a for a in answers}

    def normal(i):
        return i not in by_index or by_index[i].detection is False

    return {a.index for a in answers if a.detection is True
            and all(normal(j) for j in (a.index - 1, a.index + 1) if 0 <= j < n_slices)}


def combine(answers, shape, view_to_lps, complete=None, in_body=None, slice_numbers=None):
    """VolumeAnswer from the slice answers of a volume whose view array has `shape` (slices, rows, cols).

    `complete(organ, indices) -> {index: (mask, score)}` asks the model for the diagnosis' organ on the
    given slices (those in `in_body` whose answer gave no mask of it); None leaves the organ as answered.
    `slice_numbers`: the file's index of every view slice (default: the same), for the slices no answer
    names too (a finding's range may end on a slice that was skipped and completed by Ref-Seg).
    """
    n = shape[0]
    numbers = list(range(n)) if slice_numbers is None else [int(k) for k in slice_numbers]
    if len(numbers) != n or any(numbers[a.index] != a.number for a in answers):
        raise ValueError(f"slice_numbers must give the file index of each of the {n} view slices, as the answers do")
    discarded, renamed = [], []
    isolated = isolated_slices(answers, n)
    positives = [a for a in answers if a.detection is True and a.index not in isolated]
    votes = Counter(a.diagnosis for a in positives if a.diagnosis)

    def confidence(d):  # a tie between diagnoses goes to the one whose slices' lesion masks scored higher
        scores = [score for a in positives if a.diagnosis == d for name, _, score in a.masks if role(name) == "abnormality"]
        return float(np.mean(scores)) if scores else 0.0

    diagnosis = max(votes, key=lambda d: (votes[d], confidence(d), -min(a.index for a in positives if a.diagnosis == d))) \
        if votes else None
    entry = diagnosis_entry(diagnosis) or {}
    organ, abnormality = entry.get("organ"), entry.get("abnormality")
    voted = f"{votes[diagnosis]} of {len(positives)} abnormal slices" if diagnosis else ""

    masks, scores, pending = {}, {}, []

    def add(name, index, mask, score):
        if name not in masks:
            masks[name] = np.zeros(shape, dtype=bool)
        masks[name][index] |= mask
        scores.setdefault(name, {})[index] = max(score, scores.get(name, {}).get(index, 0.0))

    def drop(name, numbers_, voxels, reason):
        discarded.append({"name": name, "slices": sorted(numbers_), "voxels": int(voxels), "reason": reason})

    for a in sorted(answers, key=lambda a: a.index):
        for name, mask, score in a.masks:
            if not mask.any():
                continue
            kind = role(name)
            if a.index in isolated:
                drop(name, [a.number], mask.sum(), f"slice {a.number} is the only slice answered abnormal among its "
                     "neighbours, which were answered normal: an isolated one-slice answer")
            elif kind == "abnormality" and a.detection is False:
                drop(name, [a.number], mask.sum(), f"slice {a.number} was answered normal")
            elif diagnosis and a.diagnosis not in (None, diagnosis) and not (name == organ or kind == "abnormality"):
                drop(name, [a.number], mask.sum(), f"slice {a.number} was answered {a.diagnosis}; the volume's "
                     f"diagnosis is {diagnosis} ({voted}), which does not name the {name}")
            elif organ and kind != "abnormality" and name != organ:
                drop(name, [a.number], mask.sum(), f"the volume's diagnosis {diagnosis} ({voted}) names the {organ} "
                     f"and its {abnormality or 'abnormality'}, not the {name}")
            elif kind == "abnormality" and abnormality and name != abnormality:
                pending.append((a, name, mask, score))
            elif kind == "abnormality" and diagnosis and not abnormality:
                drop(name, [a.number], mask.sum(), f"the diagnosis {diagnosis} names no abnormality to segment")
            else:
                add(name, a.index, mask, score)

    if organ and complete is not None:
        body = set(range(n)) if in_body is None else set(in_body)
        have = set(np.nonzero(masks[organ].any(axis=(1, 2)))[0]) if organ in masks else set()
        missing = sorted(body - have)
        if missing:
            for index, (mask, score) in complete(organ, missing).items():
                if mask.any():
                    add(organ, index, mask, score)

    organ_mask = masks.get(organ)
    in_organ = None
    if organ_mask is not None and organ_mask.any():
        in_organ = ndimage.binary_dilation(organ_mask, IN_PLANE, iterations=2)  # a lesion may bulge the organ's outline

    for a, name, mask, score in pending:  # abnormalities that are not the diagnosis' own
        touches = False
        if abnormality in masks:
            grown = ndimage.binary_dilation(mask, iterations=2)
            lo, hi = max(0, a.index - 1), min(n, a.index + 2)
            touches = bool((masks[abnormality][lo:hi] & grown[None]).any())
        inside = in_organ is not None and in_organ[a.index][mask].mean() >= ORGAN_SHARE
        if inside and touches:
            add(abnormality, a.index, mask, score)
            renamed.append({"from": name, "to": abnormality, "slices": [a.number], "voxels": int(mask.sum()),
                            "reason": f"it lies in the {organ} and continues the {abnormality} of an adjacent slice"})
        else:
            why = (f"it lies outside the {organ}" if not inside else
                   f"no adjacent slice shows the {abnormality} there")
            drop(name, [a.number], mask.sum(), f"slice {a.number} named a {name}, which the volume's diagnosis "
                 f"{diagnosis} ({voted}) does not name, and {why}")

    findings, lesion_voxels = [], {}
    for name in [m for m in masks if role(m) == "abnormality"]:
        kept = np.zeros(shape, dtype=bool)
        lesions, biggest_on = [], {}  # components come largest first: the first one met on a slice is its biggest
        for component in components(masks[name]):
            on = np.nonzero(component.any(axis=(1, 2)))[0]
            slices_ = [numbers[i] for i in on]
            for i in on:
                biggest_on.setdefault(int(i), component)
            if len(on) == 1 and biggest_on[int(on[0])] is not component:
                drop(name, slices_, component.sum(), f"a fragment of the {name} mask of slice {slices_[0]}, beside a "
                     "larger one and on no adjacent slice")
                continue
            if organ and in_organ is None:
                drop(name, slices_, component.sum(), f"this {name} on {span(slices_)} cannot be placed: no {organ} "
                     "was found on any slice")
                continue
            if in_organ is not None and diagnosis:
                share = float(in_organ[component].mean())
                if share < ORGAN_SHARE:
                    drop(name, slices_, component.sum(), f"this {name} on {span(slices_)} lies outside the {organ} "
                         f"({share:.0%} of it inside)")
                    continue
            kept |= component
            lesions.append(component)
        masks[name] = kept
        lesion_voxels[name] = kept
        for i, component in enumerate(lesions):
            findings.append(({"name": name, "role": "abnormality", "organ": organ or _organ_holding(component, masks),
                              "label_value": None, "index": i + 1, "count": len(lesions),
                              **measure(component, view_to_lps, numbers, scores.get(name))}, component))

    any_lesion = np.zeros(shape, dtype=bool)
    for kept in lesion_voxels.values():
        any_lesion |= kept
    if organ in masks and abnormality in lesion_voxels:
        masks[organ] |= lesion_voxels[abnormality]  # the organ's volume includes the lesions in it (MSD labels)
    for name in [m for m in masks if role(m) != "abnormality"]:
        pieces = components(masks[name])
        if not pieces:
            continue
        largest = int(pieces[0].sum())
        kept = np.zeros(shape, dtype=bool)
        for piece in pieces:
            voxels = int(piece.sum())
            if (piece & any_lesion).any() or voxels >= ORGAN_PIECE_SHARE * largest:
                kept |= piece
            else:
                slices_ = [numbers[i] for i in np.nonzero(piece.any(axis=(1, 2)))[0]]
                drop(name, slices_, voxels, f"a separate piece of the {name} on {span(slices_)}, "
                     f"{voxels / largest:.0%} of its largest piece and holding no finding")
        masks[name] = kept
        findings.append(({"name": name, "role": role(name), "organ": name, "label_value": None,
                          **measure(kept, view_to_lps, numbers, scores.get(name))}, kept))

    # abnormal when an abnormal slice answer stands and, if those answers segmented a lesion, one lesion was kept
    offered = any(role(name) == "abnormality" for a in positives for name, _, _ in a.masks)
    detection = bool(positives) and (not offered or any(f["role"] == "abnormality" for f, _ in findings))
    readable = any(a.detection is not None for a in answers)
    if readable and not detection:  # a normal volume names no segment
        for f, m in findings:
            drop(f["name"], list(range(f["slices"][0], f["slices"][1] + 1)), m.sum(),
                 "the volume was answered normal: no abnormality finding stands")
        findings, masks = [], {}
    masks = {name: m for name, m in masks.items() if m.any()}
    rank = {"organ": 0, "unknown": 1, "abnormality": 2}
    names = sorted(masks, key=lambda m: (rank[role(m)], list(masks).index(m)))
    findings.sort(key=lambda fm: (fm[0]["role"] != "abnormality", names.index(fm[0]["name"]), fm[0].get("index", 0)))
    for f, _ in findings:
        if f.get("count", 1) == 1:
            f.pop("index", None), f.pop("count", None)
    finding_masks = [m for _, m in findings]
    findings = [f for f, _ in findings]
    summary = {
        "n_slices": n,
        "answered_slices": len(answers),
        "skipped_slices": [numbers[i] for i in range(n) if i not in {a.index for a in answers}],
        "detection": detection if readable else None,
        "diagnosis": diagnosis if detection else None,
        "positive_slices": sorted(a.number for a in positives),
        "unreadable_slices": sorted(a.number for a in answers if a.detection is None),
        "diagnosis_votes": dict(votes),
        "discarded": discarded,
        "renamed": renamed,
    }
    return VolumeAnswer(summary["detection"], summary["diagnosis"], names, masks, findings, summary, finding_masks)


def _organ_holding(mask, masks):
    """The organ mask overlapping `mask` most, or None (abnormalities without a diagnosis to name their organ)."""
    best, overlap = None, 0
    for name, organ_mask in masks.items():
        if role(name) == "organ":
            hits = int((organ_mask & mask).sum())
            if hits > overlap:
                best, overlap = name, hits
    return best


# ---------------------------------------------------------------------------------------------
def body_slices(hu_volume):
    """View indices of CT slices that show the body (at least BODY_SHARE of their pixels above BODY_HU)."""
    share = (np.asarray(hu_volume) > BODY_HU).mean(axis=(1, 2))
    return [int(i) for i in np.nonzero(share >= BODY_SHARE)[0]]


class Progress:
    """Slices answered so far, of those planned, and an ETA from the time per slice so far.

    `report(dict)` receives {"stage", "slices_done", "slices_planned", "n_slices", "elapsed_s", "eta_s"} after
    every batch; more slices may be planned later (neighbours of abnormal slices, the organ's completion).
    """

    def __init__(self, n_slices, report=None):
        self.n_slices, self.report = n_slices, report
        self.done = self.planned = 0
        self.stage = "slices"
        self.start = time.perf_counter()

    def plan(self, count, stage):
        self.planned += count
        self.stage = stage
        self._emit()

    def advance(self, count):
        self.done += count
        self._emit()

    def state(self):
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.planned - self.done) if self.done else None
        return {"stage": self.stage, "slices_done": self.done, "slices_planned": self.planned, "n_slices": self.n_slices,
                "elapsed_s": round(elapsed, 2), "eta_s": None if eta is None else round(eta, 2)}

    def _emit(self):
        if self.report is not None:
            self.report(self.state())


def answer_volume(ask, shape, view_to_lps, question, modality="ct", slice_numbers=None, in_body=None, skip=True,
                  progress=None):
    """Ask the model about a volume and combine its answers (see the module docstring).

    `ask(indices, question, advance) -> [GenerationResult]` answers view slices `indices` (calling
    `advance(k)` after each batch of k). `skip`: with the 3-step question, answer every second slice first
    and the others only next to a slice not answered normal. `progress`: a `Progress` (or None).
    Returns (VolumeAnswer, {index: GenerationResult} of the 3-step pass)."""
    n = shape[0]
    numbers = list(slice_numbers) if slice_numbers is not None else list(range(n))
    body = sorted(set(range(n)) if in_body is None else set(in_body))
    progress = progress or Progress(n)
    results = {}

    def run(indices, stage):
        if indices:
            progress.plan(len(indices), stage)
            for i, result in zip(indices, ask(indices, question, progress.advance)):
                results[i] = result

    three_step = question == templates.DEFAULT_QUESTION and skip
    run(body[::2] if three_step else body, "slices")
    if three_step:
        def not_normal(i):
            return i in results and parse_answer(results[i].answer).detection is not False
        neighbours = [i for i in body if i not in results and (not_normal(i - 1) or not_normal(i + 1))]
        run(neighbours, "neighbours")
    answers = [read_slice_answer(results[i], i, numbers[i]) for i in sorted(results)]

    def complete(organ, indices):
        progress.plan(len(indices), "organ")
        replies = ask(indices, templates.refseg_question(organ, modality), progress.advance)
        out = {}
        for i, reply in zip(indices, replies):  # the question names one target: every mask of the reply is it
            if reply.segments:
                out[i] = (np.logical_or.reduce([np.asarray(s.mask, dtype=bool) for s in reply.segments]),
                          max(float(getattr(s, "score", 0.0)) for s in reply.segments))
        return out

    volume = combine(answers, shape, view_to_lps, complete=complete, in_body=body, slice_numbers=numbers)
    return volume, results
