"""The extension's files: what Slicer's build installs, and what RadDiagLib may import."""

import json
import re
from pathlib import Path

EXT = Path(__file__).resolve().parents[1] / "SlicerRadDiag"
MODULE = EXT / "RadDiag"


def test_module_cmakelists_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "RadDiag")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui|json))\s*$", text, re.M))
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*")
               if p.is_file() and p.suffix in (".py", ".png", ".ui", ".json") and "__pycache__" not in p.parts}
    assert listed == on_disk  # a file missing here would not be installed with the extension


IMPORTS_AS_PYTHON39 = """
import ast, json, sys
out = {}
for path in sys.argv[1:]:
    tree = ast.parse(open(path).read(), feature_version=(3, 9))
    out[path] = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \\
        [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
print(json.dumps(out))
"""


def test_raddiaglib_is_slicer_free_and_python39():
    """Slicer 5.8 embeds Python 3.9. Parsed in a fresh interpreter: CPython 3.11's parser can fail with "AST
    constructor recursion depth mismatch" in a process where earlier tests hit deep recursion."""
    import subprocess
    import sys

    files = [MODULE / "RadDiag.py", *sorted((MODULE / "RadDiagLib").glob("*.py"))]
    run = subprocess.run([sys.executable, "-c", IMPORTS_AS_PYTHON39, *map(str, files)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]  # a SyntaxError names the file and line
    for path, names in json.loads(run.stdout).items():
        if Path(path).parent.name == "RadDiagLib":
            for name in names:
                assert name.split(".")[0] not in ("slicer", "qt", "ctk", "vtk", "raddiagseg"), (Path(path).name, name)


def test_extension_metadata_and_index_entry():
    top = (EXT / "CMakeLists.txt").read_text()
    assert "project(RadDiag)" in top and "add_subdirectory(${CMAKE_CURRENT_LIST_DIR}/RadDiag " in top
    root = (EXT.parent / "CMakeLists.txt").read_text()  # what the Extensions Index builds
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/SlicerRadDiag/CMakeLists.txt)" in root
    assert "Apache License" in (EXT.parent / "LICENSE").read_text()
    assert (MODULE / "Testing" / "Python" / "CMakeLists.txt").exists()
    screenshot = re.search(r'set\(EXTENSION_SCREENSHOTURLS "[^"]*/main/(SlicerRadDiag/[^"]+\.png)"', top)
    assert screenshot and (EXT.parent / screenshot.group(1)).exists()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} \S", top), key
    entry = json.loads((EXT / "RadDiag.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry)
    # the index schema forbids anything but these keys
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier", "enabled"}


def test_terminology_file_adds_ground_glass_opacity():
    term = json.loads((MODULE / "Resources" / "Terminology" / "RadDiag.term.json").read_text())
    types = [t for c in term["SegmentationCodes"]["Category"] for t in c["Type"]]
    assert ("DCM", "112120") in {(t["CodingSchemeDesignator"], t["CodeValue"]) for t in types}
    assert term["SegmentationCategoryTypeContextName"]


def test_every_widget_the_module_uses_is_in_the_ui_file():
    import xml.etree.ElementTree as ET

    tree = ET.parse(MODULE / "Resources" / "UI" / "RadDiag.ui")
    in_ui = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "RadDiag.py").read_text()))
    assert used and used <= in_ui, used - in_ui
