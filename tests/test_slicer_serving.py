"""RadDiagLib against the team server (MONAILabelApp/serve.py: bearer tokens with roles, upload limit).

Uses the serving tests' fast stand-in app, so only what the client must handle is exercised: it
sends the configured token, and 401 / 403 / 413 become messages that say what to do.
"""

import numpy as np
import pytest

from RadDiagLib import RadDiagClient, ServerError
from RadDiagLib.workflow import diagnose, image_id_for, retrain

serving = pytest.importorskip("serving_helpers")
live_server = pytest.importorskip("live_server")
sitk = pytest.importorskip("SimpleITK")

if not serving.SERVE.exists():
    pytest.skip("MONAILabelApp/serve.py is not there yet", allow_module_level=True)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("slicer_team")
    app = serving.write_stub_app(root / "app")
    studies = root / "studies"
    studies.mkdir()
    serving.write_image(studies / "ct_a.nii.gz")
    tokens = serving.make_users(root / "auth.json")
    server = serving.start_serve(app, studies, root / "auth.json", tokens["user"], extra=("--max-upload-mb", "0.2"))
    yield server, tokens, root
    server.stop()


def test_token_is_sent_and_missing_token_is_explained(team):
    server, tokens, _ = team
    with pytest.raises(ServerError) as err:
        RadDiagClient(server.url).info()
    assert err.value.status == 401 and "token missing or expired" in str(err.value)
    with pytest.raises(ServerError, match="token missing or expired"):
        RadDiagClient(server.url, token="not-a-token").info()
    client = RadDiagClient(server.url, token="Bearer " + tokens["user"])  # pasted with its prefix
    assert "raddiagseg" in client.models()


def test_roles_and_upload_limit_are_explained(team, tmp_path):
    server, tokens, _ = team
    path = serving.write_image(tmp_path / "small.nii.gz")
    with pytest.raises(ServerError) as err:
        RadDiagClient(server.url, token=tokens["user"]).upload_image(str(path), "small")
    assert err.value.status == 403 and "not allowed" in str(err.value) and "annotator" in str(err.value)

    big = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 30000, (40, 64, 64)).astype(np.int16)),
                    str(big))  # uncompressed, ~330 kB > 0.2 MB
    with pytest.raises(ServerError) as err:
        RadDiagClient(server.url, token=tokens["annotator"]).upload_image(str(big), "big")
    assert err.value.status == 413 and "too large" in str(err.value) and "crop" in str(err.value)


def test_annotator_asks_and_admin_retrains_with_tokens(team, tmp_path):
    server, tokens, _ = team
    path = str(serving.write_image(tmp_path / "mine.nii.gz"))
    client = RadDiagClient(server.url, token=tokens["annotator"])
    result = diagnose(client, "raddiagseg", path, image_id_for("mine", path), "what is bright?",
                      result_dir=str(tmp_path / "out"))
    assert result.answer.startswith("bright what is bright?")
    assert result.label_path and sitk.ReadImage(result.label_path).GetSize() == sitk.ReadImage(path).GetSize()

    with pytest.raises(ServerError) as err:
        client.start_training("raddiagseg")
    assert err.value.status == 403
    admin = RadDiagClient(server.url, token=tokens["admin"])
    progress = retrain(admin, "raddiagseg", poll_s=0.3, params={"steps": 2}, timeout_s=120)
    assert progress.state == "done", progress.message
