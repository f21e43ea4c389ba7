"""Real Slicer core (PyPI `slicer-core`) set up the way Slicer's application sets it up for a scripted module.

Real: the MRML scene and nodes, storage nodes, the segmentations, volumes, colours and terminologies logic
(`slicer.modules.<name>.logic()` returns them), `slicer.util`. slicer-core has no `slicer.app` (no Qt), so:

- `slicer.util.loadVolume` / `loadLabelVolume` / `loadSegmentation` / `saveNode` are emulated with the calls that
  Slicer 5.8's `qSlicerVolumesReader::load` (`vtkSlicerVolumesLogic::AddArchetypeVolume` with the labelmap option bit,
  then the colour node), `qSlicerSegmentationsReader::load` (`LoadSegmentationFromFile(file, autoOpacities, name,
  colour table)`) and `qSlicerNodeWriter::write` (the node's default storage node: `SetFileName`, `SetURI(None)`,
  `SetUseCompression`, `WriteData`) make. The two readers and the writer are the same in 5.8 and 5.13 (only
  reformatted); `slicer.util`'s wrappers around them are the same too (`loadLabelVolume` sets `labelmap`).
- `qt`, `ctk` and `slicer.ScriptedLoadableModule` (Qt classes) are minimal stand-ins, enough to import RadDiag.py
  and run its RadDiagTest (a unittest.TestCase whose delayDisplay does nothing);
  the widget and the embedded Segment Editor's GUI need a full Slicer.

`slicer-core` imports without environment variables or a particular import order (checked next to SimpleITK, torch,
MONAI and slicerio); its ITK has no PNG IO. Tests using this skip only when slicer-core cannot be imported.
"""

import importlib
import os
import sys
import types
import unittest
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "SlicerRadDiag" / "RadDiag"


def import_slicer_core():
    """The real `slicer` package of slicer-core, or skip."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (requirements-test.txt) is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the importable `slicer` package is not slicer-core")
    return slicer


class _LogicModule:
    """What `slicer.modules.<name>` gives a scripted module: here only `logic()`."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def _scripted_loadable_module():
    """Stand-ins for Slicer's ScriptedLoadableModule base classes (Qt-based in Slicer)."""
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            import slicer

            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


class SlicerCore:
    """One scene with Slicer's module logics, the emulated file IO, and RadDiag.py imported against them."""

    def __init__(self, slicer, monkeypatch):
        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        self.colors = slicer.vtkSlicerColorLogic()
        self.colors.SetMRMLScene(self.scene)  # adds Slicer's default colour tables
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations.SetMRMLScene(self.scene)
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.volumes.SetMRMLScene(self.scene)
        self.terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
        self.terminologies.SetMRMLScene(self.scene)
        modules = types.SimpleNamespace(segmentations=_LogicModule(self.segmentations),
                                        volumes=_LogicModule(self.volumes), colors=_LogicModule(self.colors),
                                        terminologies=_LogicModule(self.terminologies))
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "modules", modules, raising=False)
        for name in ("loadVolume", "loadLabelVolume", "loadSegmentation", "saveNode"):
            monkeypatch.setattr(slicer.util, name, getattr(self, name))
        monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", _scripted_loadable_module())
        monkeypatch.setattr(slicer, "ScriptedLoadableModule", sys.modules["slicer.ScriptedLoadableModule"],
                            raising=False)
        monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
        monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
        monkeypatch.delitem(sys.modules, "RadDiag", raising=False)
        self.module = importlib.import_module("RadDiag")
        self.written = []  # paths saveNode wrote, in order

    # ------------------------------------------------------------------ qSlicerVolumesReader::load
    def loadVolume(self, filename, properties=None):
        properties = dict(properties or {})
        options = 0x1 if properties.get("labelmap") else 0
        options |= 0x2 if properties.get("center") else 0
        options |= 0x4 if properties.get("singleFile") else 0
        options |= 0x8 if properties.get("autoWindowLevel", False) else 0
        options |= 0x10 if properties.get("discardOrientation") else 0
        name = properties.get("name") or os.path.basename(str(filename)).split(".")[0]
        node = self.volumes.AddArchetypeVolume(str(filename), name, options, None)
        if node is None:
            raise RuntimeError(f"Failed to load node from file: {filename}")  # slicer.util.loadNodeFromFile's error
        if properties.get("colorNodeID") and node.GetVolumeDisplayNode():
            node.GetVolumeDisplayNode().SetAndObserveColorNodeID(properties["colorNodeID"])
        return node  # "show" would propagate the selection to the slice views: there are none here

    def loadLabelVolume(self, filename, properties=None):
        return self.loadVolume(filename, dict(properties or {}, labelmap=True))

    # ------------------------------------------------------------------ qSlicerSegmentationsReader::load
    def loadSegmentation(self, filename, properties=None):
        properties = dict(properties or {})
        colorNode = self.scene.GetNodeByID(properties["colorNodeID"]) if properties.get("colorNodeID") else None
        node = self.segmentations.LoadSegmentationFromFile(str(filename), properties.get("autoOpacities", True),
                                                           properties.get("name", ""), colorNode)
        if node is None:
            raise RuntimeError(f"Failed to load node from file: {filename}")
        return node

    # ------------------------------------------------------------------ qSlicerNodeWriter::write
    def saveNode(self, node, filename, properties=None):
        properties = dict(properties or {})
        if not node.AddDefaultStorageNode():
            return False
        storageNode = node.GetStorageNode()
        storageNode.SetFileName(str(filename))
        if properties.get("fileFormat"):
            storageNode.SetWriteFileFormat(properties["fileFormat"])
        storageNode.SetURI(None)
        if "useCompression" in properties:
            storageNode.SetUseCompression(int(properties["useCompression"]))
        ok = bool(storageNode.WriteData(node))
        if ok:
            self.written.append(str(filename))
        return ok

    # ------------------------------------------------------------------ helpers for tests
    def nodeIds(self):
        """IDs of every node in the scene (to find nodes an action left behind)."""
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
