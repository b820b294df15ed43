import errno
import json
import shutil

import pytest

from drpruning.training.checkpoint import Checkpointer, CheckpointError, check_disk_space


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


def test_failed_write_leaves_nothing_and_a_full_disk_is_explained(tmp_path):
    c = Checkpointer(tmp_path, keep=2)
    c.save(1, write_value(1))

    def fill_disk(folder):
        (folder / "big.bin").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="no space left.*keep_checkpoints.*resume=true"):
        c.save(2, fill_disk)
    assert c.steps() == [1] and not list(c.root.glob(".tmp-*"))

    def other_failure(folder):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        c.save(3, other_failure)
    assert not list(c.root.glob(".tmp-*"))
    assert c.load_latest(read) == (1, 1)


def test_disk_space_check_refuses_or_warns(tmp_path, monkeypatch, caplog):
    free = {"bytes": 10_000}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 0, free["bytes"]))
    run = tmp_path / "not" / "yet" / "made"  # the nearest existing parent is measured
    with pytest.raises(CheckpointError, match="has 0.0 GB free.*larger disk"):
        check_disk_space(run, checkpoint_bytes=8_000, keep=2, export_bytes=4_000)
    free["bytes"] = 20_000  # one checkpoint + export fit (12 000), three + export (28 000) do not
    with caplog.at_level("WARNING"):
        check_disk_space(run, checkpoint_bytes=8_000, keep=2, export_bytes=4_000)
    assert "keep_checkpoints" in caplog.text
    caplog.clear()
    free["bytes"] = 30_000
    with caplog.at_level("WARNING"):
        check_disk_space(run, checkpoint_bytes=8_000, keep=2, export_bytes=4_000)
    assert caplog.text == ""
