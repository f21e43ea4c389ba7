"""Import paths for the benchmark scripts: the folders pytest puts on sys.path (`pythonpath` in pyproject.toml).

raddiagseg comes from trainer/ of this checkout (it is also installed editable); the app's `lib` and `server`
packages and the Slicer module's RadDiagLib are not installable packages (MONAI Label and Slicer import them from
their folders), so a script outside those folders puts the folders on sys.path. Every benchmark does it by
importing ROOT from here, with pyproject.toml's list, so the list is written once."""

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in reversed(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"]):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))


def write_section(path, heading, text):
    """Replace the section of RESULTS.md that starts with `heading` (up to the next `## `), or append it at the end:
    a benchmark rerun replaces its own earlier figures."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    start = old.find(heading)
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end = old.find("\n## ", start + len(heading))
    path.write_text(old[:start] + text + ("" if end < 0 else old[end:]))
