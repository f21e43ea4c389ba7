"""Answer parsing: what the scorer and the app read out of a model's answer text."""

import pytest

from raddiagseg import templates
from raddiagseg.answers import parse_answer


def test_template_answer_round_trips():
    text = templates.vqaseg_answer(True, "Liver tumour", ["liver", "liver tumour"])
    parsed = parse_answer(text)
    assert parsed.detection is True
    assert parsed.diagnosis == "Liver tumour"
    assert parsed.segments == [("liver", "<seg000>"), ("liver tumour", "<seg001>")]
    negative = parse_answer(templates.vqaseg_answer(False))
    assert (negative.detection, negative.diagnosis, negative.segments) == (False, None, [])


@pytest.mark.parametrize(
    "text, detection",
    [
        ("1. Yes", True),
        ("1) yes.", True),
        ("  1.   YES  \n\n 2.  Liver tumour", True),
        ("(1) No.", False),
        ("Step 1: no", False),
        ("**1. Yes**\n**2. Liver tumour**", True),
        ("Yes, there is a lesion in the liver.", True),
        ("No abnormality is seen.", False),
        ("There is no evidence of abnormality.", False),
        ("1. Is there any abnormality present? Yes\n2. Liver tumour", True),
        ("1. Abnormal", True),
        ("1. Abnormality present: No", False),
        ("1. **Abnormality:** yes, a hypodense lesion", True),
        ("1. **Yes**, there is an abnormality.", True),
        ("1. There is an abnormality in the liver.", True),
        ("1. Maybe\n2. Liver tumour", None),
        ("The image shows the abdomen.", None),
        ("", None),
    ],
)
def test_step_one_read_as_yes_no_or_unreadable(text, detection):
    parsed = parse_answer(text)
    assert parsed.detection is detection
    if detection is None:
        assert any("unreadable" in n or "empty" in n for n in parsed.notes)


def test_inline_answer_with_bullets():
    parsed = parse_answer("1. Yes 2. COVID-19 infection 3. Segmentation masks: - lung <seg000> - ground-glass opacity <seg001>")
    assert parsed.diagnosis == "COVID-19 infection"
    assert parsed.segments == [("lung", "<seg000>"), ("ground-glass opacity", "<seg001>")]


def test_markdown_bold_steps():
    parsed = parse_answer("**1. Yes**\n**2. Liver tumour**\n**3.** - liver <seg000>")
    assert (parsed.detection, parsed.diagnosis, parsed.segments) == (True, "Liver tumour", [("liver", "<seg000>")])


def test_segments_with_commas_and_and():
    parsed = parse_answer("1) yes\n2) pancreatic tumour.\n3) pancreas <seg000>, tumour <seg001> and spleen <seg002>")
    assert parsed.diagnosis == "pancreatic tumour"
    assert [label for label, _ in parsed.segments] == ["pancreas", "tumour", "spleen"]


def test_no_step_numbers_diagnosis_from_text_after_yes():
    parsed = parse_answer("Yes, there is a liver tumour. liver <seg000>")
    assert parsed.detection is True
    assert "liver tumour" in parsed.diagnosis
    assert parsed.segments == [("liver", "<seg000>")]


def test_refseg_answer_label():
    parsed = parse_answer(templates.refseg_answer("hepatic organ"))
    assert parsed.segments == [("hepatic organ", "<seg000>")]


def test_repeated_token_keeps_first_and_notes_it():
    parsed = parse_answer("1. Yes\n2. Liver tumour\n3. - liver <seg000>\n- liver tumour <seg000>")
    assert parsed.segments == [("liver", "<seg000>")]
    assert "<seg000> appears 1 more time(s): the first one is used" in parsed.notes


def test_diagnosis_ignores_echoed_question_and_prefix():
    parsed = parse_answer("1. Yes\n2. If yes, what is the diagnosis? Diagnosis: Liver tumour.")
    assert parsed.diagnosis == "Liver tumour"
    assert parse_answer("1. **Yes**\n2. **Diagnosis:** Liver tumour").diagnosis == "Liver tumour"
