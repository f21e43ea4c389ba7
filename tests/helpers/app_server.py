"""The RadDiag app (MONAILabelApp) served for a test module, and asking it for an answer.

    def test_x(app_server):
        served = app_server("name", model="random")      # {"server", "studies", "root"}
        result = infer_json(served["server"], "ct_liver", {"slice": 4})
"""

import json
import shutil

import pytest
import requests
from app_studies import APP_DIR, random_model_dir, write_studies


@pytest.fixture(scope="module")
def app_server(server_factory, tmp_path_factory):
    """Callable(name, model=None, copy_studies=None) -> {"server", "studies", "root"}, stopped after the module.

    Studies: the generated phantoms of `write_studies` ("studies" is then its {id: (image, label)}), or copies of
    the .nii.gz/.png files in the folder `copy_studies` ("studies" is then the folder). `model`: a model folder,
    "random" (a randomly initialised demo-preset folder) or None (the app's default model)."""

    def start(name, model=None, copy_studies=None):
        root = tmp_path_factory.mktemp(name)
        folder = root / "studies"
        if copy_studies is None:
            studies = write_studies(folder)
        else:
            folder.mkdir()
            for path in copy_studies.iterdir():  # the studies, not the files a server wrote next to them
                if path.is_file() and path.name.endswith((".nii.gz", ".png")):
                    shutil.copy(path, folder / path.name)
            studies = folder
        conf = {"work_dir": root / "work"}
        if model == "random":
            model = random_model_dir(root / "model")
        conf.update({"model_path": model} if model is not None else {"models": "raddiagseg"})
        return {"server": server_factory(APP_DIR, folder, conf), "studies": studies, "root": root}

    return start


def post_infer(url, image_id, params=None, output="json", headers=None, timeout=300):
    """POST /infer/raddiagseg for `image_id` with `params` as the JSON form field; returns the response."""
    return requests.post(f"{url}/infer/raddiagseg", params={"image": image_id, "output": output}, headers=headers,
                         data={"params": json.dumps(params or {})}, timeout=timeout)


def infer_json(server, image_id, params=None, expect=200, timeout=300):
    """The JSON result of an inference on a live server; asserts the status (the server log in the message)."""
    reply = post_infer(server.url, image_id, params, timeout=timeout)
    assert reply.status_code == expect, f"{reply.status_code}: {reply.text[:500]}\n{server.log()}"
    return reply.json()


def infer_with_label(server, image_id, params, folder, expect=200):
    """(JSON result, path of the label file written into `folder`) of an inference asked with output=all; (error
    JSON, None) when the status is the expected error."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    reply = post_infer(server.url, image_id, params, output="all", timeout=600)
    assert reply.status_code == expect, f"{reply.status_code}: {reply.text[:500]}\n{server.log()}"
    if expect != 200:
        return reply.json(), None
    result, label = None, None
    for part in MultipartDecoder.from_response(reply).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.text)
        else:
            name = disposition.split("filename=")[-1].strip('"')
            suffix = ".seg.nrrd" if name.endswith(".seg.nrrd") else "".join(
                s for s in (".nii.gz", ".nii", ".nrrd", ".png") if name.endswith(s))[:7]
            label = folder / f"label_{image_id}_{len(list(folder.iterdir()))}{suffix}"
            label.write_bytes(part.content)
    return result, label
