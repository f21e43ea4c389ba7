"""RadDiagLib without a server: parsing, segment specs, label maps, label info, consent, jobs."""

import json
import threading
import time

import numpy as np
import pytest

from RadDiagLib import (DEFAULT_QUESTION, BackgroundJob, DictSettings, UploadConsent, UrlHistory, answer_html,
                        build_label_info, export_order, segment_specs, training_progress)
from RadDiagLib.labelinfo import MAX_SEG_TOKENS, SEG_TOKEN, compose_answer
from RadDiagLib.labelmap import (LabelMapError, nrrd_geometry, present_label_values, read_nrrd, seg_nrrd_segments,
                                 write_nrrd)
from RadDiagLib.multipart import MultipartError, parse_multipart, split_infer_response
from RadDiagLib.segments import SegmentSpec, terminology_string

templates = pytest.importorskip("raddiagseg.templates")

LIVER_RESPONSE = {
    "answer": "1. Yes\n2. Liver tumour\n3. Segmentation masks:\n- liver <seg000>\n- liver tumour <seg001>",
    "detection": True, "diagnosis": "Liver tumour",
    "segments": [
        {"name": "liver tumour", "role": "abnormality", "label_value": 2, "color": [240, 60, 60],
         "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                         "type": ["SCT", "108369006", "Neoplasm"]}},
        {"name": "liver", "role": "organ", "label_value": 1, "color": [221, 130, 101],
         "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
    ],
    "label_names": {"liver": 1, "liver tumour": 2},
}


def test_default_question_is_the_models():
    assert DEFAULT_QUESTION == templates.DEFAULT_QUESTION


def test_composed_answer_matches_training_template():
    for detection, diagnosis, names in [(True, "Liver tumour", ["liver", "liver tumour"]),
                                        (True, "COVID-19", ["lung"]), (False, None, [])]:
        assert compose_answer(detection, diagnosis, names) == templates.vqaseg_answer(detection, diagnosis, names)
    # RadDiagLib runs in Slicer's Python without raddiagseg, so it keeps its own copy of the seg-token format
    assert MAX_SEG_TOKENS == templates.NUM_SEG_TOKENS
    assert [SEG_TOKEN.format(i) for i in range(MAX_SEG_TOKENS)] == list(templates.SEG_TOKENS)
    with pytest.raises(ValueError):
        compose_answer(True, "Liver tumour", ["liver"] * (MAX_SEG_TOKENS + 1))


def test_multipart_response_from_monailabel_encoder():
    from requests_toolbelt import MultipartEncoder  # what MONAI Label's /infer uses to build the response

    payload = bytes(range(256)) * 3  # binary label bytes, including CR/LF and boundary-like bytes
    encoder = MultipartEncoder(fields={"params": (None, json.dumps(LIVER_RESPONSE), "application/json"),
                                       "image": ("label_x.nii.gz", payload, "application/gzip")})
    params, filename, data = split_infer_response(encoder.content_type, encoder.to_string())
    assert params == LIVER_RESPONSE
    assert filename == "label_x.nii.gz"
    assert data == payload


def test_json_only_response_and_bad_multipart():
    params, filename, data = split_infer_response("application/json", json.dumps({"answer": "1. No"}).encode())
    assert params == {"answer": "1. No"} and filename is None and data is None
    with pytest.raises(MultipartError):
        parse_multipart("text/html", b"<html>")
    with pytest.raises(MultipartError):
        parse_multipart("multipart/form-data", b"--x\r\n")


def test_segment_specs_names_values_colours_terminology():
    slicerio = pytest.importorskip("slicerio.segmentation") and __import__("slicerio")
    specs = segment_specs(LIVER_RESPONSE)
    assert [(s.name, s.label_value, s.role) for s in specs] == [("liver", 1, "organ"), ("liver tumour", 2, "abnormality")]
    assert specs[0].color == (221, 130, 101)
    assert specs[0].color_float == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    entry = slicerio.segmentation.terminology_entry_from_string(specs[0].terminology)
    assert entry["contextName"] == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert entry["type"] == ["SCT", "10200004", "Liver"]
    assert entry["category"] == ["SCT", "123037004", "Anatomical Structure"]


def test_code_slicer_lacks_gets_our_terminology_context():
    slicerio = pytest.importorskip("slicerio.segmentation") and __import__("slicerio")
    term = terminology_string({"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                               "type": ["DCM", "112120", "Ground glass opacity"]})
    entry = slicerio.segmentation.terminology_entry_from_string(term)
    assert entry["contextName"] == "Segmentation category and type - RadDiag"
    assert entry["type"] == ["DCM", "112120", "Ground glass opacity"]
    # an entry string from the server is kept as is
    assert terminology_string(term) == term
    with pytest.raises(ValueError):
        terminology_string("Liver")


def test_segment_specs_fallbacks_and_errors():
    specs = segment_specs({"label_names": {"background": 0, "lung": 1, "infection": 2}})
    assert [(s.name, s.label_value) for s in specs] == [("lung", 1), ("infection", 2)]
    assert specs[0].color != specs[1].color  # fallback colours differ
    assert segment_specs({"segments": [{"name": "lung", "label_value": 1, "color": [0.5, 0.25, 1.0]}]})[0].color == (128, 64, 255)
    dup = segment_specs({"segments": [{"name": "lung", "label_value": 1}, {"name": "lung", "label_value": 2}]})
    assert [s.name for s in dup] == ["lung", "lung 2"]
    with pytest.raises(ValueError, match="two segments"):
        segment_specs({"segments": [{"name": "a", "label_value": 1}, {"name": "b", "label_value": 1}]})
    with pytest.raises(ValueError, match="positive"):
        segment_specs({"segments": [{"name": "a", "label_value": 0}]})
    assert segment_specs({"answer": "1. No", "segments": []}) == []


def test_export_order_puts_organs_first():
    specs = [SegmentSpec("tumour", 1, "abnormality"), SegmentSpec("other", 2, ""), SegmentSpec("liver", 3, "organ")]
    assert [s.name for s in export_order(specs)] == ["liver", "tumour", "other"]


def test_label_info_for_edited_diagnosis():
    specs = segment_specs(LIVER_RESPONSE)
    specs[1].name = "hepatic lesion"  # the user renamed the segment
    info = build_label_info(list(reversed(specs)), True, "Liver cyst", slice_index=7, model="raddiagseg")
    assert info["answer"] == "1. Yes\n2. Liver cyst\n3. Segmentation masks:\n- liver <seg000>\n- hepatic lesion <seg001>"
    assert info["diagnosis"] == "Liver cyst" and info["detection"] is True and info["slice"] == 7
    assert info["label_names"] == {"liver": 1, "hepatic lesion": 2}
    assert [(s["name"], s["label_value"], s["role"]) for s in info["segments"]] == [
        ("liver", 1, "organ"), ("hepatic lesion", 2, "abnormality")]
    assert info["question"] == DEFAULT_QUESTION
    json.dumps(info)  # it is sent as a JSON form field
    # the user's own edited text is kept verbatim; a negative drops the diagnosis
    assert build_label_info(specs, True, "x", answer=" my text ")["answer"] == "my text"
    negative = build_label_info([], False, "ignored")
    assert negative["answer"] == "1. No" and negative["diagnosis"] is None
    with pytest.raises(ValueError, match="diagnosis"):
        build_label_info(specs, True, " ")


def test_nrrd_round_trip_against_slicerio(tmp_path):
    slicerio = pytest.importorskip("slicerio.segmentation") and __import__("slicerio")
    labels = np.zeros((5, 4, 3), np.uint8)
    labels[1:3, 1:3, 1] = 1
    labels[2, 2, 1] = 2
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    path = str(tmp_path / "label.nrrd")
    write_nrrd(path, labels, spacing=(0.7, 0.8, 2.5), origin=(10, -5, 3), directions=direction)
    volume = slicerio.read_volume(path)
    assert np.array_equal(volume["voxels"], labels)
    ijk_to_lps = np.asarray(volume["ijkToLPS"])
    assert np.allclose(ijk_to_lps[:3, :3], direction * [0.7, 0.8, 2.5])
    assert np.allclose(ijk_to_lps[:3, 3], [10, -5, 3])
    array, header = read_nrrd(path)
    assert np.array_equal(array, labels)
    origin, matrix = nrrd_geometry(header)
    assert np.allclose(matrix, direction * [0.7, 0.8, 2.5]) and np.allclose(origin, [10, -5, 3])
    assert present_label_values(path) == {1, 2}
    raw = str(tmp_path / "raw.nrrd")
    write_nrrd(raw, labels.astype(np.int16), compress=False)
    assert np.array_equal(read_nrrd(raw)[0], labels)
    (tmp_path / "bad.nrrd").write_bytes(b"P5\n")
    with pytest.raises(LabelMapError):
        read_nrrd(str(tmp_path / "bad.nrrd"))


def test_seg_nrrd_segments_written_by_slicerio(tmp_path):
    slicerio = pytest.importorskip("slicerio.segmentation") and __import__("slicerio")
    seg = slicerio.create_segmentation((6, 6, 2), np.eye(4))
    liver = np.zeros((6, 6, 2), np.uint8)
    liver[1:5, 1:5, 0] = 1
    term = terminology_string(LIVER_RESPONSE["segments"][1]["terminology"])
    slicerio.add_segment(seg, liver, {"name": "liver", "color": [221 / 255, 130 / 255, 101 / 255], "labelValue": 1,
                                      "terminology": slicerio.segmentation.terminology_entry_from_string(term)})
    slicerio.add_segment(seg, np.zeros_like(liver), {"name": "liver tumour", "labelValue": 2,
                                                     "color": [240 / 255, 60 / 255, 60 / 255]})
    path = str(tmp_path / "result.seg.nrrd")
    slicerio.write_segmentation(path, seg)
    _, header = read_nrrd(path)
    found = seg_nrrd_segments(header)
    assert [(s.name, s.label_value) for s, _ in found] == [("liver", 1), ("liver tumour", 2)]
    assert found[0][0].color == (221, 130, 101)
    assert slicerio.segmentation.terminology_entry_from_string(found[0][0].terminology)["type"] == ["SCT", "10200004", "Liver"]
    assert present_label_values(path, segment_specs(LIVER_RESPONSE)) == {1}  # the tumour segment is empty


def test_answer_html_escapes_and_highlights():
    specs = segment_specs(LIVER_RESPONSE)
    params = dict(LIVER_RESPONSE, answer=LIVER_RESPONSE["answer"] + "\n<script>alert(1)</script>",
                  slices=[{"slice": 3, "answer": "1. No"}, {"slice": 4, "answer": "1. Yes\n2. Liver tumour"}])
    text = answer_html(params, specs)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "Abnormality detected" in text
    assert "rgb(221,130,101)" in text and "liver tumour" in text and "&lt;seg000&gt;" not in text
    assert "<td>3</td>" in text and "<td>4</td>" in text
    assert "No abnormality detected" in answer_html({"answer": "1. No", "detection": False})


def test_consent_asked_once_and_remembered():
    asked = []

    def ask(url):
        asked.append(url)
        return answers.pop(0)

    settings = DictSettings()
    answers = [(True, False)]
    consent = UploadConsent(settings, ask)
    assert consent.allowed("http://a:8000") and consent.allowed("http://a:8000/")
    assert asked == ["http://a:8000"]  # once per session
    answers = [(False, True)]
    assert not consent.allowed("http://b:8000")
    fresh = UploadConsent(settings, ask)  # a new Slicer session
    assert not fresh.allowed("http://b:8000")  # "don't ask again" remembered the refusal
    answers = [(True, True)]
    assert fresh.allowed("http://a:8000")  # not remembered for a: asked again
    assert UploadConsent(settings, lambda url: pytest.fail("asked")).allowed("http://a:8000")
    fresh.forget("http://a:8000")
    answers = [(False, False)]
    assert not UploadConsent(settings, ask).allowed("http://a:8000")


def test_url_history():
    history = UrlHistory(DictSettings(), limit=3)
    assert history.urls() == ["http://127.0.0.1:8000"]
    for url in ["http://a", "http://b", "http://a/", "http://c", "http://d"]:
        history.add(url)
    assert history.urls() == ["http://d", "http://c", "http://a"]


def test_job_runs_reports_progress_and_result():
    def work(ctx):
        for i in range(3):
            ctx.progress(i / 3, f"step {i}")
        return 42

    job = BackgroundJob(work).start()
    assert job.wait(5)
    assert job.state == "done" and job.result == 42
    assert [m for _, m in job.poll()] == ["step 0", "step 1", "step 2"]


def test_job_cancel_and_failure():
    started = threading.Event()

    def slow(ctx):
        started.set()
        while True:
            ctx.wait(0.01)

    job = BackgroundJob(slow).start()
    started.wait(2)
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(2) and job.state == "cancelled" and time.monotonic() - t0 < 1

    def late(ctx):  # work that does not check: finishes, but its result is dropped
        started.wait(2)
        return "stale"

    started.clear()
    job = BackgroundJob(late).start()
    job.cancel()
    started.set()
    assert job.wait(2) and job.state == "cancelled" and job.result is None

    job = BackgroundJob(lambda ctx: 1 / 0).start()
    assert job.wait(2) and job.state == "failed" and isinstance(job.error, ZeroDivisionError)


def test_training_progress_messages():
    running = training_progress({"id": "t1", "status": "RUNNING"}, {"step": 5, "total_steps": 20, "loss": 0.5})
    assert running.state == "running" and running.fraction == 0.25 and "step 5/20" in running.message
    done = training_progress({"status": "DONE"}, {"step": 20, "total_steps": 20, "published": True})
    assert done.finished and done.published and "new model is live" in done.message
    kept = training_progress({"status": "DONE"}, {"published": False, "reason": "validation 0.4 is worse than 0.5"})
    assert kept.published is False and "old model stays live" in kept.message and "0.4 is worse" in kept.message
    error = training_progress({"status": "ERROR"}, {"error": "ValueError: no usable corrected labels"})
    assert "no usable corrected labels" in error.message
    failed = training_progress({"status": "ERROR", "details": ["CUDA out of memory"]}, {})
    assert failed.state == "failed" and "CUDA out of memory" in failed.message
    assert training_progress(None, {}).state == "idle"


def test_slice_index_and_modality_hint():
    from RadDiagLib.geometry import modality_hint, slice_index_at, through_plane_axis

    ijk_to_ras = [[-0.7, 0, 0, 50], [0, -0.7, 0, 60], [0, 0, 2.0, -30], [0, 0, 0, 1]]
    assert through_plane_axis(ijk_to_ras) == 2
    assert slice_index_at(ijk_to_ras, (100, 100, 12), (0, 0, -30 + 2.0 * 7 + 0.6)) == 7
    with pytest.raises(ValueError, match="outside the volume"):
        slice_index_at(ijk_to_ras, (100, 100, 12), (0, 0, 100))
    assert modality_hint((512, 512, 1), (0, 255)) == "xray"
    assert modality_hint((512, 512, 1), (-1024, 3000)) is None
    assert modality_hint((512, 512, 40), (0, 255)) is None


def test_infer_options_and_answer_panel_show_tts_and_reasoning():
    from RadDiagLib import answer_html, infer_options

    assert infer_options() == {}
    assert infer_options(tts=True, tts_answers=2, tts_masks=5, rvls2m="on", cot=True) == {
        "tts": True, "tts_answers": 2, "tts_masks": 5, "rvls2m": True, "cot": True}
    assert infer_options(tts=False, tts_answers=99) == {}  # counts only matter with TTS on
    for bad in ({"rvls2m": "maybe"}, {"tts": True, "tts_answers": 0}):
        with pytest.raises(ValueError):
            infer_options(**bad)
    html = answer_html({"detection": True, "diagnosis": "Liver tumour", "answer": "1. Yes\n2. Liver tumour",
                        "agreement": {"paths": 4, "answer": 0.75, "masks": [0.9, 0.5], "uncertainty": 0.28},
                        "reasoning": "Modality: CT scan.\nFinding: a <focal> lesion."})
    assert "4 answers, 75% agree" in html and "0.90, 0.50" in html and "uncertainty 0.28" in html
    assert "Reasoning:</i> Modality: CT scan.<br>Finding: a &lt;focal&gt; lesion." in html


OUT_OF_DOMAIN = {"answer": "The image is outside what this model was trained on.", "detection": None, "diagnosis": None,
                 "segments": [], "domain": {"in_domain": False, "score": 41.7, "threshold": 12.5,
                                            "reason": "the image's features are far from the <phantom> CTs"},
                 "model": {"name": "raddiagseg-demo", "trained_on": "synthetic phantoms only", "clinical_use": False,
                           "notice": "Answered by raddiagseg-demo: trained on synthetic phantoms only, "
                                     "not for clinical use", "version": "v3", "dir": "/m"}}


def test_answer_panel_names_the_model_and_warns_outside_its_domain():
    """Issue 21: every answer says which model gave it; out of domain: a warning with the reason and no diagnosis."""
    from RadDiagLib import answer_html, domain_warning, infer_options, model_notice

    page = answer_html(OUT_OF_DOMAIN)
    assert "Answered by raddiagseg-demo: trained on synthetic phantoms only, not for clinical use" in page
    assert "<b>Warning:</b> This image is outside what the model was trained on: the image&#x27;s features are far " \
           "from the &lt;phantom&gt; CTs (domain score 41.7, threshold 12.5). No diagnosis was given." in page
    assert "No diagnosis given" in page and "Abnormality detected" not in page and "Diagnosis:" not in page
    assert page.index("Warning") < page.index("Answered by") < page.index("No diagnosis given")
    forced = dict(OUT_OF_DOMAIN, detection=True, diagnosis="Liver tumour", answer="1. Yes\n2. Liver tumour")
    assert "Answered anyway on request: do not rely on this answer." in domain_warning(forced)
    assert "Abnormality detected" in answer_html(forced) and "Liver tumour" in answer_html(forced)
    inside = dict(forced, domain={"in_domain": True, "score": 3.0, "threshold": 12.5, "reason": "in domain"})
    assert domain_warning(inside) == "" and "Warning" not in answer_html(inside)
    assert domain_warning(dict(inside, domain={"in_domain": None, "reason": "no statistics"})) == ""
    assert "Answered by raddiagseg-demo" in answer_html(inside)
    # the notice built from its parts when the server sends no sentence; older servers: no KeyError
    parts = {"name": "raddiagseg-paper", "trained_on": "MSD and COVID-QU-Ex", "clinical_use": False}
    assert model_notice({"model": parts}) == \
        "Answered by raddiagseg-paper: trained on MSD and COVID-QU-Ex, not for clinical use."
    assert model_notice({"model": {"version": "20261130-1", "dir": "/m"}}) == \
        "Answered by model version 20261130-1; the server does not say what it was trained on."
    old = {"answer": "1. No", "detection": False}
    assert model_notice(old) == "" and domain_warning(old) == "" and "No abnormality detected" in answer_html(old)
    assert infer_options(force=True) == {"force": True} and "force" not in infer_options()


def test_answer_panel_says_how_the_image_was_read():
    """Issue 21 item 2: the modality the server read the image as, and how it knew."""
    from RadDiagLib import answer_html, modality_line

    us = dict(OUT_OF_DOMAIN, modality={"value": "us", "source": "dicom"})
    assert modality_line(us) == "Read as US (from the DICOM header)."
    assert "Answered by raddiagseg-demo: trained on synthetic phantoms only, not for clinical use. Read as US (from the " \
           "DICOM header)." in answer_html(us)
    assert modality_line({"modality": {"value": "xray", "source": "intensities"}}) == "Read as X-ray (from its intensities)."
    assert modality_line({"modality": {"value": "ct", "source": "param"}}) == "Read as CT (as requested)."
    assert modality_line({}) == "" and modality_line({"modality": "ct"}) == ""


def test_finding_rows_show_the_measurements_and_the_centroid_in_ras():
    """Issue 23: one row per finding, with what the answer text says of it, and its centroid in RAS."""
    from raddiagseg.findings import describe_finding

    from RadDiagLib import FINDING_COLUMNS, finding_rows

    lesion = {"name": "liver tumour", "role": "abnormality", "organ": "liver", "label_value": 2, "volume_ml": 14.34,
              "max_diameter_mm": 32.1, "slices": [40, 52], "centroid_lps_mm": [12.5, -30.0, 80.25], "score": 0.91,
              "index": 1, "count": 2}
    second = dict(lesion, index=2, slices=[7, 7], centroid_lps_mm=[-1.0, 2.0, 3.0])
    organ = {"name": "liver", "role": "organ", "organ": "liver", "label_value": 1, "volume_ml": 1500.0,
             "max_diameter_mm": 180.44, "slices": [30, 70], "centroid_lps_mm": [0, 0, 0], "score": None}
    rows = finding_rows({"findings": [lesion, second, organ]})
    assert len(FINDING_COLUMNS) == 4
    assert [r.cells for r in rows] == [("liver tumour 1 of 2, in the liver", "14.3", "32.1", "40–52"),
                                       ("liver tumour 2 of 2, in the liver", "14.3", "32.1", "7"),
                                       ("liver", "1500.0", "180.4", "30–70")]
    text = describe_finding(lesion)  # the server's answer line for the same finding
    assert "14.3 mL" in text and "max diameter 32.1 mm" in text and "slices 40-52" in text
    assert rows[0].centroid_ras == (-12.5, 30.0, 80.25) and rows[1].centroid_ras == (1.0, -2.0, 3.0)
    assert (rows[0].name, rows[0].label_value, rows[2].role) == ("liver tumour", 2, "organ")
    # slice answers, older servers and garbled entries: no rows, or a row that cannot be jumped to
    assert finding_rows({"findings": []}) == finding_rows({"findings": None}) == finding_rows({}) == []
    (bad,) = finding_rows({"findings": [{"name": "lesion", "centroid_lps_mm": [1, "x"], "volume_ml": "big"}, "junk"]})
    assert bad.cells == ("lesion", "–", "–", "–") and bad.centroid_ras is None


def test_whole_volume_progress_from_the_server_queue():
    """Issue 23: while a whole volume is answered, the panel says how many slices are done and how long is left,
    read from the team server's GET /queue/ (place while waiting; slices done of planned while running)."""
    from RadDiagLib.volume_progress import END, START, active_job, duration, job_progress

    waiting = {"id": "b", "kind": "infer", "state": "queued", "position": 2, "eta_s": 95.4, "image": "ct_1",
               "submitted": 20.0}
    assert job_progress(waiting) == (None, "Waiting in the server's queue (place 2), about 1 min 35 s left.")
    running = {"id": "a", "kind": "infer", "state": "running", "position": 0, "eta_s": 12.0, "image": "ct_1",
               "submitted": 10.0, "stage": "neighbours", "slices_done": 30, "slices_planned": 40, "n_slices": 64}
    fraction, message = job_progress(running)
    assert fraction == pytest.approx(START + (END - START) * 0.75)
    assert message == "30 of 40 slices next to abnormal ones answered (volume of 64 slices), about 12 s left."
    assert job_progress({"state": "running", "eta_s": None}) == (None, "The model is reading the volume.")
    assert duration(0.2) == "under a second" and duration(120) == "about 2 min"
    # the newest active infer job about this image; finished ones, other images and other kinds are not it
    jobs = [dict(running, state="done", submitted=30.0), running, dict(waiting, image="ct_2", submitted=40.0),
            {"kind": "train", "state": "running", "image": "ct_1", "submitted": 50.0}, "junk"]
    assert active_job(jobs, "ct_1") is running and active_job(jobs, "ct_3") is None


def test_queue_watcher_reports_until_stopped_and_gives_up_on_servers_without_a_queue():
    """The watcher polls a real HTTP server: it reports each state (the bar never moving back), sends the token,
    and stops looking when the server has no /queue/ (plain MONAI Label: 404)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from RadDiagLib import RadDiagClient
    from RadDiagLib.volume_progress import QueueWatcher

    states = [{"kind": "infer", "state": "running", "image": "ct_1", "slices_done": d, "slices_planned": p,
               "stage": "slices", "n_slices": 20, "eta_s": 5.0} for d, p in ((4, 10), (8, 10), (9, 16), (16, 16))]
    seen = {"tokens": set(), "gets": 0}

    class Queue(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["tokens"].add(self.headers.get("Authorization"))
            seen["gets"] += 1
            if self.path != "/queue/" or not states:
                self.send_error(404)
                return
            body = json.dumps({"jobs": [states.pop(0)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Queue)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reports = []
        client = RadDiagClient(f"http://127.0.0.1:{server.server_port}", token="secret")
        with QueueWatcher(client, "ct_1", lambda f, m: reports.append((f, m)), poll_s=0.05) as watcher:
            deadline = time.time() + 10
            while watcher._thread.is_alive() and time.time() < deadline:
                time.sleep(0.05)
        assert not watcher._thread.is_alive()  # gave up at the 404 after the four states
        assert [m for _, m in reports] == ["4 of 10 slices answered (volume of 20 slices), about 5 s left.",
                                           "8 of 10 slices answered (volume of 20 slices), about 5 s left.",
                                           "9 of 16 slices answered (volume of 20 slices), about 5 s left.",
                                           "16 of 16 slices answered (volume of 20 slices), about 5 s left."]
        fractions = [f for f, _ in reports]
        assert fractions == sorted(fractions) and fractions[2] == fractions[1]  # 9/16 < 8/10: the bar stays
        assert seen["tokens"] == {"Bearer secret"} and seen["gets"] == 5
    finally:
        server.shutdown()
