"""The `raddiagseg` console command is installed and reports errors as one line."""

import subprocess
import sys

from raddiagseg import templates, vocabulary


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raddiagseg", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "raddiagseg" in result.stdout


def test_vqaseg_answer_template_round_trip():
    answer = templates.vqaseg_answer(True, "Liver tumour", ["liver", "liver tumour"])
    assert answer.splitlines() == [
        "1. Yes",
        "2. Liver tumour",
        "3. Segmentation masks:",
        "- liver <seg000>",
        "- liver tumour <seg001>",
    ]
    assert templates.vqaseg_answer(False) == "1. No"


def test_synonyms_map_to_canonical_targets():
    assert vocabulary.canonical_target("Hepatic organ") == "liver"
    assert vocabulary.canonical_target("tumour") is None  # shared by two targets
    assert vocabulary.matches_target("Tumor", "pancreas tumour")
    assert not vocabulary.matches_target("liver", "pancreas")
