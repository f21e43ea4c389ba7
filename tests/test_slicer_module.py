"""RadDiag.py's logic against real Slicer core (slicer-core: MRML scene, segmentations/volumes/colour/terminology logic).

Results are made the way our server makes them: MONAILabelApp/lib/label_files.write on the image the module
exported, with segments.assign's names, colours and terminology. What is emulated (readers/writers that need
slicer.app) and what stands in for Qt is in tests/slicer_env.py; widgets and the embedded editor's GUI need Slicer.
"""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_env
import app_studies
from RadDiagLib import DEFAULT_QUESTION, DictSettings, RadDiagClient, export_order, finding_rows, segment_specs
from RadDiagLib.labelmap import present_label_values
from RadDiagLib.workflow import DiagnosisResult, retrain

from lib import image_io, label_files, response, segments
from raddiagseg import findings, templates
from test_volume_findings import ScriptedModel, three_step

SIZE = (20, 16, 6)  # i, j, k
NAMES = ["liver", "liver tumour", "lung"]  # lung: a target without voxels


@pytest.fixture()
def core(monkeypatch):
    return slicer_env.SlicerCore(slicer_env.import_slicer_core(), monkeypatch)


def make_logic(core):
    return core.module.RadDiagLogic(settings=DictSettings(), ask=lambda url: (True, False))


def load_ct(core, tmp_path, transformed):
    """An oblique (30° about S), anisotropic CT loaded as Slicer loads a file; optionally under a linear transform."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, SIZE[::-1]).astype(np.int16))
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    image.SetOrigin((10.0, -20.0, 30.0))
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(image, path)
    ct = core.slicer.util.loadVolume(path)
    if transformed:
        put_under_transform(core, ct)
    return ct, path


def put_under_transform(core, node):
    """Place `node` under a linear transform (a 90° turn about S and a shift) as a registration would."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r, row in enumerate([[0, -1, 0, 25.0], [1, 0, 0, -7.0], [0, 0, 1, 4.0]]):
        for col, value in enumerate(row):
            matrix.SetElement(r, col, value)
    transform = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())


def masks():
    liver, tumour = np.zeros(SIZE[::-1], bool), np.zeros(SIZE[::-1], bool)
    liver[1:5, 3:10, 4:12] = True
    tumour[3, 5:7, 6:8] = True
    return {"liver": liver, "liver tumour": tumour}


def server_result(logic, ct, tmp_path, ext):
    """The module exports the CT; the server writes its answer's label file on that image (label_files.write)."""
    path, image_id = logic.exportVolume(ct)
    reference = image_io.read_image(path)
    segment_list = segments.assign(NAMES)
    label_path = str(tmp_path / f"result{ext}")
    label_files.write(label_path, reference, segment_list, masks())
    params = {"answer": "1. Yes\n2. Liver tumour", "detection": True, "diagnosis": "Liver tumour",
              "segments": segment_list}
    specs = segment_specs(params)
    return DiagnosisResult(image_id, params, specs, label_path, present_label_values(label_path, specs), 2), reference


@pytest.mark.parametrize("ext", [".nii.gz", ".seg.nrrd"])
@pytest.mark.parametrize("transformed", [False, True])
def test_result_and_correction_on_the_ct_voxels(core, tmp_path, ext, transformed):
    """Defects 1, 3, 5: segments on the CT's voxels under a transform, no leaked nodes, correction round-trips."""
    slicer = core.slicer
    ct, _ = load_ct(core, tmp_path, transformed)
    logic = make_logic(core)
    result, reference = server_result(logic, ct, tmp_path, ext)
    assert [s.name for s in result.empty] == ["lung"]  # .seg.nrrd layers' own label values are not compared
    before = core.nodeIds()
    seg = logic.loadResult(result, ct)
    added = {core.scene.GetNodeByID(i).GetClassName() for i in core.nodeIds() - before}
    assert added == {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"} and len(core.nodeIds() - before) == 2
    assert seg.GetTransformNodeID() == ct.GetTransformNodeID()
    segmentation = seg.GetSegmentation()
    expected = masks()
    if ext == ".nii.gz":  # one value per voxel: the tumour wins inside the liver
        expected["liver"] = expected["liver"] & ~expected["liver tumour"]
    expected["lung"] = np.zeros(SIZE[::-1], bool)
    for spec in result.specs:
        segment_id = segmentation.GetSegmentIdBySegmentName(spec.name)
        segment = segmentation.GetSegment(segment_id)
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, ct)
        assert np.array_equal(voxels.astype(bool), expected[spec.name]), spec.name
        assert segment.GetColor() == pytest.approx(spec.color_float)
        assert core.module.segmentTag(segment, "RadDiag.Role") == spec.role
        entry = slicer.vtkSlicerTerminologyEntry()
        tag = core.module.segmentTag(segment, "TerminologyEntry")  # 5.8 has no vtkSegment.SetTerminology: the tag
        assert core.terminologies.DeserializeTerminologyEntry(tag, entry)
        assert entry.GetTypeObject().GetCodeValue() == segments.terminology(spec.name)["type"][1]
        assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment) == \
            slicer.vtkSlicerSegmentationsModuleLogic.InProgress

    before = core.nodeIds()
    path, ordered = logic.exportCorrection(seg, ct)
    assert core.nodeIds() == before  # no label map, display, storage or colour table left
    correction = sitk.ReadImage(path)
    assert correction.GetSize() == reference.GetSize()
    for a, b in [(correction.GetSpacing(), reference.GetSpacing()), (correction.GetOrigin(), reference.GetOrigin()),
                 (correction.GetDirection(), reference.GetDirection())]:
        assert np.allclose(a, b, atol=1e-4)
    wanted = np.zeros(SIZE[::-1], np.uint8)
    for position, spec in enumerate(export_order(result.specs), start=1):
        wanted[masks().get(spec.name, np.zeros(SIZE[::-1], bool))] = position
    assert np.array_equal(sitk.GetArrayFromImage(correction), wanted)


def test_export_volume_leaves_the_ct_storage_node_alone(core, tmp_path):
    """Defect 2: File > Save must still write the user's file, not our temporary copy."""
    ct, ct_path = load_ct(core, tmp_path, transformed=False)
    storage = ct.GetStorageNode()
    path, _ = make_logic(core).exportVolume(ct)
    assert ct.GetStorageNode() is storage and storage.GetFileName() == ct_path
    copy, original = sitk.ReadImage(path), sitk.ReadImage(ct_path)
    assert np.array_equal(sitk.GetArrayFromImage(copy), sitk.GetArrayFromImage(original))
    assert np.allclose(copy.GetDirection(), original.GetDirection(), atol=1e-6)


def test_unnamed_label_values_leave_no_ghost_voxels(core, tmp_path):
    """Defect 4: a label value the answer does not name must not stay in the shared layer."""
    slicer = core.slicer
    ct, _ = load_ct(core, tmp_path, transformed=False)
    logic = make_logic(core)
    reference = image_io.read_image(logic.exportVolume(ct)[0])
    labels = np.zeros(SIZE[::-1], np.uint8)
    labels[1, 2:5, 2:5], labels[2, 5:8, 5:9], labels[3, 1:3, 1:3] = 1, 2, 3  # 3 is not named
    path = str(tmp_path / "generic.nii.gz")
    image_io.write_label_map(path, labels, reference)
    params = {"label_names": {"liver": 1, "spleen": 2}}  # what a generic MONAI Label model sends
    specs = segment_specs(params)
    seg = logic.loadResult(DiagnosisResult("ct", params, specs, path, {1, 2, 3}, None), ct)
    assert sorted(seg.GetSegmentation().GetSegmentIDs()) == ["liver", "spleen"]
    new = seg.GetSegmentation().AddEmptySegment("drawn by the user")
    assert slicer.util.arrayFromSegmentBinaryLabelmap(seg, new, ct).sum() == 0
    correction, _ = logic.exportCorrection(seg, ct)
    assert sorted(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(correction)))) == [0, 1, 2]


def test_image_selector_offers_no_label_maps(core, tmp_path):
    """Defect 7: label maps (ours included) are not images to ask about."""
    label = core.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
    ct, _ = load_ct(core, tmp_path, transformed=False)
    logic = make_logic(core)
    assert logic.firstImageVolume() is ct
    with pytest.raises(ValueError, match="Select an image"):
        logic.exportVolume(label)
    ui = ET.parse(slicer_env.MODULE_DIR / "Resources" / "UI" / "RadDiag.ui")
    selector = next(w for w in ui.iter("widget") if w.get("name") == "inputVolumeSelector")
    show_children = next(p for p in selector.iter("property") if p.get("name") == "showChildNodeTypes")
    assert show_children.find("bool").text == "false"


def make_widget(core, monkeypatch, volume=None):
    """The module widget with mock Qt widgets (a full Slicer is needed for real ones) on the real scene."""
    import types
    from contextlib import contextmanager
    from unittest import mock

    slicer = core.slicer
    ui = mock.MagicMock()
    ui.serverUrlComboBox.currentText = "http://srv:8000"
    ui.tokenLineEdit.text = ""
    ui.modelComboBox.currentText = "raddiagseg"
    ui.currentSliceRadioButton.checked = True
    ui.customAnswerCheckBox.checked = False
    ui.detectionCheckBox.checked = True
    ui.diagnosisLineEdit.text = "Liver cyst"
    ui.questionTextEdit.toPlainText.return_value = "Is there a tumour?"
    ui.ttsCheckBox.checked, ui.ttsAnswersSpinBox.value, ui.ttsMasksSpinBox.value = False, 4, 4
    ui.rvls2mComboBox.currentText = "model default"
    ui.cotCheckBox.checked = False
    ui.forceCheckBox.checked = False
    ui.inputVolumeSelector.currentNode.return_value = volume

    @contextmanager
    def try_with_error_display(message, waitCursor=False):
        yield

    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    sys.modules["qt"].QTimer = mock.MagicMock
    sys.modules["qt"].QTableWidgetItem = str  # a table cell is recorded as its text
    monkeypatch.setattr(core.module, "QSettingsStore", DictSettings)
    widget = core.module.RadDiagWidget(types.SimpleNamespace(isEntered=True))
    widget.layout = mock.MagicMock()
    widget.setup()
    return widget, ui


def test_segment_editor_released_on_exit_and_scene_close(core, monkeypatch):
    """Defect 6: the embedded editor stops taking view events when the module is left or the scene closes.

    The Qt widgets are mocks (a full Slicer is needed for them); the scene and its close events are real.
    """
    widget, ui = make_widget(core, monkeypatch)
    editor = ui.segmentEditorWidget
    widget.enter()
    editor.installKeyboardShortcuts.assert_called()
    widget.exit()
    editor.setActiveEffect.assert_called_with(None)
    editor.uninstallKeyboardShortcuts.assert_called()
    editor.removeViewObservations.assert_called()
    editor.reset_mock()
    widget.segmentationNode = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    core.scene.Clear(0)
    editor.setSegmentationNode.assert_called_with(None)
    editor.removeViewObservations.assert_called()
    assert widget.segmentationNode is None
    node = editor.setMRMLSegmentEditorNode.call_args[0][0]  # after close: the editor node is in the scene again
    assert core.scene.GetNodeByID(node.GetID()) is node
    widget.cleanup()  # as Slicer does when the module is unloaded: no observers left on the scene
    editor.removeViewObservations.assert_called()


def test_current_slice_index_under_a_transform(core, tmp_path):
    ct, _ = load_ct(core, tmp_path, transformed=True)
    slice_node = core.slicer.vtkMRMLSliceNode()
    ijk_to_ras = __import__("vtk").vtkMatrix4x4()
    ct.GetIJKToRASMatrix(ijk_to_ras)
    point = [ijk_to_ras.GetElement(r, 3) + 4 * ijk_to_ras.GetElement(r, 2) for r in range(3)] + [1.0]
    world = ct.GetParentTransformNode().GetMatrixTransformToParent().MultiplyPoint(point)
    for r in range(3):
        slice_node.GetSliceToRAS().SetElement(r, 3, world[r])
    assert make_logic(core).currentSliceIndex(ct, slice_node) == 4


# ----------------------------------------------------------------------------- consent, submission, connect, retrain
class FakeClient:
    def __init__(self, url="http://srv:8000"):
        self.server_url, self.token = url, None


def asking_logic(core, answers):
    answers, asked = list(answers), []

    def ask(url):
        asked.append(url)
        return answers.pop(0)

    return core.module.RadDiagLogic(settings=DictSettings(), ask=ask), asked


def test_diagnosis_asks_consent_then_runs_raddiaglib(core, monkeypatch):
    import os

    calls = []

    def fake_diagnose(client, model, path, image_id, question, slice_index, ctx, result_dir, options):
        calls.append((client, model, path, image_id, question, slice_index, options))
        ctx.progress(0.5, "half")
        return "result"

    monkeypatch.setattr(core.module, "diagnose", fake_diagnose)
    logic, asked = asking_logic(core, [(False, False), (True, True)])
    logic.client = FakeClient()
    volume = core.slicer.util.addVolumeFromArray(np.full((5, 8, 8), -100, np.int16), name="CT chest")
    assert logic.startDiagnosis(volume, "Is there a tumour?", "raddiagseg", sliceIndex=3) is None
    assert calls == [] and os.listdir(logic.workDir) == []  # declined: nothing exported, nothing sent
    logic.consent = core.module.UploadConsent(logic.settings, logic.consent.ask)  # next session
    job = logic.startDiagnosis(volume, "  ", "raddiagseg", sliceIndex=3)
    assert job.wait(5) and job.result == "result"
    client, model, path, image_id, question, slice_index, options = calls[0]
    assert client is logic.client and model == "raddiagseg" and slice_index == 3 and options == {}
    assert question == core.module.DEFAULT_QUESTION  # empty box -> the default 3-step question
    assert os.path.exists(path) and image_id.startswith("CT_chest_")
    assert job.poll() == [(0.5, "half")]
    xray_pixels = np.zeros((1, 64, 64), np.uint8)
    xray_pixels[0, 10, 10] = 255
    xray = core.slicer.util.addVolumeFromArray(xray_pixels, name="cxr")
    logic.startDiagnosis(xray, "Q", "raddiagseg").wait(5)
    assert asked == ["http://srv:8000", "http://srv:8000"]  # "don't ask again" remembered
    assert calls[-1][6] == {"modality": "xray"}  # a one-slice 8-bit image is an X-ray, not a thin CT


def test_submission_sends_the_correction_in_export_order(core, tmp_path, monkeypatch):
    ct, _ = load_ct(core, tmp_path, transformed=False)
    logic = make_logic(core)
    logic.client = FakeClient()
    result, _ = server_result(logic, ct, tmp_path, ".nii.gz")
    seg = logic.loadResult(result, ct)
    segmentation = seg.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver tumour")).SetName("hepatic lesion")
    sent = []

    def fake_submit(client, image_id, label_path, specs, detection, diagnosis, answer, question, slice_index, model,
                    ctx):
        sent.append(dict(image_id=image_id, labels=sitk.GetArrayFromImage(sitk.ReadImage(label_path)),
                         names=[s.name for s in specs], diagnosis=diagnosis, slice=slice_index))
        return "ok"

    monkeypatch.setattr(core.module, "submit_correction", fake_submit)
    job = logic.startSubmission(seg, ct, "raddiagseg", True, "Liver cyst", sliceIndex=2)
    assert job.wait(5) and job.state == "done", job.error
    out = sent[0]
    assert out["names"] == ["liver", "lung", "hepatic lesion"]  # organs first, then abnormalities
    assert out["image_id"] == result.image_id and out["diagnosis"] == "Liver cyst" and out["slice"] == 2
    assert int((out["labels"] == 3).sum()) == int(masks()["liver tumour"].sum())


def test_submission_needs_a_raddiag_segmentation(core):
    logic = make_logic(core)
    logic.client = FakeClient()
    node = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(ValueError, match="Diagnose and segment first"):
        logic.startSubmission(node, None, "raddiagseg", True, "x")
    node.SetAttribute("RadDiag.ImageId", "ct_1")
    with pytest.raises(ValueError, match="needs a diagnosis"):
        logic.startSubmission(node, None, "raddiagseg", True, "  ")


def test_connect_and_retrain_use_the_client(core, monkeypatch):
    created = []

    class Client(FakeClient):
        def __init__(self, url, token=None):
            super().__init__(url.rstrip("/"))
            self.token = token
            created.append(self)

        def info(self):
            return {"models": {"raddiagseg": {}}}

        def models(self, info):
            return sorted(info["models"])

    monkeypatch.setattr(core.module, "RadDiagClient", Client)
    logic = make_logic(core)
    assert logic.connect("http://srv:8000/", "tok") == ["raddiagseg"]
    assert created[0].token == "tok" and logic.history.urls()[0] == "http://srv:8000"
    seen = []
    monkeypatch.setattr(core.module, "retrain", lambda client, model, ctx: seen.append((client, model)) or "done")
    job = logic.startRetraining("raddiagseg")
    assert job.wait(5) and job.result == "done" and seen == [(created[0], "raddiagseg")]


def test_widget_diagnose_cancel_answer_and_submit(core, tmp_path, monkeypatch):
    import threading

    from RadDiagLib import BackgroundJob

    ct, _ = load_ct(core, tmp_path, transformed=False)
    widget, ui = make_widget(core, monkeypatch, ct)
    assert widget._parameterNode.GetNodeReference("InputVolume") is ct  # the image, preselected
    result, _ = server_result(widget.logic, ct, tmp_path, ".seg.nrrd")
    result.params["latencies"] = {"total": 1.5}
    release, started = threading.Event(), {}

    def start_diagnosis(volume_node, question, model, slice_index, url, token, options=None):
        started.update(question=question, model=model, slice=slice_index, url=url, options=options)
        return BackgroundJob(lambda ctx: (release.wait(5), ctx.progress(0.5, "Asking the model…"), result)[2]).start()

    monkeypatch.setattr(widget.logic, "currentSliceIndex", lambda node: 2)
    monkeypatch.setattr(widget.logic, "startDiagnosis", start_diagnosis)
    widget.onDiagnoseOrCancel()
    assert started == {"question": "Is there a tumour?", "model": "raddiagseg", "slice": 2, "url": "http://srv:8000",
                       "options": {}}
    ui.diagnoseButton.setText.assert_called_with("Cancel")
    widget.pollJob()
    ui.answerBrowser.setHtml.assert_not_called()
    release.set()
    widget.job.wait(5)
    widget.pollJob()
    assert "Liver tumour" in ui.answerBrowser.setHtml.call_args[0][0]
    ui.segmentEditorWidget.setSegmentationNode.assert_called_with(widget.segmentationNode)
    status = ui.statusLabel.setText.call_args[0][0]
    assert "No voxels for: lung" in status and "liver" not in status  # .seg.nrrd presence by segment (defect 5)
    submitted = {}

    def start_submission(seg_node, volume_node, model, detection, diagnosis, answer, question, slice_index):
        submitted.update(detection=detection, diagnosis=diagnosis, answer=answer, slice=slice_index, seg=seg_node)
        return BackgroundJob(lambda ctx: ({"segments": [1, 2]}, {})).start()

    monkeypatch.setattr(widget.logic, "startSubmission", start_submission)
    widget.onSubmit()
    assert submitted == {"detection": True, "diagnosis": "Liver cyst", "answer": None, "slice": 2,
                         "seg": widget.segmentationNode}
    widget.job.wait(5)
    widget.pollJob()
    assert "Correction saved" in ui.statusLabel.setText.call_args[0][0]
    widget.cleanup()


def test_widget_cancel_discards_the_answer_and_options_reach_the_request(core, monkeypatch):
    from RadDiagLib import BackgroundJob

    widget, ui = make_widget(core, monkeypatch, core.slicer.util.addVolumeFromArray(np.zeros((3, 4, 4), np.int16)))
    ui.currentSliceRadioButton.checked = False  # whole volume
    ui.ttsCheckBox.checked, ui.ttsAnswersSpinBox.value, ui.ttsMasksSpinBox.value = True, 3, 2
    ui.rvls2mComboBox.currentText = "off"
    ui.cotCheckBox.checked = True
    ui.forceCheckBox.checked = True  # Answer anyway
    seen = {}

    def start_diagnosis(volume_node, question, model, slice_index, url, token, options=None):
        seen.update(slice=slice_index, options=options)
        return BackgroundJob(lambda ctx: [ctx.wait(0.01) for _ in iter(int, 1)]).start()

    monkeypatch.setattr(widget.logic, "startDiagnosis", start_diagnosis)
    widget.onDiagnoseOrCancel()
    widget.onDiagnoseOrCancel()  # the button now says Cancel
    widget.job.wait(5)
    widget.pollJob()
    ui.statusLabel.setText.assert_called_with("Cancelled.")
    ui.answerBrowser.setHtml.assert_not_called()
    assert widget.segmentationNode is None
    assert seen == {"slice": None, "options": {"tts": True, "tts_answers": 3, "tts_masks": 2, "rvls2m": False,
                                               "cot": True, "force": True}}
    widget.cleanup()


def test_module_self_test_runs_on_slicer_core(core):
    """RadDiagTest, the test Slicer's *Reload and Test* runs, passes on real slicer-core too."""
    core.module.RadDiagTest().runTest()


# ----------------------------------------------------------------------------- whole-volume findings (issue 23)
def volume_result(logic, ct, tmp_path, ext):
    """A whole-volume answer made as the server's infer task makes one: slice answers (scripted from known masks)
    combined by raddiagseg.findings on the exported image's view, label values and masks back in file order, and
    label_files.write. Liver on slices 1-5, one tumour on slices 2-4 away from the liver's centre."""
    path, image_id = logic.exportVolume(ct)
    image = image_io.read_image(path)
    liver, tumour = np.zeros(SIZE[::-1], bool), np.zeros(SIZE[::-1], bool)
    liver[1:6, 2:14, 2:18] = True
    tumour[2:5, 4:8, 11:16] = True
    view = image_io.VolumeView.of(image)
    organ, lesion = view.to_view(liver), view.to_view(tumour)
    n = organ.shape[0]
    model = ScriptedModel([three_step(organ[i], lesion[i]) for i in range(n)], organ)
    answer, _ = findings.answer_volume(model.ask, organ.shape, response.view_to_lps(view, image, organ.shape),
                                       templates.DEFAULT_QUESTION, slice_numbers=[view.view_index(i, n) for i in range(n)])
    segment_list = segments.assign(answer.names)
    answer.set_label_values({s["name"]: s["label_value"] for s in segment_list})
    label_path = str(tmp_path / f"volume{ext}")
    label_files.write(label_path, image, segment_list, {k: view.from_view(m) for k, m in answer.masks.items()})
    params = {"answer": answer.answer_text(), "detection": answer.detection, "diagnosis": answer.diagnosis,
              "segments": segment_list, "findings": answer.findings, "volume": answer.summary}
    specs = segment_specs(params)
    result = DiagnosisResult(image_id, params, specs, label_path, present_label_values(label_path, specs), None)
    return result, image, {"liver": liver, "liver tumour": tumour}


def slice_views(scene):
    """Red, Yellow, Green slice nodes as Slicer's layout manager makes them (orientation presets from the scene)."""
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    nodes = []
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.UnRegister(None)
        node.SetName(name)
        node.SetLayoutName(name)
        node.SetDefaultOrientation(orientation)
        node.SetOrientation(orientation)
        nodes.append(scene.AddNode(node))
    return nodes


def click_finding(core, widget, ui, views, ct, row):
    """Click table row `row`: every slice view must then be centred on the finding's centroid in world RAS (its LPS
    centroid with x, y negated, through the CT's parent transform, computed here with numpy) and lie on each view's
    plane. Returns the names of the segments holding the voxel there and the segment selected in the editor."""
    import vtk

    finding = widget.lastResult.params["findings"][row]
    to_world = np.eye(4)
    if ct.GetParentTransformNode() is not None:
        matrix = vtk.vtkMatrix4x4()
        ct.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
        to_world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    x, y, z = finding["centroid_lps_mm"]
    expected = (to_world @ [-x, -y, z, 1.0])[:3]
    widget.onFindingClicked(row, 0)
    for view in views:
        slice_to_ras = view.GetSliceToRAS()
        centre = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
        normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
        assert np.allclose(centre, expected, atol=0.5), (view.GetName(), centre, expected)
        assert abs(normal @ (expected - centre)) < 0.5  # the finding lies on every slice plane
    assert "views centred" in ui.statusLabel.setText.call_args[0][0]
    # the voxel there: world -> the CT's own frame -> IJK
    local, ras_to_ijk = [0.0, 0.0, 0.0], vtk.vtkMatrix4x4()
    ct.TransformPointFromWorld(list(expected), local)
    ct.GetRASToIJKMatrix(ras_to_ijk)
    i, j, k = (int(round(v)) for v in ras_to_ijk.MultiplyPoint([*local, 1.0])[:3])
    segmentation = widget.segmentationNode.GetSegmentation()
    holding = {segmentation.GetSegment(sid).GetName() for sid in segmentation.GetSegmentIDs()
               if core.slicer.util.arrayFromSegmentBinaryLabelmap(widget.segmentationNode, sid, ct)[k, j, i]}
    return holding, segmentation.GetSegment(ui.segmentEditorWidget.setCurrentSegmentID.call_args[0][0])


def assert_finding_segment(core, segment, finding):
    """The segment selected for a finding is the finding's, with the vocabulary's terminology."""
    assert segment.GetName() == finding["name"]
    entry = core.slicer.vtkSlicerTerminologyEntry()
    assert core.terminologies.DeserializeTerminologyEntry(core.module.segmentTag(segment, "TerminologyEntry"), entry)
    assert entry.GetTypeObject().GetCodeValue() == segments.terminology(finding["name"])["type"][1]


@pytest.mark.parametrize("ext", [".nii.gz", ".seg.nrrd"])
@pytest.mark.parametrize("transformed", [False, True])
def test_clicking_a_finding_centres_the_views_on_its_segment(core, tmp_path, monkeypatch, ext, transformed):
    """Issue 23: the findings table lists the server's measurements; a click moves every slice view to the finding's
    centroid in world RAS (under the CT's parent transform), where the loaded segmentation holds that finding."""
    ct, _ = load_ct(core, tmp_path, transformed)
    views = slice_views(core.scene)
    widget, ui = make_widget(core, monkeypatch, ct)
    result, image, truth = volume_result(widget.logic, ct, tmp_path, ext)
    widget.onDiagnoseFinished(result)
    found = result.params["findings"]
    assert [(f["name"], f["role"]) for f in found] == [("liver tumour", "abnormality"), ("liver", "organ")]
    ui.findingsTableWidget.setRowCount.assert_called_with(2)
    ui.findingsTableWidget.setVisible.assert_called_with(True)
    cells = {(c.args[0], c.args[1]): c.args[2] for c in ui.findingsTableWidget.setItem.call_args_list}
    tumour = found[0]
    assert [cells[(0, c)] for c in range(4)] == ["liver tumour, in the liver", f"{tumour['volume_ml']:.1f}",
                                                  f"{tumour['max_diameter_mm']:.1f}", "2–4"]
    assert cells[(1, 0)] == "liver" and cells[(1, 3)] == "1–5"
    for row, finding in enumerate(found):
        # the server's centroid is the physical centre of the finding's voxels in the exported file (LPS)
        centre_ijk = np.argwhere(truth[finding["name"]])[:, ::-1].mean(0)
        lps = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in centre_ijk))
        assert np.allclose(finding["centroid_lps_mm"], lps, atol=0.06)
        holding, selected = click_finding(core, widget, ui, views, ct, row)
        # one value per voxel in NIfTI; in .seg.nrrd the liver's layer includes the tumour in it
        assert holding == {finding["name"]} if ext == ".nii.gz" or row else holding == {"liver tumour", "liver"}
        assert_finding_segment(core, selected, finding)
        if ext == ".nii.gz":  # and the server's own label file has the finding's label value there
            labels = sitk.ReadImage(result.label_path)
            assert labels[labels.TransformPhysicalPointToIndex(lps)] == finding["label_value"]
    widget.cleanup()


@pytest.mark.skipif(not (app_studies.DEMO_MODEL / "model.safetensors").is_file(), reason="the demo model is not shipped")
def test_shipped_model_findings_on_the_sample_ct_under_a_transform(core, tmp_path, monkeypatch, app_server):
    """Issue 23 end to end: the module sends the bundled liver-tumour CT (under a parent transform) to a live server
    with the shipped model; each lesion of the whole-volume answer, clicked, centres the views on its segment."""
    (tmp_path / "no studies").mkdir()
    server = app_server("slicer_findings", copy_studies=tmp_path / "no studies")["server"]
    ct = core.slicer.util.loadVolume(str(app_studies.APP_DIR / "sample-studies" / "ct_liver_tumour.nii.gz"))
    put_under_transform(core, ct)
    views = slice_views(core.scene)
    widget, ui = make_widget(core, monkeypatch, ct)
    widget.logic.client = RadDiagClient(server.url, timeout=(5, 900))
    widget.logic.consent = core.module.UploadConsent(DictSettings(), lambda url: (True, False))  # "Yes" to the upload
    job = widget.logic.startDiagnosis(ct, DEFAULT_QUESTION, "raddiagseg")
    assert job.wait(900) and job.state == "done", job.error
    widget.onDiagnoseFinished(job.result)
    lesions = [r for r, f in enumerate(job.result.params["findings"]) if f["role"] == "abnormality"]
    assert lesions, job.result.answer
    for row in lesions:
        finding = job.result.params["findings"][row]
        holding, selected = click_finding(core, widget, ui, views, ct, row)
        assert finding["name"] in holding, (finding, holding)
        assert_finding_segment(core, selected, finding)
    widget.cleanup()


def test_findings_of_older_servers_and_slice_answers_leave_the_table_hidden(core, tmp_path, monkeypatch):
    ct, _ = load_ct(core, tmp_path, transformed=False)
    widget, ui = make_widget(core, monkeypatch, ct)
    result, _ = server_result(widget.logic, ct, tmp_path, ".nii.gz")  # no findings, no domain, no model keys
    widget.onDiagnoseFinished(result)
    ui.findingsTableWidget.setRowCount.assert_called_with(0)
    ui.findingsTableWidget.setVisible.assert_called_with(False)
    widget.onFindingClicked(0, 0)  # a stale click does nothing
    assert finding_rows({"findings": [{"name": "liver tumour"}]})[0].centroid_ras is None
    with pytest.raises(ValueError, match="no position"):
        widget.logic.jumpToFinding(finding_rows({"findings": [{"name": "liver tumour"}]})[0], ct)
    widget.cleanup()


def test_retrain_panel_shows_the_publishing_decision(core, monkeypatch):
    """Issue 26: after a run the Retrain panel says whether the new model went live, why, and both models' scores
    on both sets (train_stats as the app's trainer writes them, followed by RadDiagLib's retrain)."""
    def summary(score, dice_abn):
        return {"rows": 15, "score": score, "metrics": {"xray": {"dice_org": 0.968, "dice_abn": dice_abn}}}

    worse = [{"modality": "xray", "metric": "dice_abn", "served": 0.765, "candidate": 0.554, "upper_drop": 0.23}]
    stats = {"status": "DONE", "published": False, "step": 60, "total_steps": 60, "loss": 0.25,
             "reason": "X-ray Dice abnormality fell by 0.211 on the reference validation set (tolerance 0.02)",
             "reference": {"guarded": True},
             "gate": {"tolerance": 0.02, "attempts": [{"weight": 1.0, "published": False},
                                                      {"weight": 0.5, "published": False}], "sets": {
                 "reference": {"served": summary(0.87, 0.765), "candidate": summary(0.76, 0.554), "worse": worse},
                 "heldout_corrections": {"served": summary(0.7, 0.5), "candidate": summary(0.8, 0.6), "worse": []}}}}

    class TrainingServer(FakeClient):
        def start_training(self, model, params=None):
            return {"id": "train-1"}

        def training_status(self):
            return {"id": "train-1", "status": "DONE"}

        def train_stats(self, model):
            return stats

    widget, ui = make_widget(core, monkeypatch)
    widget.logic.client = TrainingServer()
    monkeypatch.setattr(core.module, "retrain", lambda client, model, ctx: retrain(client, model, ctx, poll_s=0.01))
    widget.onRetrainOrCancel()
    ui.retrainButton.setText.assert_called_with("Stop following")
    assert widget.job.wait(5) and widget.job.state == "done", widget.job.error
    widget.pollJob()
    shown = ui.trainingStatusLabel.setText.call_args[0][0]
    assert shown.startswith("Training finished; the old model stays live (X-ray Dice abnormality fell by 0.211")
    assert "Reference validation set (15 rows): score 0.870 → 0.760" in shown
    assert "X-ray: Dice organ 0.968 → 0.968, Dice abnormality 0.765 → 0.554 (worse: drop up to 0.230)" in shown
    assert "Candidates checked: fine-tuned model refused; blend weight 0.5 refused (shown: the last)" in shown
    assert "Held-out corrections (15 rows): score 0.700 → 0.800" in shown
    ui.retrainButton.setText.assert_called_with("Retrain")
    widget.cleanup()


def test_a_real_image_is_answered_with_a_refusal_that_names_the_model(core, tmp_path, monkeypatch, app_server):
    """Issue 21 item 5 in the module: a real MR volume that nibabel ships, loaded in Slicer and sent to a live server
    with the shipped demo model, gets no diagnosis; the answer panel warns that the image is outside what the model was
    trained on, says which model answered, that it was trained on synthetic phantoms only and is not for clinical
    use; detection and diagnosis are left empty for the user, and no segment is created."""
    import nibabel.testing

    if not (app_studies.DEMO_MODEL / "domain_stats.safetensors").is_file():
        pytest.skip("the demo model folder has no domain statistics")
    (tmp_path / "no studies").mkdir()
    server = app_server("slicer_refusal", copy_studies=tmp_path / "no studies")["server"]
    mr = core.slicer.util.loadVolume(str(Path(nibabel.testing.data_path) / "anatomical.nii"))
    widget, ui = make_widget(core, monkeypatch, mr)
    widget.logic.client = RadDiagClient(server.url, timeout=(5, 300))
    widget.logic.consent = core.module.UploadConsent(DictSettings(), lambda url: (True, False))
    job = widget.logic.startDiagnosis(mr, DEFAULT_QUESTION, "raddiagseg", sliceIndex=12)
    assert job.wait(300) and job.state == "done", job.error
    assert job.result.params["domain"]["in_domain"] is False and job.result.params["diagnosis"] is None
    widget.onDiagnoseFinished(job.result)
    page = ui.answerBrowser.setHtml.call_args[0][0]
    assert "<b>Warning:</b> This image is outside what the model was trained on" in page, page
    assert "No diagnosis was given." in page and "<b>No diagnosis given</b>" in page
    assert "Answered by raddiagseg-demo: trained on synthetic phantoms only" in page and "not for clinical use" in page
    assert "Outside the model's domain" in ui.statusLabel.setText.call_args[0][0]
    ui.detectionCheckBox.setChecked.assert_called_with(False)
    ui.diagnosisLineEdit.setText.assert_called_with("")
    segmentation = widget.segmentationNode.GetSegmentation() if widget.segmentationNode is not None else None
    assert segmentation is None or segmentation.GetNumberOfSegments() == 0
    widget.cleanup()
