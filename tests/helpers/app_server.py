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
