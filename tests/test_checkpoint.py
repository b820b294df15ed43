import json

import pytest

from drpruning.checkpoint import Checkpointer, CheckpointError


def write_value(v):
    def write(folder):
        (folder / "value.json").write_text(json.dumps(v))
    return write


def read(folder):
    return json.loads((folder / "value.json").read_text())


def test_save_keeps_last_k_and_loads_latest(tmp_path):
    c = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        c.save(step, write_value({"step": step}))
    assert c.steps() == [30, 20]
    assert c.load_latest(read) == (30, {"step": 30})


def test_truncated_checkpoint_is_refused_and_previous_used(tmp_path, caplog):
    c = Checkpointer(tmp_path, keep=3)
    c.save(1, write_value({"step": 1}))
    c.save(2, write_value({"step": 2, "pad": "x" * 100}))
    f = c.path(2) / "value.json"
    f.write_bytes(f.read_bytes()[:10])
    with caplog.at_level("WARNING"):
        assert c.load_latest(read) == (1, {"step": 1})
    assert "refusing checkpoint" in caplog.text and "truncated" in caplog.text


def test_unloadable_checkpoint_falls_back(tmp_path):
    c = Checkpointer(tmp_path, keep=3)
    c.save(1, write_value({"step": 1}))
    c.save(2, write_value({"step": 2}))
    (c.path(2) / "value.json").write_text("{bad json}")  # same size trick not needed: read fails
    manifest = json.loads((c.path(2) / "manifest.json").read_text())
    manifest["files"]["value.json"] = len("{bad json}")
    (c.path(2) / "manifest.json").write_text(json.dumps(manifest))
    assert c.load_latest(read)[0] == 1


def test_partial_write_is_invisible(tmp_path):
    c = Checkpointer(tmp_path, keep=3)
    c.save(1, write_value(1))

    def crash(folder):
        (folder / "value.json").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        c.save(2, crash)
    assert c.steps() == [1]


def test_no_loadable_checkpoint_is_an_error(tmp_path):
    c = Checkpointer(tmp_path)
    c.save(1, write_value(1))
    (c.path(1) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no loadable checkpoint"):
        c.load_latest(read)
    assert Checkpointer(tmp_path / "empty").load_latest(read) is None
