"""Whole-volume findings (raddiagseg.findings): slice answers combined in 3D, measured in physical units.

The slice answers are scripted (a model stand-in that answers from known masks), so each rule can be
checked exactly; the app path with the real shipped model is covered in test_app_demo_model.py."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import SimpleITK as sitk

from lib import image_io, response
from raddiagseg import findings, templates


@dataclass
class Segment:
    label: str
    mask: np.ndarray
    score: float = 0.9


@dataclass
class Reply:
    answer: str
    segments: list = field(default_factory=list)


def three_step(organ_mask, lesion_mask, organ="liver", diagnosis="Liver tumour", lesion="liver tumour"):
    if lesion_mask is None or not lesion_mask.any():
        return Reply(templates.NEGATIVE_ANSWER)
    return Reply(templates.vqaseg_answer(True, diagnosis, [organ, lesion]), [Segment(organ, organ_mask), Segment(lesion, lesion_mask)])


class ScriptedModel:
    """Answers the 3-step question from per-slice replies and Ref-Seg questions from the organ masks;
    counts the slices asked."""

    def __init__(self, replies, organ):
        self.replies, self.organ, self.asked = replies, organ, []

    def ask(self, indices, question, advance):
        self.asked += [(i, question) for i in indices]
        out = []
        for i in indices:
            if question == templates.DEFAULT_QUESTION:
                out.append(self.replies[i])
            else:
                out.append(Reply(templates.refseg_answer("liver"), [Segment("liver", self.organ[i])]))
        advance(len(indices))
        return out


def oblique_image(size=(48, 40, 24), spacing=(0.7, 0.9, 3.0), angle_deg=30.0):
    """An oblique, anisotropic volume: rotated 30 degrees about the LPS y axis and 20 about z."""
    a, b = np.radians(angle_deg), np.radians(20.0)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(tuple((rz @ ry).ravel()))
    image.SetOrigin((-12.0, 30.0, 5.0))
    return image


def physical_grid(image):
    """LPS coordinates of every voxel, as arrays in numpy (K, J, I) order."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.GetSize()[::-1]), indexing="ij")
    matrix = image_io.ijk_to_lps(image)
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk @ matrix.T)[..., :3]


def ellipsoid(points, centre, axes):
    return (((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(-1) <= 1.0


def test_oblique_anisotropic_volume_is_measured_in_millimetres():
    image = oblique_image()
    points = physical_grid(image)
    centre_voxel = np.array(image.GetSize()) / 2
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in centre_voxel)))
    organ_file = ellipsoid(points, centre, (14.0, 11.0, 22.0))
    lesion_centre = centre + np.array([2.0, 1.0, 3.0])
    lesion_file = ellipsoid(points, lesion_centre, (5.0, 5.0, 9.0))
    view = image_io.VolumeView.of(image)
    organ, lesion = view.to_view(organ_file), view.to_view(lesion_file)
    matrix = response.view_to_lps(view, image, organ.shape)
    n = organ.shape[0]
    model = ScriptedModel([three_step(organ[i], lesion[i]) for i in range(n)], organ)
    numbers = [view.view_index(i, n) for i in range(n)]
    volume, _ = findings.answer_volume(model.ask, organ.shape, matrix, templates.DEFAULT_QUESTION, slice_numbers=numbers)

    assert volume.detection is True and volume.diagnosis == "Liver tumour"
    (tumour,) = [f for f in volume.findings if f["role"] == "abnormality"]
    (liver,) = [f for f in volume.findings if f["role"] == "organ"]
    true_lesion_ml = 4 / 3 * np.pi * 5 * 5 * 9 / 1000  # 0.942 mL
    true_organ_ml = 4 / 3 * np.pi * 14 * 11 * 22 / 1000
    assert tumour["volume_ml"] == pytest.approx(true_lesion_ml, rel=0.08)
    assert liver["volume_ml"] == pytest.approx(true_organ_ml, rel=0.05)
    # largest distance between voxel centres: the true diameter minus at most one voxel diagonal
    diagonal = float(np.linalg.norm(image.GetSpacing()))
    assert 18.0 - diagonal <= tumour["max_diameter_mm"] <= 18.0 + 0.5
    assert 44.0 - diagonal <= liver["max_diameter_mm"] <= 44.0 + 0.5
    assert np.allclose(tumour["centroid_lps_mm"], lesion_centre, atol=0.6)
    assert tumour["organ"] == "liver" and tumour["score"] == pytest.approx(0.9)
    # slices are the file's own k indices of the lesion's voxels
    ks = np.nonzero(lesion_file.any(axis=(1, 2)))[0] if view.slice_axis == 0 else None
    assert tumour["slices"] == [int(ks.min()), int(ks.max())]
    # mask back in file order is the input mask exactly
    assert np.array_equal(view.from_view(volume.masks["liver tumour"]), lesion_file)
    assert "liver tumour: 0.9 mL, max diameter" in volume.answer_text()


@pytest.mark.parametrize("mirrored", [False, True])
def test_box_in_an_oblique_anisotropic_volume_is_measured_exactly(mirrored):
    """A lesion of a x b x c voxels on an oblique, anisotropic grid (and the same grid with its i and k axes running
    the other way, which the view flips): its volume is a*b*c voxel volumes, its largest diameter the distance
    between opposite corner voxel centres, its centroid the centre of the box, its slices the box's k range."""
    image = oblique_image(size=(40, 36, 20))
    if mirrored:
        direction = np.array(image.GetDirection()).reshape(3, 3) @ np.diag([-1.0, 1.0, -1.0])
        image.SetDirection(tuple(direction.ravel()))
    (a, b, c), (i0, j0, k0) = (11, 7, 5), (14, 12, 6)
    lesion_file = np.zeros(image.GetSize()[::-1], bool)
    lesion_file[k0 : k0 + c, j0 : j0 + b, i0 : i0 + a] = True
    organ_file = np.zeros_like(lesion_file)
    organ_file[2:17, 4:30, 5:34] = True
    view = image_io.VolumeView.of(image)
    assert (0 in view.flips) == mirrored and view.slice_axis == 0
    organ, lesion = view.to_view(organ_file), view.to_view(lesion_file)
    n = organ.shape[0]
    model = ScriptedModel([three_step(organ[i], lesion[i]) for i in range(n)], organ)
    volume, _ = findings.answer_volume(model.ask, organ.shape, response.view_to_lps(view, image, organ.shape),
                                       templates.DEFAULT_QUESTION, slice_numbers=[view.view_index(i, n) for i in range(n)])

    (tumour,) = [f for f in volume.findings if f["role"] == "abnormality"]
    sx, sy, sz = image.GetSpacing()
    assert tumour["volume_ml"] == pytest.approx(a * b * c * sx * sy * sz / 1000, abs=5e-4)
    assert tumour["max_diameter_mm"] == pytest.approx(np.linalg.norm([(a - 1) * sx, (b - 1) * sy, (c - 1) * sz]), abs=0.051)
    centre = image.TransformContinuousIndexToPhysicalPoint((i0 + (a - 1) / 2, j0 + (b - 1) / 2, k0 + (c - 1) / 2))
    assert np.allclose(tumour["centroid_lps_mm"], centre, atol=0.051)
    assert tumour["slices"] == [k0, k0 + c - 1]
    (liver,) = [f for f in volume.findings if f["role"] == "organ"]
    assert liver["volume_ml"] == pytest.approx(organ_file.sum() * sx * sy * sz / 1000, abs=5e-4)
    assert liver["slices"] == [2, 16]
    assert np.array_equal(view.from_view(volume.masks["liver tumour"]), lesion_file)


def test_flat_lesion_diameter_is_exact():
    """A lesion on one slice has no 3D hull; its largest diameter is still the distance between its extreme voxels."""
    matrix = np.diag([3.0, 0.7, 0.9, 1.0])
    mask = np.zeros((3, 90, 90), bool)
    mask[1, 4:85, 4:85] = True  # 81 x 81 voxels
    measured = findings.measure(mask, matrix, [10, 11, 12])
    assert measured["max_diameter_mm"] == pytest.approx(np.hypot(80 * 0.7, 80 * 0.9), abs=0.051)
    assert measured["slices"] == [11, 11] and measured["volume_ml"] == pytest.approx(81 * 81 * 3.0 * 0.7 * 0.9 / 1000, abs=5e-4)
    line = np.zeros((3, 90, 90), bool)
    line[1, 7, 3:83] = True  # on a line
    assert findings.measure(line, matrix, [0, 1, 2])["max_diameter_mm"] == pytest.approx(79 * 0.9, abs=0.051)


def slab(n=12, shape=(40, 40)):
    """A liver on slices 2..11 and one tumour on slices 5..7 (view = file order), 1 mm voxels, 2 mm slices."""
    organ = np.zeros((n, *shape), bool)
    organ[2:, 8:32, 8:32] = True
    lesion = np.zeros_like(organ)
    lesion[5:8, 14:22, 14:22] = True
    return organ, lesion, np.diag([2.0, 1.0, 1.0, 1.0])


def test_isolated_one_slice_answer_and_contradicting_slice_do_not_become_findings():
    organ, lesion, matrix = slab()
    replies = [three_step(organ[i], lesion[i]) for i in range(12)]
    stray = np.zeros((40, 40), bool)
    stray[2:6, 2:6] = True
    replies[0] = three_step(stray | organ[3], stray)  # slice 0: no liver, answered abnormal; slices 1 and 2 normal
    pancreas = np.zeros((40, 40), bool)
    pancreas[30:36, 30:36] = True
    replies[7] = three_step(pancreas, lesion[7], "pancreas", "Pancreas tumour", "pancreas tumour")  # misnamed lesion
    model = ScriptedModel(replies, organ)
    volume, _ = findings.answer_volume(model.ask, organ.shape, matrix, templates.DEFAULT_QUESTION, skip=False)

    assert volume.diagnosis == "Liver tumour" and volume.summary["diagnosis_votes"] == {"Liver tumour": 2, "Pancreas tumour": 1}
    assert set(volume.masks) == {"liver", "liver tumour"}  # no pancreas: every segment is named by the answer
    lesions = [f for f in volume.findings if f["role"] == "abnormality"]
    assert len(lesions) == 1 and lesions[0]["slices"] == [5, 7]  # slice 7's lesion renamed into it
    assert lesions[0]["volume_ml"] == pytest.approx(3 * 64 * 2 / 1000)
    reasons = {(d["name"], tuple(d["slices"])): d["reason"] for d in volume.summary["discarded"]}
    assert "isolated one-slice answer" in reasons[("liver tumour", (0,))]
    assert "Pancreas tumour" in reasons[("pancreas", (7,))]
    assert volume.summary["renamed"][0]["from"] == "pancreas tumour" and volume.summary["renamed"][0]["slices"] == [7]
    assert volume.summary["positive_slices"] == [5, 6, 7]
    # the organ was completed by Ref-Seg on the slices answered normal: its volume is the whole liver
    (liver,) = [f for f in volume.findings if f["role"] == "organ"]
    assert liver["volume_ml"] == pytest.approx(organ.sum() * 2 / 1000) and liver["slices"] == [2, 11]
    text = volume.answer_text()
    assert "pancreas" not in text and "liver tumour: 0.4 mL, max diameter" in text and "slices 5-7" in text


def test_two_tumours_are_two_findings_and_lesions_outside_the_organ_are_discarded():
    organ, lesion, matrix = slab()
    second = np.zeros_like(lesion)
    second[8:11, 26:30, 10:14] = True
    outside = np.zeros_like(lesion)
    outside[5:8, 34:39, 34:39] = True  # beyond the liver's edge (in-plane margin 2 voxels)
    replies = [three_step(organ[i], lesion[i] | second[i] | outside[i]) for i in range(12)]
    volume, _ = findings.answer_volume(ScriptedModel(replies, organ).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    lesions = [f for f in volume.findings if f["role"] == "abnormality"]
    assert [(f["index"], f["count"], f["slices"]) for f in lesions] == [(1, 2, [5, 7]), (2, 2, [8, 10])]
    assert any("outside the liver" in d["reason"] for d in volume.summary["discarded"])
    assert not (volume.masks["liver tumour"] & outside).any()
    assert "liver tumour 2 of 2" in volume.answer_text()


def test_skipping_slices_changes_no_finding_and_asks_fewer():
    organ, lesion, matrix = slab(n=24)
    lesion[15:17, 20:24, 20:24] = True  # a second, two-slice tumour
    replies = [three_step(organ[i], lesion[i]) for i in range(24)]
    full_model, skip_model = ScriptedModel(replies, organ), ScriptedModel(replies, organ)
    full, _ = findings.answer_volume(full_model.ask, organ.shape, matrix, templates.DEFAULT_QUESTION, skip=False)
    states = []
    progress = findings.Progress(24, states.append)
    skipped, _ = findings.answer_volume(skip_model.ask, organ.shape, matrix, templates.DEFAULT_QUESTION, skip=True,
                                        progress=progress)
    assert skipped.findings == full.findings and skipped.answer_text() == full.answer_text()
    three_step_asked = [i for i, q in skip_model.asked if q == templates.DEFAULT_QUESTION]
    assert len(three_step_asked) < 24 and skipped.summary["skipped_slices"]
    assert states[-1]["slices_done"] == states[-1]["slices_planned"] == len(skip_model.asked)
    assert [s["stage"] for s in states][:1] == ["slices"] and states[-1]["eta_s"] == 0.0


def test_slices_outside_the_body_are_not_asked():
    hu = np.full((6, 20, 20), -1000, np.int16)
    hu[1:5, 5:15, 5:15] = 40
    assert findings.body_slices(hu) == [1, 2, 3, 4]


def test_normal_volume_names_no_segment():
    organ, lesion, matrix = slab()
    replies = [three_step(organ[i], None) for i in range(12)]
    replies[6] = three_step(organ[6], lesion[6])  # one isolated abnormal slice
    volume, _ = findings.answer_volume(ScriptedModel(replies, organ).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    assert volume.detection is False and volume.masks == {} and volume.findings == []
    assert volume.answer_text() == templates.NEGATIVE_ANSWER
    assert volume.summary["discarded"] and volume.summary["positive_slices"] == []


def test_only_the_diagnosis_organ_and_abnormality_are_named():
    """A slice answering the volume's diagnosis with a mask of another organ: that mask is no segment (said why);
    synonyms of a diagnosis are one vote."""
    organ, lesion, matrix = slab()
    kidney = np.zeros((40, 40), bool)
    kidney[34:38, 2:8] = True
    replies = [three_step(organ[i], lesion[i]) for i in range(12)]
    replies[6] = Reply(templates.vqaseg_answer(True, "hepatic tumour", ["liver", "kidney", "tumour"]),
                       [Segment("liver", organ[6]), Segment("kidney", kidney), Segment("tumour", lesion[6])])
    volume, _ = findings.answer_volume(ScriptedModel(replies, organ).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    assert volume.diagnosis == "Liver tumour" and volume.summary["diagnosis_votes"] == {"Liver tumour": 3}
    assert set(volume.masks) == {"liver", "liver tumour"} and volume.masks["liver tumour"][6].any()
    (dropped,) = [d for d in volume.summary["discarded"] if d["name"] == "kidney"]
    assert dropped["slices"] == [6] and "names the liver and its liver tumour, not the kidney" in dropped["reason"]


def test_a_tied_diagnosis_goes_to_the_higher_mask_scores():
    """Two slices say liver tumour, two say pancreas tumour: the diagnosis whose lesion masks scored higher wins,
    whichever comes first; the other's lesions are not findings."""
    organ, lesion, matrix = slab()
    replies = [three_step(organ[i], None) for i in range(12)]
    for i, score in ((5, 0.6), (6, 0.6)):
        replies[i] = Reply(templates.vqaseg_answer(True, "Liver tumour", ["liver", "liver tumour"]),
                           [Segment("liver", organ[i], score), Segment("liver tumour", lesion[i], score)])
    pancreas_lesion = np.zeros((40, 40), bool)
    pancreas_lesion[30:34, 30:34] = True
    for i in (2, 3):
        replies[i] = Reply(templates.vqaseg_answer(True, "Pancreas tumour", ["pancreas", "pancreas tumour"]),
                           [Segment("pancreas", pancreas_lesion, 0.95), Segment("pancreas tumour", pancreas_lesion, 0.95)])
    volume, _ = findings.answer_volume(ScriptedModel(replies, organ).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    assert volume.summary["diagnosis_votes"] == {"Liver tumour": 2, "Pancreas tumour": 2}
    assert volume.diagnosis == "Pancreas tumour"  # 0.95 > 0.6, though the liver tumour's slices come later
    for i in (2, 3):
        replies[i].segments = [Segment(s.label, s.mask, 0.55) for s in replies[i].segments]
    volume, _ = findings.answer_volume(ScriptedModel(replies, organ).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    assert volume.diagnosis == "Liver tumour" and set(volume.masks) == {"liver", "liver tumour"}


def test_a_lesion_without_its_organ_on_any_slice_is_not_a_finding():
    """Neither the answers nor the Ref-Seg completion found the liver: a 'liver tumour' cannot be placed in it."""
    organ, lesion, matrix = slab()
    empty = np.zeros_like(organ)
    replies = [Reply(templates.vqaseg_answer(True, "Liver tumour", ["liver tumour"]), [Segment("liver tumour", lesion[i])])
               if lesion[i].any() else three_step(organ[i], None) for i in range(12)]
    volume, _ = findings.answer_volume(ScriptedModel(replies, empty).ask, organ.shape, matrix, templates.DEFAULT_QUESTION,
                                       skip=False)
    assert volume.findings == [] and volume.masks == {} and volume.detection is False
    assert any("no liver was found on any slice" in d["reason"] and d["slices"] == [5, 6, 7] for d in volume.summary["discarded"])
