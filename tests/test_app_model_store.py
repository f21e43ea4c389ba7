"""Which model the app serves across publishes, rollbacks, interrupted publishes and restarts
(lib/model_store.py; folders, and the options the served model is loaded with)."""

import json

from lib.model_store import ModelStore


def checkpoint(folder, tag):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode() * 100)
    return folder


def served_tag(store):
    return json.loads((store.current_dir() / "config.json").read_text())["tag"]


def test_publish_survives_a_restart_and_can_be_rolled_back(tmp_path):
    base = checkpoint(tmp_path / "base", "base")
    store = ModelStore(base, tmp_path / "work")
    assert store.current_dir() == base and store.available()
    before = store.version()
    first = store.publish(checkpoint(tmp_path / "run1", "run1"))
    assert served_tag(store) == "run1" and first.name.startswith("v0001-")
    assert store.version() != before
    second = store.publish(checkpoint(tmp_path / "run2", "run2"))
    assert second.name.startswith("v0002-")

    restarted = ModelStore(base, tmp_path / "work")  # a new process on the same work dir
    assert restarted.current_dir() == second and served_tag(restarted) == "run2"

    (tmp_path / "work" / "models" / "CURRENT").write_text(first.name + "\n")  # roll back by hand
    assert served_tag(ModelStore(base, tmp_path / "work")) == "run1"


def test_interrupted_publish_is_never_served_and_is_cleaned_up(tmp_path):
    base = checkpoint(tmp_path / "base", "base")
    store = ModelStore(base, tmp_path / "work")
    models = tmp_path / "work" / "models"
    half = models / ".tmp-deadbeef"  # a copy killed half-way: no config.json yet
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"partial")
    (models / ".CURRENT-cafe").write_text(".tmp-deadbeef\n")
    assert store.current_dir() == base
    (models / "CURRENT").write_text("v0009-missing\n")  # pointer to a folder that is not there
    assert store.current_dir() == base

    store.publish(checkpoint(tmp_path / "run1", "run1"))
    assert served_tag(store) == "run1"
    assert sorted(p.name for p in models.iterdir() if p.name.startswith(".")) == []


def test_old_versions_are_pruned_but_the_served_one_is_kept(tmp_path):
    base = checkpoint(tmp_path / "base", "base")
    store = ModelStore(base, tmp_path / "work", keep=2)
    for i in range(4):
        store.publish(checkpoint(tmp_path / f"run{i}", f"run{i}"))
    versions = sorted(p.name[:5] for p in (tmp_path / "work" / "models").glob("v*"))
    assert versions == ["v0003", "v0004"] and served_tag(store) == "run3"


def test_compile_decode_conf_reaches_the_served_model_and_a_bad_value_is_refused(tmp_path):
    import pytest
    from app_studies import DEMO_MODEL
    from lib.configs.raddiagseg import RadDiagSegAppConfig

    app_dir = DEMO_MODEL.parents[1]
    for value, expected in (("true", True), ("off", False), (None, False)):
        conf = {"model_path": str(DEMO_MODEL), "work_dir": str(tmp_path / "work")}
        if value is not None:
            conf["compile_decode"] = value
        model, _ = RadDiagSegAppConfig(app_dir, str(tmp_path), conf).store.get()
        assert model.language_model.compile_decode is expected
    with pytest.raises(ValueError, match="compile_decode must be true or false, got 'sometimes'"):
        RadDiagSegAppConfig(app_dir, str(tmp_path), {"compile_decode": "sometimes", "work_dir": str(tmp_path / "work")})
