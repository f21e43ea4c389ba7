"""RadDiag: ask a question about a CT or chest X-ray, get a diagnostic answer and named segments.

Thin Slicer glue. Networking, parsing, label mapping, consent and background jobs live in
RadDiagLib (no Slicer imports, tested with pytest); this file moves data between MRML nodes,
files and RadDiagLib, and keeps the GUI responsive by polling background jobs with a QTimer.
"""

import contextlib
import logging
import os
import tempfile

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import RadDiagLib
from RadDiagLib import (DEFAULT_MODEL, DEFAULT_QUESTION, FINDING_COLUMNS, RVLS2M_CHOICES, BackgroundJob, RadDiagClient,
                        ServerError, UploadConsent, UrlHistory, answer_html, domain_warning, export_order,
                        finding_rows, infer_options)
from RadDiagLib.client import normalise_url
from RadDiagLib.geometry import modality_hint, slice_index_at
from RadDiagLib.labelmap import seg_nrrd_segments, read_nrrd
from RadDiagLib.segments import SegmentSpec, import_segment_ids, match_file_segments
from RadDiagLib.workflow import diagnose, image_id_for, retrain, submit_correction

ROLE_TAG = "RadDiag.Role"
LABEL_VALUE_TAG = "RadDiag.LabelValue"
TERMINOLOGY_TAG = "TerminologyEntry"
POLL_MS = 100


class RadDiag(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadDiag"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["RadDiag contributors"]
        self.parent.helpText = (
            "Ask a question about a CT slice, CT volume or chest X-ray and get a diagnostic answer with named, "
            "coloured segments from a RadDiag MONAI Label server. Correct the segments and diagnosis, submit the "
            "correction, and retrain the model on the server. "
            '<a href="https://github.com/raddiag/raddiag/tree/main/SlicerRadDiag">Documentation</a>.')
        self.parent.acknowledgementText = (
            "Model after RadDiagSeg-M (SAM/MedSAM, BiomedCLIP, Gemma-2); served with MONAI Label. "
            "Not a medical device: answers must be reviewed by a qualified clinician.")
        slicer.app.connect("startupCompleted()", loadTerminology)


def terminologyPath():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Terminology", "RadDiag.term.json")


def loadTerminology():
    """Make codes Slicer's lists lack (e.g. ground-glass opacity, DCM 112120) selectable."""
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(terminologyPath())
    except Exception:  # never block startup over a terminology list
        logging.exception("RadDiag: could not load %s", terminologyPath())


class QSettingsStore:
    """RadDiagLib's settings-store interface over Slicer's persistent QSettings."""

    def get(self, key, default=None):
        value = qt.QSettings().value(key)
        return default if value is None else value

    def set(self, key, value):
        qt.QSettings().setValue(key, value)


def askUploadConsent(serverUrl):
    """Modal question before image data leaves the computer; returns (allow, don't ask again)."""
    box = qt.QMessageBox(slicer.util.mainWindow())
    box.setWindowTitle("RadDiag: send image?")
    box.setIcon(qt.QMessageBox.Question)
    box.setText(f"The image will be sent to the server {serverUrl} to be analysed"
                " (and stored there with any correction you submit). Continue?")
    box.setStandardButtons(qt.QMessageBox.Yes | qt.QMessageBox.No)
    checkBox = qt.QCheckBox("Don't ask again for this server")
    box.setCheckBox(checkBox)
    allow = box.exec_() == qt.QMessageBox.Yes
    return allow, bool(checkBox.checked)


def segmentTag(segment, key):
    """A segment tag's value, "" when absent."""
    value = vtk.mutable("")
    return str(value) if segment.GetTag(key, value) else ""


def isImageVolume(node):
    """A scalar volume the user can ask about: not a label map (a subclass of scalar volumes)."""
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")


def writeNodeData(node, path):
    """Write a node's data to `path` through a storage node of our own; returns success.

    slicer.util.saveNode would re-point the node's own storage node to `path`, and File > Save and
    saved scenes would then refer to our temporary folder. Volumes are written in their own (local)
    geometry, which is what the server's answer refers to.
    """
    storageNode = node.CreateDefaultStorageNode()
    storageNode.UnRegister(None)  # owned by the Python variable
    storageNode.SetFileName(path)
    storageNode.SetUseCompression(True)
    return bool(storageNode.WriteData(node))


@contextlib.contextmanager
def temporaryNodes():
    """Remove every node added to the scene inside the block when it ends.

    RemoveNode does not take a node's display, storage or colour-table nodes with it, and loading
    or exporting a label map creates them: all of them go.
    """
    scene = slicer.mrmlScene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            scene.RemoveNode(node)


class RadDiagLogic(ScriptedLoadableModuleLogic):
    """Node handling and job creation; the widget only wires buttons to these methods."""

    def __init__(self, settings=None, ask=askUploadConsent):
        ScriptedLoadableModuleLogic.__init__(self)
        self.settings = settings or QSettingsStore()
        self.consent = UploadConsent(self.settings, ask)
        self.history = UrlHistory(self.settings)
        self.client = None
        self.info = {}
        self.workDir = tempfile.mkdtemp(prefix="RadDiag_")

    def setDefaultParameters(self, parameterNode):
        defaults = {"ServerUrl": self.history.urls()[0], "Model": DEFAULT_MODEL, "Question": DEFAULT_QUESTION,
                    "Scope": "slice"}
        for key, value in defaults.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    # ------------------------------------------------------------------ server
    def connect(self, serverUrl, token=""):
        """Create the client and read /info/; returns the model names. Raises ServerError."""
        client = RadDiagClient(serverUrl, token=token or None)
        info = client.info()
        self.client, self.info = client, info
        self.history.add(client.server_url)
        return client.models(info)

    def requireClient(self, serverUrl, token=""):
        if self.client is None or self.client.server_url != normalise_url(serverUrl) or (
                (token or None) != self.client.token):
            self.connect(serverUrl, token)
        return self.client

    # ------------------------------------------------------------------ diagnose
    def currentSliceIndex(self, volumeNode, sliceNode=None):
        """Index (along the volume's through-plane axis) of the slice shown in the red view."""
        sliceNode = sliceNode or slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        sliceToRas = sliceNode.GetSliceToRAS()
        center = [sliceToRas.GetElement(r, 3) for r in range(3)]
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        transform = volumeNode.GetParentTransformNode()
        if transform is not None:
            toWorld = vtk.vtkMatrix4x4()
            if not transform.GetMatrixTransformToWorld(toWorld):
                raise ValueError("the image is under a non-linear transform: harden it before asking about a slice")
            vtk.vtkMatrix4x4.Multiply4x4(toWorld, ijkToRas, ijkToRas)
        matrix = [[ijkToRas.GetElement(r, c) for c in range(4)] for r in range(4)]
        return slice_index_at(matrix, volumeNode.GetImageData().GetDimensions(), center)

    @staticmethod
    def firstImageVolume():
        """The first volume in the scene that can be asked about (label maps are not), or None."""
        scene = slicer.mrmlScene
        nodes = (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                 for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
        return next((node for node in nodes if isImageVolume(node) and not node.GetHideFromEditors()), None)

    @staticmethod
    def segmentEditorNode():
        """The embedded Segment Editor's own parameter node (a singleton, so it survives scene close)."""
        editorNode = slicer.mrmlScene.GetSingletonNode("RadDiagSegmentEditor", "vtkMRMLSegmentEditorNode")
        if editorNode is None:
            editorNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            editorNode.UnRegister(None)
            editorNode.SetSingletonTag("RadDiagSegmentEditor")
            editorNode = slicer.mrmlScene.AddNode(editorNode)
        return editorNode

    def exportVolume(self, volumeNode):
        """Write the volume to a NRRD file (GUI thread: VTK is not thread-safe); returns (path, image id)."""
        if not isImageVolume(volumeNode) or volumeNode.GetImageData() is None:
            raise ValueError("Select an image (CT volume or X-ray) first.")
        path = os.path.join(self.workDir, f"{volumeNode.GetID().replace(':', '_')}.nrrd")
        if not writeNodeData(volumeNode, path):
            raise ValueError(f"Could not write {volumeNode.GetName()} to {path}.")
        return path, image_id_for(volumeNode.GetName(), path)

    def startDiagnosis(self, volumeNode, question, model, sliceIndex=None, serverUrl=None, token="", options=None):
        """Ask consent, export the image, and return a started BackgroundJob whose result is a DiagnosisResult.

        options: model options (RadDiagLib.infer_options) added to the infer params.
        Returns None when the user declined to send the image.
        """
        client = self.requireClient(serverUrl, token) if serverUrl else self.client
        if client is None:
            raise ServerError("Not connected: enter the server URL and press Connect.")
        if not self.consent.allowed(client.server_url):
            return None
        path, imageId = self.exportVolume(volumeNode)
        resultDir = tempfile.mkdtemp(dir=self.workDir)
        question = (question or "").strip() or DEFAULT_QUESTION
        imageData = volumeNode.GetImageData()
        modality = modality_hint(imageData.GetDimensions(), imageData.GetScalarRange())
        options = {**({"modality": modality} if modality else {}), **(options or {})}
        return BackgroundJob(lambda ctx: diagnose(client, model, path, imageId, question, sliceIndex, ctx, resultDir,
                                                  options), name="diagnose").start()

    def loadResult(self, result, volumeNode, name=None):
        """Create one segmentation node for a DiagnosisResult: named, coloured, coded segments."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             name or slicer.mrmlScene.GenerateUniqueName(
                                                                 f"{volumeNode.GetName()} RadDiag"))
        segmentationNode.CreateDefaultDisplayNodes()
        # the answer refers to the volume's own voxel grid: drawn and exported in the volume's frame
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        specs = list(result.specs)
        if result.label_path and result.present:
            with temporaryNodes():
                self._importLabels(result.label_path, segmentationNode, specs)
        segmentation = segmentationNode.GetSegmentation()
        for spec in specs:
            if self.findSegment(segmentation, spec.name) is None:  # targets without voxels still get a segment
                segmentation.AddEmptySegment(spec.name, spec.name, list(spec.color_float))
            self.applySpec(self.findSegment(segmentation, spec.name), spec)
        for segmentId in list(segmentation.GetSegmentIDs()):
            if segmentId.startswith("unnamed_"):  # placeholders (no voxels: _importLabels cleared them)
                segmentation.RemoveSegment(segmentId)
        segmentationNode.SetAttribute("RadDiag.ImageId", result.image_id)
        segmentationNode.SetAttribute("RadDiag.Answer", result.answer)
        if result.slice_index is not None:
            segmentationNode.SetAttribute("RadDiag.Slice", str(result.slice_index))
        return segmentationNode

    def _importLabels(self, labelPath, segmentationNode, specs):
        """Add the result file's segments to the segmentation (inside temporaryNodes: loaded nodes are removed)."""
        if labelPath.lower().endswith(".seg.nrrd"):
            # a Slicer segmentation file (server asked with result_extension=.seg.nrrd): copy its segments,
            # matched to the specs by name, else by position (label values repeat across layers)
            fileSpecs = [spec for spec, _layer in seg_nrrd_segments(read_nrrd(labelPath)[1])]
            source = slicer.util.loadSegmentation(labelPath, {"show": False}).GetSegmentation()
            for segmentId, spec in zip(list(source.GetSegmentIDs()), match_file_segments(fileSpecs, specs)):
                if spec is not None:
                    source.GetSegment(segmentId).SetName(spec.name)
                    segmentationNode.GetSegmentation().CopySegmentFromSegmentation(source, segmentId, False)
            return
        labelNode = slicer.util.loadLabelVolume(labelPath, {"show": False})
        labelNode.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())  # same voxel grid, same frame
        # voxels of values the answer does not name would stay in the shared layer after their segment is
        # removed (or without any segment), and the next segment the user adds would silently hold them
        voxels = slicer.util.arrayFromVolume(labelNode)
        voxels[~np.isin(voxels, [spec.label_value for spec in specs])] = 0
        slicer.util.arrayFromVolumeModified(labelNode)
        segmentIds = vtk.vtkStringArray()
        for segmentId in import_segment_ids(specs):
            segmentIds.InsertNextValue(segmentId)
        # maps label value i+1 to segmentIds[i]
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode, segmentIds)

    @staticmethod
    def findSegment(segmentation, name):
        segment = segmentation.GetSegment(name)
        if segment is None:
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            segment = segmentation.GetSegment(segmentId) if segmentId else None
        return segment

    @staticmethod
    def applySpec(segment, spec):
        segment.SetName(spec.name)
        segment.SetColor(*spec.color_float)
        if spec.terminology:
            segment.SetTag(TERMINOLOGY_TAG, spec.terminology)
        if spec.role:
            segment.SetTag(ROLE_TAG, spec.role)
        segment.SetTag(LABEL_VALUE_TAG, str(spec.label_value))
        slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(
            segment, slicer.vtkSlicerSegmentationsModuleLogic.InProgress)

    # ------------------------------------------------------------------ findings
    @staticmethod
    def findingWorldPosition(row, volumeNode):
        """World RAS of a finding's centroid (a FindingRow): the server measured it in the volume's own frame,
        so it goes through the volume's parent transform (linear or not)."""
        if row.centroid_ras is None:
            raise ValueError(f"The server gave no position for {row.name or 'this finding'}.")
        if volumeNode is None or volumeNode.GetScene() is None:
            raise ValueError("The image this answer is about is no longer in the scene.")
        world = [0.0, 0.0, 0.0]
        volumeNode.TransformPointToWorld(list(row.centroid_ras), world)
        return world

    def jumpToFinding(self, row, volumeNode):
        """Centre every slice view on the finding (what Markups' "jump to point" does); returns the world point."""
        world = self.findingWorldPosition(row, volumeNode)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *world, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return world

    def findingSegmentId(self, segmentationNode, row):
        """ID of the segment that holds the finding (segments are named as the server named its targets), or None."""
        segment = self.findSegment(segmentationNode.GetSegmentation(), row.name) if segmentationNode else None
        return segmentationNode.GetSegmentation().GetSegmentIdBySegment(segment) if segment else None

    # ------------------------------------------------------------------ submit
    def currentSpecs(self, segmentationNode):
        """[(segment ID, SegmentSpec)] of the segments as the user left them (names, colours may be edited)."""
        segmentation = segmentationNode.GetSegmentation()
        pairs = []
        for index, segmentId in enumerate(segmentation.GetSegmentIDs()):
            segment = segmentation.GetSegment(segmentId)
            labelValue = segmentTag(segment, LABEL_VALUE_TAG)
            # segments the user added keep their place after the returned ones
            labelValue = int(labelValue) if labelValue.isdigit() else 1000 + index
            color = tuple(int(round(c * 255)) for c in segment.GetColor())
            pairs.append((segmentId, SegmentSpec(segment.GetName(), labelValue, segmentTag(segment, ROLE_TAG), color,
                                                 segmentTag(segment, TERMINOLOGY_TAG))))
        return pairs

    def exportCorrection(self, segmentationNode, volumeNode):
        """Label map of the segments in export order (value = position + 1), written to a file; returns (path, specs)."""
        pairs = self.currentSpecs(segmentationNode)
        if not pairs:
            raise ValueError("The segmentation has no segments to submit.")
        ordered = export_order([spec for _, spec in pairs])
        idOf = {id(spec): segmentId for segmentId, spec in pairs}
        segmentIds = vtk.vtkStringArray()
        for spec in ordered:
            segmentIds.InsertNextValue(idOf[id(spec)])
        with temporaryNodes():
            labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "RadDiag correction")
            labelNode.SetHideFromEditors(True)  # never offered in node selectors
            # writes position+1 on the volume's voxel grid; later segments win on overlap (organs first)
            if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                    segmentationNode, segmentIds, labelNode, volumeNode):
                raise ValueError("Could not export the segments to a label map.")
            path = os.path.join(tempfile.mkdtemp(dir=self.workDir), "correction.nrrd")
            if not writeNodeData(labelNode, path):
                raise ValueError(f"Could not write the correction to {path}.")
        return path, ordered

    def startSubmission(self, segmentationNode, volumeNode, model, detection, diagnosis, answer=None,
                        question=None, sliceIndex=None):
        """Export in the GUI thread, upload in a BackgroundJob; its result is (label info, server reply)."""
        if self.client is None:
            raise ServerError("Not connected: enter the server URL and press Connect.")
        imageId = segmentationNode.GetAttribute("RadDiag.ImageId")
        if not imageId:
            raise ValueError("This segmentation did not come from RadDiag: run Diagnose and segment first.")
        if detection and not (diagnosis or "").strip():
            raise ValueError("A positive finding needs a diagnosis: type it in the Diagnosis box.")
        if not self.consent.allowed(self.client.server_url):
            return None
        path, specs = self.exportCorrection(segmentationNode, volumeNode)
        client = self.client
        return BackgroundJob(lambda ctx: submit_correction(client, imageId, path, specs, detection, diagnosis, answer,
                                                           question, sliceIndex, model, ctx), name="submit").start()

    # ------------------------------------------------------------------ retrain
    def startRetraining(self, model):
        if self.client is None:
            raise ServerError("Not connected: enter the server URL and press Connect.")
        client = self.client
        return BackgroundJob(lambda ctx: retrain(client, model, ctx), name="retrain").start()


class RadDiagWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self.job = None
        self.jobKind = None
        self.lastResult = None
        self.segmentationNode = None
        self.findings = []  # FindingRows of the last answer, in table order
        self.answerVolume = None  # the image they were measured in
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadDiag.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadDiagLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.pollJob)

        self.ui.serverUrlComboBox.addItems(self.logic.history.urls())
        self.ui.questionTextEdit.setPlainText(DEFAULT_QUESTION)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.diagnoseButton.connect("clicked(bool)", self.onDiagnoseOrCancel)
        self.ui.resetQuestionButton.connect("clicked(bool)", lambda: self.ui.questionTextEdit.setPlainText(DEFAULT_QUESTION))
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.retrainButton.connect("clicked(bool)", self.onRetrainOrCancel)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.customAnswerCheckBox.connect("toggled(bool)", self.ui.answerTextEdit.setEnabled)
        self.ui.resetConsentButton.connect("clicked(bool)", self.onResetConsent)
        self.ui.rvls2mComboBox.addItems(list(RVLS2M_CHOICES))
        self.ui.ttsCheckBox.connect("toggled(bool)", self.ui.ttsAnswersSpinBox.setEnabled)
        self.ui.ttsCheckBox.connect("toggled(bool)", self.ui.ttsMasksSpinBox.setEnabled)
        self.ui.ttsAnswersSpinBox.setEnabled(False)
        self.ui.ttsMasksSpinBox.setEnabled(False)
        self.ui.findingsTableWidget.setColumnCount(len(FINDING_COLUMNS))
        self.ui.findingsTableWidget.setHorizontalHeaderLabels(list(FINDING_COLUMNS))
        self.ui.findingsTableWidget.setVisible(False)
        self.ui.findingsTableWidget.connect("cellClicked(int,int)", self.onFindingClicked)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        if self.timer is not None:
            self.timer.stop()
        self.releaseSegmentEditor()
        self.removeObservers()

    # ------------------------------------------------------------------ the embedded Segment Editor
    # As Slicer's Segment Editor module does: the editor takes keyboard shortcuts and view events only
    # while this module is shown, so leaving it (or opening the Segment Editor module) leaves one editor.
    def enter(self):
        editor = self.ui.segmentEditorWidget
        editor.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        editor.installKeyboardShortcuts()
        editor.updateWidgetFromMRML()

    def exit(self):
        self.releaseSegmentEditor()

    def releaseSegmentEditor(self):
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.job.cancel()
        self.segmentationNode = None
        self.lastResult = None
        self.answerVolume = None
        self.showFindings([])
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()
        self.ui.submitButton.setEnabled(False)
        self.ui.openSegmentEditorButton.setEnabled(False)

    def onSceneEndClose(self, caller, event):
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        if self.parent.isEntered:
            self.ui.segmentEditorWidget.updateWidgetFromMRML()
        self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        self._parameterNode = self.logic.getParameterNode()
        self.logic.setDefaultParameters(self._parameterNode)
        if not isImageVolume(self._parameterNode.GetNodeReference("InputVolume")):
            volume = self.logic.firstImageVolume()
            if volume:
                self._parameterNode.SetNodeReferenceID("InputVolume", volume.GetID())
        self.ui.serverUrlComboBox.setCurrentText(self._parameterNode.GetParameter("ServerUrl"))
        self.ui.questionTextEdit.setPlainText(self._parameterNode.GetParameter("Question") or DEFAULT_QUESTION)
        wholeVolume = self._parameterNode.GetParameter("Scope") == "volume"
        self.ui.wholeVolumeRadioButton.setChecked(wholeVolume)
        self.ui.currentSliceRadioButton.setChecked(not wholeVolume)
        self.ui.inputVolumeSelector.setCurrentNode(self._parameterNode.GetNodeReference("InputVolume"))

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None:
            return
        self._parameterNode.SetParameter("ServerUrl", self.ui.serverUrlComboBox.currentText)
        if self.ui.modelComboBox.currentText:
            self._parameterNode.SetParameter("Model", self.ui.modelComboBox.currentText)
        self._parameterNode.SetParameter("Question", self.ui.questionTextEdit.toPlainText())
        self._parameterNode.SetParameter("Scope", "slice" if self.ui.currentSliceRadioButton.checked else "volume")
        node = self.ui.inputVolumeSelector.currentNode()
        self._parameterNode.SetNodeReferenceID("InputVolume", node.GetID() if node else None)

    # ------------------------------------------------------------------ actions
    def serverUrl(self):
        return self.ui.serverUrlComboBox.currentText.strip()

    def model(self):
        return self.ui.modelComboBox.currentText or DEFAULT_MODEL

    def onConnect(self, *args):
        try:
            with slicer.util.tryWithErrorDisplay("RadDiag: could not connect.", waitCursor=True):
                models = self.logic.connect(self.serverUrl(), self.ui.tokenLineEdit.text)
                self.ui.modelComboBox.clear()
                self.ui.modelComboBox.addItems(models)
                if DEFAULT_MODEL in models:
                    self.ui.modelComboBox.setCurrentText(DEFAULT_MODEL)
                self.ui.serverUrlComboBox.clear()
                self.ui.serverUrlComboBox.addItems(self.logic.history.urls())
                self.ui.serverUrlComboBox.setCurrentText(self.logic.client.server_url)
                self.ui.connectionStatusLabel.setText(
                    f"Connected to {self.logic.client.server_url}: {len(models)} model(s).")
                self.updateParameterNodeFromGUI()
        except Exception as e:
            self.ui.connectionStatusLabel.setText(f"Not connected: {e}")

    def modelOptions(self):
        """Infer params of the Options section (test-time scaling, RVLS2M, chain of thought, answer anyway)."""
        return infer_options(tts=self.ui.ttsCheckBox.checked, tts_answers=self.ui.ttsAnswersSpinBox.value,
                             tts_masks=self.ui.ttsMasksSpinBox.value, rvls2m=self.ui.rvls2mComboBox.currentText,
                             cot=self.ui.cotCheckBox.checked, force=self.ui.forceCheckBox.checked)

    def onDiagnoseOrCancel(self, *args):
        if self.job is not None and self.jobKind == "diagnose":
            self.job.cancel()
            self.ui.statusLabel.setText("Cancelling…")
            return
        if self.job is not None:
            self.ui.statusLabel.setText("Wait for the running task to finish (or cancel it) first.")
            return
        self.updateParameterNodeFromGUI()
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        try:
            sliceIndex = None
            if self.ui.currentSliceRadioButton.checked:
                if volumeNode is None:
                    raise ValueError("Select an image first.")
                sliceIndex = self.logic.currentSliceIndex(volumeNode)
            job = self.logic.startDiagnosis(volumeNode, self.ui.questionTextEdit.toPlainText(), self.model(), sliceIndex,
                                            self.serverUrl(), self.ui.tokenLineEdit.text, options=self.modelOptions())
        except (ServerError, ValueError) as e:
            self.ui.statusLabel.setText(str(e))
            return
        if job is None:
            self.ui.statusLabel.setText("Nothing was sent: the image upload was not allowed.")
            return
        self.startJob(job, "diagnose")
        self.ui.diagnoseButton.setText("Cancel")

    def onSubmit(self, *args):
        if self.job is not None or self.segmentationNode is None or self.lastResult is None:
            return
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        answer = self.ui.answerTextEdit.toPlainText() if self.ui.customAnswerCheckBox.checked else None
        try:
            job = self.logic.startSubmission(self.segmentationNode, volumeNode, self.model(),
                                             self.ui.detectionCheckBox.checked, self.ui.diagnosisLineEdit.text, answer,
                                             self.lastResult.params.get("question"), self.lastResult.slice_index)
        except (ServerError, ValueError) as e:
            self.ui.statusLabel.setText(str(e))
            return
        if job is not None:
            self.startJob(job, "submit")

    def onRetrainOrCancel(self, *args):
        if self.job is not None and self.jobKind == "retrain":
            self.job.cancel()
            self.ui.trainingStatusLabel.setText("Stopped following the training (it keeps running on the server).")
            return
        if self.job is not None:
            return
        try:
            job = self.logic.startRetraining(self.model())
        except ServerError as e:
            self.ui.trainingStatusLabel.setText(str(e))
            return
        self.startJob(job, "retrain")
        self.ui.retrainButton.setText("Stop following")

    def showFindings(self, rows):
        """Fill the findings table (hidden when the answer has none: slice answers, older servers)."""
        self.findings = rows
        table = self.ui.findingsTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row.cells):
                table.setItem(r, c, qt.QTableWidgetItem(text))  # read-only: editTriggers in RadDiag.ui
        table.setVisible(bool(rows))

    def onFindingClicked(self, row, column=0):
        """Centre the slice views on the clicked finding and select its segment in the editor."""
        if not 0 <= row < len(self.findings):
            return
        finding = self.findings[row]
        try:
            world = self.logic.jumpToFinding(finding, self.answerVolume)
        except ValueError as e:
            self.ui.statusLabel.setText(str(e))
            return
        segmentId = self.logic.findingSegmentId(self.segmentationNode, finding)
        if segmentId:
            self.ui.segmentEditorWidget.setCurrentSegmentID(segmentId)
        self.ui.statusLabel.setText(f"{finding.cells[0]}: views centred on R {world[0]:.1f}, A {world[1]:.1f}, "
                                    f"S {world[2]:.1f} mm.")

    def onOpenSegmentEditor(self, *args):
        if self.segmentationNode is None:
            return
        self.releaseSegmentEditor()  # one editor on the views: the Segment Editor module's
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(self.segmentationNode)
        editor.setSourceVolumeNode(self.ui.inputVolumeSelector.currentNode())

    def onResetConsent(self, *args):
        if self.serverUrl():
            self.logic.consent.forget(self.serverUrl())
            self.ui.trainingStatusLabel.setText("You will be asked again before an image is sent.")

    # ------------------------------------------------------------------ job polling
    def startJob(self, job, kind):
        self.job, self.jobKind = job, kind
        bar = self.ui.trainingProgressBar if kind == "retrain" else self.ui.progressBar
        bar.setVisible(True)
        bar.setValue(0)
        self.ui.submitButton.setEnabled(False)
        self.timer.start()

    def pollJob(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        bar = self.ui.trainingProgressBar if self.jobKind == "retrain" else self.ui.progressBar
        label = self.ui.trainingStatusLabel if self.jobKind == "retrain" else self.ui.statusLabel
        for fraction, message in job.poll():
            if fraction is not None:
                bar.setMaximum(100)
                bar.setValue(int(round(100 * fraction)))
            else:
                bar.setMaximum(0)  # busy indicator
            if message:
                label.setText(message)
        if not job.finished:
            return
        self.timer.stop()
        self.job, kind = None, self.jobKind
        self.jobKind = None
        bar.setMaximum(100)
        self.ui.diagnoseButton.setText("Diagnose and segment")
        self.ui.retrainButton.setText("Retrain")
        self.ui.submitButton.setEnabled(self.segmentationNode is not None)
        if job.state == "cancelled":
            label.setText("Cancelled.")
            bar.setVisible(kind == "retrain")
            return
        if job.state == "failed":
            label.setText(str(job.error))
            logging.error("RadDiag %s failed: %s", kind, job.error)
            return
        getattr(self, f"on{kind.capitalize()}Finished")(job.result)

    def onDiagnoseFinished(self, result):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        self.lastResult = result
        self.ui.answerBrowser.setHtml(answer_html(result.params, result.specs))
        self.answerVolume = volumeNode
        self.showFindings(finding_rows(result.params))
        self.ui.detectionCheckBox.setChecked(bool(result.detection))
        self.ui.diagnosisLineEdit.setText(result.diagnosis or "")
        self.ui.answerTextEdit.setPlainText(result.answer)
        if result.specs or result.label_path:
            self.segmentationNode = self.logic.loadResult(result, volumeNode)
            self.ui.segmentEditorWidget.setSegmentationNode(self.segmentationNode)
            self.ui.segmentEditorWidget.setSourceVolumeNode(volumeNode)
            self.ui.openSegmentEditorButton.setEnabled(True)
            self.ui.submitButton.setEnabled(True)
        empty = ", ".join(s.name for s in result.empty)
        latency = (result.params.get("latencies") or {}).get("total")
        outside = " Outside the model's domain: see the warning in the answer." if domain_warning(result.params) else ""
        self.ui.statusLabel.setText(f"Answered{f' in {latency:.1f} s' if isinstance(latency, (int, float)) else ''}."
                                    + outside + (f" No voxels for: {empty} (empty segments created)." if empty else ""))
        self.ui.progressBar.setVisible(False)

    def onSubmitFinished(self, result):
        info, _reply = result
        self.ui.statusLabel.setText(f"Correction saved on the server ({len(info['segments'])} segments). "
                                    "Press Retrain to teach it to the model.")
        self.ui.progressBar.setVisible(False)

    def onRetrainFinished(self, progress):
        self.ui.trainingStatusLabel.setText(progress.message)
        self.ui.trainingProgressBar.setValue(100 if progress.state == "done" else self.ui.trainingProgressBar.value)


class RadDiagTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer without a server: result loading and correction export on a synthetic volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LoadResultAndExportCorrection()
        self.setUp()
        self.test_JumpToFinding()

    def test_LoadResultAndExportCorrection(self):
        import numpy as np
        from RadDiagLib import segment_specs
        from RadDiagLib.labelmap import write_nrrd
        from RadDiagLib.workflow import DiagnosisResult

        self.delayDisplay("Synthetic volume and server result")
        volumeNode = slicer.util.addVolumeFromArray(np.zeros((4, 32, 32), np.int16), name="phantom")
        labels = np.zeros((32, 32, 4), np.uint8)  # i, j, k
        labels[4:20, 4:20, 2] = 1
        labels[8:12, 8:12, 2] = 3  # value 2 (liver tumour) has no voxels; 3 = an extra named target
        path = os.path.join(tempfile.mkdtemp(), "label.nrrd")
        write_nrrd(path, labels, space="right-anterior-superior")
        params = {"answer": "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
                  "detection": True, "diagnosis": "Liver tumour",
                  "segments": [{"name": "liver", "role": "organ", "label_value": 1, "color": [221, 130, 101]},
                               {"name": "liver tumour", "role": "abnormality", "label_value": 2, "color": [240, 60, 60]},
                               {"name": "lesion", "role": "abnormality", "label_value": 3, "color": [10, 20, 30]}]}
        specs = segment_specs(params)
        result = DiagnosisResult("phantom_1", params, specs, path, {1, 3}, 2)
        logic = RadDiagLogic(settings=RadDiagLib.DictSettings(), ask=lambda url: (True, False))
        segmentationNode = logic.loadResult(result, volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(sorted(segmentation.GetSegmentIDs()), ["lesion", "liver", "liver tumour"])
        liver = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, "liver", volumeNode)
        self.assertEqual(int(liver.sum()), 16 * 16 - 16)
        self.assertEqual(int(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, "liver tumour", volumeNode).sum()), 0)
        self.assertAlmostEqual(segmentation.GetSegment("liver").GetColor()[0], 221 / 255, places=3)

        self.delayDisplay("Export the correction in a fixed order")
        correction, ordered = logic.exportCorrection(segmentationNode, volumeNode)
        # organs first, then abnormalities by their label value; positions become the exported values
        self.assertEqual([s.name for s in ordered], ["liver", "liver tumour", "lesion"])
        exported = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(correction))
        self.assertEqual(set(int(v) for v in np.unique(exported)), {0, 1, 3})  # the tumour segment is empty
        self.assertEqual(int((exported == 3).sum()), 16)
        self.delayDisplay("Test passed")

    def test_JumpToFinding(self):
        from RadDiagLib import finding_rows

        self.delayDisplay("A finding of a volume under a transform")
        volumeNode = slicer.util.addVolumeFromArray(np.zeros((6, 32, 32), np.int16), name="phantom")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        matrix = vtk.vtkMatrix4x4()
        matrix.SetElement(0, 3, 15.0)
        matrix.SetElement(2, 3, -4.0)
        transform.SetMatrixTransformToParent(matrix)
        volumeNode.SetAndObserveTransformNodeID(transform.GetID())
        # the server's centroid of voxels i 8..11, j 8..11, k 2..3: RAS (9.5, 9.5, 2.5) is LPS (-9.5, -9.5, 2.5)
        (row,) = finding_rows({"findings": [{"name": "lesion", "role": "abnormality", "volume_ml": 0.032,
                                             "max_diameter_mm": 5.2, "slices": [2, 3],
                                             "centroid_lps_mm": [-9.5, -9.5, 2.5]}]})
        sliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        if sliceNode is None:  # no layout (e.g. slicer-core): a slice node as the layout manager makes one
            sliceNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
        world = RadDiagLogic(settings=RadDiagLib.DictSettings(), ask=lambda url: (True, False)).jumpToFinding(
            row, volumeNode)
        self.assertEqual([round(v, 6) for v in world], [24.5, 9.5, -1.5])
        sliceToRas = sliceNode.GetSliceToRAS()
        for axis in range(3):
            self.assertAlmostEqual(sliceToRas.GetElement(axis, 3), world[axis], places=6)
        self.delayDisplay("Test passed")
