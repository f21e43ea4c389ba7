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
from RadDiagLib import DictSettings, export_order, segment_specs
from RadDiagLib.labelmap import present_label_values
from RadDiagLib.workflow import DiagnosisResult

APP_DIR = Path(__file__).resolve().parents[1] / "MONAILabelApp"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))
from lib import image_io, label_files, segments  # noqa: E402

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
        import vtk

        matrix = vtk.vtkMatrix4x4()
        for r, row in enumerate([[0, -1, 0, 25.0], [1, 0, 0, -7.0], [0, 0, 1, 4.0]]):
            for col, value in enumerate(row):
                matrix.SetElement(r, col, value)
        transform = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        transform.SetMatrixTransformToParent(matrix)
        ct.SetAndObserveTransformNodeID(transform.GetID())
    return ct, path


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


def test_segment_editor_released_on_exit_and_scene_close(core, monkeypatch):
    """Defect 6: the embedded editor stops taking view events when the module is left or the scene closes.

    The Qt widgets are mocks (a full Slicer is needed for them); the scene and its close events are real.
    """
    import types
    from unittest import mock

    slicer = core.slicer
    ui = mock.MagicMock()
    ui.serverUrlComboBox.currentText = "http://127.0.0.1:8000"
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    sys.modules["qt"].QTimer = mock.MagicMock
    monkeypatch.setattr(core.module, "QSettingsStore", DictSettings)
    widget = core.module.RadDiagWidget(types.SimpleNamespace(isEntered=True))
    widget.layout = mock.MagicMock()
    widget.setup()
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
