"""Import RadDiag.py with stub slicer/qt/ctk/vtk modules and check that its logic drives RadDiagLib correctly.

3D Slicer cannot be installed here. The stubs mimic the few Slicer calls the module makes, with
the behaviour we verified in Slicer (DESIGN §9): ImportLabelmapToSegmentationNode maps label
value i+1 to ids[i] and drops values without voxels; ExportSegmentsToLabelmapNode writes
position+1. The module's own ScriptedLoadableModuleTest covers the real thing inside Slicer.
"""

import importlib
import sys
import types

import numpy as np
import pytest

from RadDiagLib import DictSettings, segment_specs
from RadDiagLib.labelmap import read_label_array, write_nrrd
from RadDiagLib.workflow import DiagnosisResult

RESPONSE = {
    "answer": "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
    "detection": True, "diagnosis": "Liver tumour", "question": "Q",
    "segments": [{"name": "liver", "role": "organ", "label_value": 1, "color": [221, 130, 101],
                  "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                                  "type": ["SCT", "10200004", "Liver"]}},
                 {"name": "liver tumour", "role": "abnormality", "label_value": 2, "color": [240, 60, 60]}],
}


# ----------------------------------------------------------------------------- stubs
class Mutable:
    def __init__(self, value):
        self.value = value

    def set(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


class StringArray:
    def __init__(self):
        self.values = []

    def InsertNextValue(self, value):
        self.values.append(value)


class Matrix4x4:
    def __init__(self, array=None):
        self.array = np.eye(4) if array is None else np.array(array, float)

    def GetElement(self, r, c):
        return float(self.array[r, c])

    @staticmethod
    def Multiply4x4(a, b, out):
        out.array = a.array @ b.array


class Segment:
    def __init__(self, name, color=(0.5, 0.5, 0.5)):
        self.name, self.color, self.tags = name, tuple(color), {}

    def SetName(self, name):
        self.name = name

    def GetName(self):
        return self.name

    def SetColor(self, r, g, b):
        self.color = (r, g, b)

    def GetColor(self):
        return self.color

    def SetTag(self, key, value):
        self.tags[key] = value

    def GetTag(self, key, out):
        if key in self.tags:
            out.set(self.tags[key])
            return True
        return False


class Segmentation:
    def __init__(self):
        self.segments = {}
        self.voxels = {}

    def GetSegmentIDs(self):
        return list(self.segments)

    def GetSegment(self, segment_id):
        return self.segments.get(segment_id)

    def GetSegmentIdBySegmentName(self, name):
        return next((k for k, s in self.segments.items() if s.name == name), "")

    def AddEmptySegment(self, segment_id, name, color):
        self.segments[segment_id] = Segment(name, color)
        return segment_id

    def RemoveSegment(self, segment_id):
        self.segments.pop(segment_id)
        self.voxels.pop(segment_id, None)


class Node:
    def __init__(self, class_name, name=""):
        self.class_name, self.name, self.attributes = class_name, name, {}
        self.segmentation = Segmentation()
        self.path = None
        self.ijk_to_ras = np.eye(4)
        self.dims = (8, 8, 5)
        self.scalar_range = (-1000.0, 400.0)

    def GetName(self):
        return self.name

    def GetID(self):
        return f"{self.class_name}:{self.name}"

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def CreateDefaultDisplayNodes(self):
        pass

    def SetReferenceImageGeometryParameterFromVolumeNode(self, node):
        self.reference = node

    def GetSegmentation(self):
        return self.segmentation

    def GetImageData(self):
        return types.SimpleNamespace(GetDimensions=lambda: self.dims, GetScalarRange=lambda: self.scalar_range)

    def GetIJKToRASMatrix(self, matrix):
        matrix.array = self.ijk_to_ras.copy()

    def GetParentTransformNode(self):
        return None


class Scene:
    def __init__(self):
        self.nodes = []

    def AddNewNodeByClass(self, class_name, name=""):
        node = Node(class_name, name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node):
        self.nodes.remove(node)

    def GenerateUniqueName(self, name):
        return name


class SegmentationsLogic:
    def __init__(self):
        self.calls = []

    def ImportLabelmapToSegmentationNode(self, label_node, segmentation_node, ids):
        self.calls.append(("import", list(ids.values)))
        labels = read_label_array(label_node.path)
        for i, segment_id in enumerate(ids.values):
            mask = labels == i + 1
            if mask.any():  # Slicer drops label values without voxels
                segmentation_node.segmentation.segments[segment_id] = Segment(segment_id)
                segmentation_node.segmentation.voxels[segment_id] = mask
        return True

    def ExportSegmentsToLabelmapNode(self, segmentation_node, ids, label_node, reference):
        self.calls.append(("export", list(ids.values)))
        shape = next(iter(segmentation_node.segmentation.voxels.values())).shape
        labels = np.zeros(shape, np.uint8)
        for position, segment_id in enumerate(ids.values):
            mask = segmentation_node.segmentation.voxels.get(segment_id)
            if mask is not None:
                labels[mask] = position + 1  # later segments win
        label_node.labels = labels
        return True


def install_stubs(monkeypatch, tmp_path):
    scene = Scene()
    seg_logic = SegmentationsLogic()
    saved = []

    def save_node(node, path, properties=None):
        if getattr(node, "labels", None) is not None:
            write_nrrd(path, node.labels)
        else:
            write_nrrd(path, np.zeros(node.dims, np.int16))
        saved.append((node, path))
        return True

    def load_label_volume(path, properties=None):
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "label")
        node.path = path
        return node

    class Base:
        def __init__(self, *args):
            self.parent = types.SimpleNamespace()

        def getParameterNode(self):
            return None

        def setup(self):
            pass

    status_calls = []

    class SegLogicStatics:
        InProgress = 2

        @staticmethod
        def SetSegmentStatus(segment, status):
            status_calls.append((segment.name, status))
            segment.tags["Segmentation.Status"] = "inprogress"

    slicer = types.ModuleType("slicer")
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(connect=lambda *a: None)
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: seg_logic))
    slicer.vtkSlicerSegmentationsModuleLogic = SegLogicStatics
    util = types.ModuleType("slicer.util")
    util.saveNode = save_node
    util.loadLabelVolume = load_label_volume
    util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None,
                                                                "addObserver": lambda self, *a: None,
                                                                "removeObservers": lambda self: None})
    util.mainWindow = lambda: None
    slicer.util = util
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (Base,), {}))
    slicer.ScriptedLoadableModule = slm
    vtk = types.ModuleType("vtk")
    vtk.vtkStringArray, vtk.vtkMatrix4x4, vtk.mutable = StringArray, Matrix4x4, Mutable
    qt = types.ModuleType("qt")
    qt.QSettings = lambda: pytest.fail("tests pass their own settings store")
    ctk = types.ModuleType("ctk")
    for name, module in [("slicer", slicer), ("slicer.util", util), ("slicer.ScriptedLoadableModule", slm),
                         ("vtk", vtk), ("qt", qt), ("ctk", ctk)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "RadDiag", raising=False)
    module = importlib.import_module("RadDiag")
    return types.SimpleNamespace(module=module, scene=scene, seg_logic=seg_logic, saved=saved, status=status_calls)


@pytest.fixture()
def env(monkeypatch, tmp_path):
    stubs = install_stubs(monkeypatch, tmp_path)
    yield stubs
    sys.modules.pop("RadDiag", None)


def make_logic(env, answers=((True, False),)):
    answers = list(answers)
    asked = []

    def ask(url):
        asked.append(url)
        return answers.pop(0)

    logic = env.module.RadDiagLogic(settings=DictSettings(), ask=ask)
    return logic, asked


class FakeClient:
    def __init__(self, url="http://srv:8000"):
        self.server_url, self.token = url, None


# ----------------------------------------------------------------------------- tests
def test_module_metadata(env):
    module = env.module.RadDiag(types.SimpleNamespace())
    assert module.parent.title == "RadDiag" and "Segmentation" in module.parent.categories


def test_diagnosis_asks_consent_then_runs_raddiaglib(env, monkeypatch):
    calls = []

    def fake_diagnose(client, model, path, image_id, question, slice_index, ctx, result_dir, options):
        calls.append((client, model, path, image_id, question, slice_index, options))
        ctx.progress(0.5, "half")
        return "result"

    monkeypatch.setattr(env.module, "diagnose", fake_diagnose)
    logic, asked = make_logic(env, answers=[(False, False), (True, True)])
    logic.client = FakeClient()
    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT chest")

    assert logic.startDiagnosis(volume, "Is there a tumour?", "raddiagseg", sliceIndex=3) is None
    assert calls == [] and env.saved == []  # declined: nothing exported, nothing sent
    logic.consent = env.module.UploadConsent(logic.settings, logic.consent.ask)  # next session
    job = logic.startDiagnosis(volume, "  ", "raddiagseg", sliceIndex=3)
    assert job.wait(5) and job.result == "result"
    client, model, path, image_id, question, slice_index, options = calls[0]
    assert client is logic.client and model == "raddiagseg" and slice_index == 3 and options == {}
    assert question == env.module.DEFAULT_QUESTION  # empty box -> the default 3-step question
    assert path == env.saved[0][1] and image_id.startswith("CT_chest_")
    assert job.poll() == [(0.5, "half")]
    assert asked == ["http://srv:8000", "http://srv:8000"]
    xray = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cxr")
    xray.dims, xray.scalar_range = (64, 64, 1), (0.0, 255.0)
    logic.startDiagnosis(xray, "Q", "raddiagseg").wait(5)
    assert len(asked) == 2  # "don't ask again" remembered
    assert calls[-1][6] == {"modality": "xray"}  # a one-slice 8-bit image is an X-ray, not a thin CT


def test_current_slice_index_uses_the_axial_voxel_axis(env):
    logic, _ = make_logic(env)
    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    volume.ijk_to_ras = np.array([[0, 0, 0.8, -10], [0.7, 0, 0, 5], [0, -2.5, 0, 20], [0, 0, 0, 1]], float)
    volume.dims = (30, 9, 40)  # j runs inferior: slice j is at S = 20 - 2.5 j

    class SliceNode:
        def GetSliceToRAS(self):
            m = np.eye(4)
            m[:3, 3] = [0, 8, 20 - 2.5 * 6]
            return Matrix4x4(m)

    assert logic.currentSliceIndex(volume, SliceNode()) == 6


def test_load_result_creates_named_coloured_segments_and_empty_ones(env, tmp_path):
    logic, _ = make_logic(env)
    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    labels = np.zeros((8, 8, 5), np.uint8)
    labels[2:6, 2:6, 2] = 1  # liver only: the tumour has no voxels
    path = str(tmp_path / "label.nrrd")
    write_nrrd(path, labels)
    specs = segment_specs(RESPONSE)
    result = DiagnosisResult("ct_1", RESPONSE, specs, path, {1}, 2)
    node = logic.loadResult(result, volume)
    assert env.seg_logic.calls == [("import", ["liver", "liver tumour"])]
    segments = node.segmentation.segments
    assert set(segments) == {"liver", "liver tumour"}
    assert segments["liver"].color == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert segments["liver tumour"].color == pytest.approx((240 / 255, 60 / 255, 60 / 255))
    assert "10200004" in segments["liver"].tags["TerminologyEntry"]
    assert segments["liver tumour"].tags["RadDiag.Role"] == "abnormality"
    assert sorted(name for name, _ in env.status) == ["liver", "liver tumour"]  # status "in progress"
    assert node.GetAttribute("RadDiag.ImageId") == "ct_1" and node.GetAttribute("RadDiag.Slice") == "2"
    assert not [n for n in env.scene.nodes if n.class_name == "vtkMRMLLabelMapVolumeNode"]  # temp label map removed


def test_correction_export_order_and_submission(env, tmp_path, monkeypatch):
    logic, _ = make_logic(env)
    logic.client = FakeClient()
    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    labels = np.zeros((8, 8, 5), np.uint8)
    labels[1:7, 1:7, 2] = 1
    labels[3:5, 3:5, 2] = 2
    path = str(tmp_path / "label.nrrd")
    write_nrrd(path, labels)
    reversed_response = dict(RESPONSE, segments=[dict(RESPONSE["segments"][0], label_value=2),
                                                 dict(RESPONSE["segments"][1], label_value=1)])
    specs = segment_specs(reversed_response)  # tumour = 1, liver = 2 on the server
    node = logic.loadResult(DiagnosisResult("ct_1", reversed_response, specs, path, {1, 2}, 2), volume)
    node.segmentation.segments["liver tumour"].SetName("hepatic lesion")  # the user renames it

    sent = []

    def fake_submit(client, image_id, label_path, specs, detection, diagnosis, answer, question, slice_index, model, ctx):
        sent.append(dict(image_id=image_id, labels=read_label_array(label_path), names=[s.name for s in specs],
                         detection=detection, diagnosis=diagnosis, slice=slice_index, model=model))
        return "ok"

    monkeypatch.setattr(env.module, "submit_correction", fake_submit)
    job = logic.startSubmission(node, volume, "raddiagseg", True, "Liver cyst", sliceIndex=2)
    assert job.wait(5) and job.state == "done", job.error
    assert env.seg_logic.calls[-1] == ("export", ["liver", "liver tumour"])  # organ first, whatever the server order
    out = sent[0]
    assert out["names"] == ["liver", "hepatic lesion"] and out["image_id"] == "ct_1"
    assert out["diagnosis"] == "Liver cyst" and out["slice"] == 2
    exported = out["labels"]
    # on the server the tumour (1) was the ring and the liver (2) the centre; exported: liver 1, lesion 2
    assert exported[3, 3, 2] == 1 and exported[1, 1, 2] == 2
    assert not [n for n in env.scene.nodes if n.class_name == "vtkMRMLLabelMapVolumeNode"]


def test_submission_needs_a_raddiag_segmentation(env):
    logic, _ = make_logic(env)
    logic.client = FakeClient()
    node = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    with pytest.raises(ValueError, match="Diagnose and segment first"):
        logic.startSubmission(node, None, "raddiagseg", True, "x")
    node.SetAttribute("RadDiag.ImageId", "ct_1")
    with pytest.raises(ValueError, match="needs a diagnosis"):
        logic.startSubmission(node, None, "raddiagseg", True, "  ")
    assert not env.seg_logic.calls  # nothing exported


def test_connect_and_retrain_use_the_client(env, monkeypatch):
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

    monkeypatch.setattr(env.module, "RadDiagClient", Client)
    logic, _ = make_logic(env)
    assert logic.connect("http://srv:8000/", "tok") == ["raddiagseg"]
    assert created[0].token == "tok" and logic.history.urls()[0] == "http://srv:8000"
    seen = []
    monkeypatch.setattr(env.module, "retrain", lambda client, model, ctx: seen.append((client, model)) or "done")
    job = logic.startRetraining("raddiagseg")
    assert job.wait(5) and job.result == "done" and seen == [(created[0], "raddiagseg")]


# ----------------------------------------------------------------------------- the widget, with mock Qt widgets
class ParameterNode:
    def __init__(self):
        self.params, self.refs = {}, {}

    def GetParameter(self, key):
        return self.params.get(key, "")

    def SetParameter(self, key, value):
        self.params[key] = value

    def GetNodeReference(self, key):
        return self.refs.get(key)

    def SetNodeReferenceID(self, key, node_id):
        self.refs[key] = node_id


def widget_env(env, monkeypatch, volume):
    from contextlib import contextmanager
    from unittest import mock

    slicer = sys.modules["slicer"]
    ui = types.SimpleNamespace()
    names = ["serverUrlComboBox", "connectButton", "tokenLineEdit", "modelComboBox", "connectionStatusLabel",
             "inputVolumeSelector", "questionTextEdit", "currentSliceRadioButton", "wholeVolumeRadioButton",
             "resetQuestionButton", "diagnoseButton", "progressBar", "statusLabel", "answerBrowser",
             "openSegmentEditorButton", "segmentEditorWidget", "detectionCheckBox", "diagnosisLineEdit",
             "customAnswerCheckBox", "answerTextEdit", "submitButton", "retrainButton", "trainingProgressBar",
             "trainingStatusLabel", "resetConsentButton", "ttsCheckBox", "ttsAnswersSpinBox", "ttsMasksSpinBox",
             "rvls2mComboBox", "cotCheckBox"]
    for name in names:
        setattr(ui, name, mock.MagicMock(name=name))
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
    ui.inputVolumeSelector.currentNode.return_value = volume

    @contextmanager
    def try_with_error_display(message, waitCursor=False):
        yield

    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display, raising=False)
    scene = env.scene
    scene.StartCloseEvent = "StartCloseEvent"
    scene.GetSingletonNode = lambda tag, cls: None
    scene.CreateNodeByClass = lambda cls: mock.MagicMock()
    scene.AddNode = lambda node: node
    scene.GetFirstNodeByClass = lambda cls: volume
    qt = sys.modules["qt"]
    qt.QTimer = mock.MagicMock
    parameter_node = ParameterNode()
    module = env.module
    module.RadDiagLogic.getParameterNode = lambda self: parameter_node
    module.RadDiagWidget.resourcePath = lambda self, path: path
    monkeypatch.setattr(module, "QSettingsStore", DictSettings)
    widget = module.RadDiagWidget()
    widget.layout = mock.MagicMock()
    widget.setup()
    return widget, ui, parameter_node


def test_widget_diagnose_cancel_answer_and_submit(env, monkeypatch, tmp_path):
    from RadDiagLib import BackgroundJob

    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    widget, ui, parameter_node = widget_env(env, monkeypatch, volume)
    ui.questionTextEdit.setPlainText.assert_called_with(env.module.DEFAULT_QUESTION)
    assert parameter_node.params["Question"] == env.module.DEFAULT_QUESTION

    labels = np.zeros((8, 8, 5), np.uint8)
    labels[2:6, 2:6, 2] = 1
    path = str(tmp_path / "label.nrrd")
    write_nrrd(path, labels)
    result = DiagnosisResult("ct_1", dict(RESPONSE, latencies={"total": 1.5}), segment_specs(RESPONSE), path, {1}, 2)
    release = __import__("threading").Event()
    started = {}

    def start_diagnosis(volume_node, question, model, slice_index, url, token, options=None):
        started.update(question=question, model=model, slice=slice_index, url=url, options=options)
        return BackgroundJob(lambda ctx: (release.wait(5), ctx.progress(0.5, "Asking the model…"), result)[2]).start()

    monkeypatch.setattr(widget.logic, "currentSliceIndex", lambda node: 2)
    monkeypatch.setattr(widget.logic, "startDiagnosis", start_diagnosis)
    widget.onDiagnoseOrCancel()
    assert started == {"question": "Is there a tumour?", "model": "raddiagseg", "slice": 2, "url": "http://srv:8000",
                       "options": {}}  # Options section left at its defaults: nothing extra sent
    ui.diagnoseButton.setText.assert_called_with("Cancel")
    widget.pollJob()  # still running: nothing finished
    ui.answerBrowser.setHtml.assert_not_called()
    release.set()
    widget.job.wait(5)
    widget.pollJob()
    ui.diagnoseButton.setText.assert_called_with("Diagnose and segment")
    html = ui.answerBrowser.setHtml.call_args[0][0]
    assert "Abnormality detected" in html and "Liver tumour" in html
    ui.diagnosisLineEdit.setText.assert_called_with("Liver tumour")
    ui.detectionCheckBox.setChecked.assert_called_with(True)
    ui.segmentEditorWidget.setSegmentationNode.assert_called_with(widget.segmentationNode)
    assert set(widget.segmentationNode.segmentation.segments) == {"liver", "liver tumour"}
    assert "No voxels for: liver tumour" in ui.statusLabel.setText.call_args[0][0]

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


def test_widget_cancel_discards_the_answer(env, monkeypatch):
    from RadDiagLib import BackgroundJob

    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    widget, ui, _ = widget_env(env, monkeypatch, volume)
    ui.currentSliceRadioButton.checked = False  # whole volume

    def start_diagnosis(volume_node, question, model, slice_index, url, token, options=None):
        assert slice_index is None
        return BackgroundJob(lambda ctx: [ctx.wait(0.01) for _ in iter(int, 1)]).start()

    monkeypatch.setattr(widget.logic, "startDiagnosis", start_diagnosis)
    widget.onDiagnoseOrCancel()
    widget.onDiagnoseOrCancel()  # the button now says Cancel
    widget.job.wait(5)
    widget.pollJob()
    ui.statusLabel.setText.assert_called_with("Cancelled.")
    ui.answerBrowser.setHtml.assert_not_called()
    assert widget.segmentationNode is None


def test_widget_options_section_sets_the_infer_params(env, monkeypatch):
    """Issue 10: test-time scaling (m x n), RVLS2M on/off and chain of thought reach the request; logic merges them."""
    from RadDiagLib import BackgroundJob

    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    widget, ui, _ = widget_env(env, monkeypatch, volume)
    ui.rvls2mComboBox.addItems.assert_called_with(["model default", "on", "off"])
    ui.ttsCheckBox.checked, ui.ttsAnswersSpinBox.value, ui.ttsMasksSpinBox.value = True, 3, 2
    ui.rvls2mComboBox.currentText = "off"
    ui.cotCheckBox.checked = True
    seen = {}

    def start_diagnosis(volume_node, question, model, slice_index, url, token, options=None):
        seen["options"] = options
        return BackgroundJob(lambda ctx: None).start()

    monkeypatch.setattr(widget.logic, "currentSliceIndex", lambda node: 1)
    monkeypatch.setattr(widget.logic, "startDiagnosis", start_diagnosis)
    widget.onDiagnoseOrCancel()
    widget.job.wait(5)
    assert seen["options"] == {"tts": True, "tts_answers": 3, "tts_masks": 2, "rvls2m": False, "cot": True}

    calls = []
    monkeypatch.setattr(env.module, "diagnose", lambda *args: calls.append(args[-1]) or "result")
    logic, _ = make_logic(env, answers=[(True, True)])
    logic.client = FakeClient()
    logic.startDiagnosis(volume, "Q", "raddiagseg", sliceIndex=1, options={"cot": True}).wait(5)
    assert calls[-1] == {"cot": True}
