"""TensorBoard and W&B copies of metrics.jsonl: the records' values at their steps, read back with the packages'
own readers and compared with the values written (not with the mapping code), replaced rather than doubled when
a run resumes; a sink whose package is missing is refused at once."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from drpruning.config import ConfigError, LogConfig, RunConfig, WandbConfig
from drpruning.training.metrics import MetricsLog, read_metrics

NAN = float("nan")
# the first process: checkpoint at step 2, then a loss spike and step 3 before it dies
FIRST = [
    ("calibration", {"step": 0, "protected_hidden": [3, 7]}),
    ("eval", {"step": 0, "eval_loss": {"wiki": 3.5, "code": 2.25}, "mean_loss": 2.875, "worst_domain": "wiki"}),
    ("train", {"step": 1, "loss": 3.25, "domain_loss": {"wiki": 3.5, "code": NAN}}),
    ("train", {"step": 2, "loss": 3.0, "domain_loss": {"wiki": 3.25, "code": 2.5}}),
    ("mix", {"step": 2, "method": "drpruning", "weights": {"wiki": 0.625, "code": 0.375},
             "fits": {"wiki": None, "code": {"a": 1.5}}, "skipped": False}),
    ("warning", {"step": 3, "loss": 9.5, "loss_ema": 3.0, "message": "loss spike"}),
    ("train", {"step": 3, "loss": 9.5, "domain_loss": {"wiki": 9.5, "code": 9.5}}),
]
# the resumed process, from the checkpoint at step 2
SECOND = [
    ("train", {"step": 3, "loss": 2.75, "domain_loss": {"wiki": 3.0, "code": 2.5}}),
    ("train", {"step": 4, "loss": 2.5, "domain_loss": {"wiki": 2.75, "code": 2.25}}),
    ("eval", {"step": 4, "eval_loss": {"wiki": 2.0, "code": 3.0}, "mean_loss": 2.5, "worst_domain": "code"}),
    ("final", {"step": 4, "model_dir": "/runs/x/model", "shape": {"num_hidden_layers": 2}}),
]
# what a reader should see at the end, tag -> {step: value}: the first process's steps 3 (the spike included)
# are gone, lists, nulls and NaN are not values
SCALARS = {
    "eval/eval_loss/wiki": {0: 3.5, 4: 2.0}, "eval/eval_loss/code": {0: 2.25, 4: 3.0},
    "eval/mean_loss": {0: 2.875, 4: 2.5},
    "train/loss": {1: 3.25, 2: 3.0, 3: 2.75, 4: 2.5},
    "train/domain_loss/wiki": {1: 3.5, 2: 3.25, 3: 3.0, 4: 2.75}, "train/domain_loss/code": {2: 2.5, 3: 2.5, 4: 2.25},
    "mix/weights/wiki": {2: 0.625}, "mix/weights/code": {2: 0.375}, "mix/fits/code/a": {2: 1.5},
    "mix/skipped": {2: 0.0},
    "final/shape/num_hidden_layers": {4: 2.0},
}
TEXTS = {"eval/worst_domain": {0: "wiki", 4: "code"}, "mix/method": {2: "drpruning"},
         "final/model_dir": {4: "/runs/x/model"}}
FIRST_STEP_3 = {"warning/loss": 9.5, "warning/loss_ema": 3.0, "warning/message": "loss spike", "train/loss": 9.5,
                "train/domain_loss/wiki": 9.5, "train/domain_loss/code": 9.5}


def _by_step(steps) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for table in (SCALARS, TEXTS):
        for tag, values in table.items():
            for step, value in values.items():
                if step in steps:
                    out.setdefault(step, {})[tag] = value
    return out


def _config(run: Path, tensorboard: bool = True, project: str | None = "drpruning-test") -> RunConfig:
    return RunConfig(run_dir=str(run), log=LogConfig(tensorboard=tensorboard, wandb=WandbConfig(project=project)))


def _wandb_history(path: Path, timeout: float = 20.0) -> dict[int, dict]:
    """History rows of an offline run's .wandb file: W&B's LevelDB-style log of wandb_internal Record protobufs
    (wandb ships no reader for it). The file is complete once it holds the exit record, shortly after finish()."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    deadline = time.monotonic() + timeout
    while True:
        data, pos, pending, records = path.read_bytes(), 7, b"", []  # 7: the file's own header, ":W&B" + version
        while pos + header <= len(data):
            if block - pos % block < header:  # a block's tail too short for a chunk header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + header])
            if length == 0 and kind == 0:
                break
            pending += data[pos + header:pos + header + length]
            pos += header + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.05)
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def test_tensorboard_and_wandb_hold_the_records_and_resume_replaces_them(tmp_path, capfd):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run = tmp_path / "run"
    run.mkdir()
    cfg = _config(run)
    first = MetricsLog(run / "metrics.jsonl", cfg=cfg)
    for kind, record in FIRST:
        first.write(kind, **record)
    first.close()  # the first process ends
    second = MetricsLog(run / "metrics.jsonl", cfg=cfg)
    second.truncate_after(2)
    for kind, record in SECOND:
        second.write(kind, **record)  # `final` closes the sinks

    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 0, 1, 2, 2, 3, 4, 4, 4]

    # TensorBoard's own reader (the one it serves from) applies the purge; a purged tag stays listed, empty
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    seen: dict[str, dict] = {"scalars": {}, "text": {}}
    for tag in events.Tags()["tensors"]:
        kind = events.SummaryMetadata(tag).plugin_data.plugin_name
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
        if values:
            seen[kind][tag] = values
    assert seen["scalars"] == {tag: sorted(values.items()) for tag, values in SCALARS.items()}
    assert seen["text"] == {f"{tag}/text_summary": [(step, text.encode()) for step, text in sorted(values.items())]
                            for tag, values in TEXTS.items()}

    # W&B: one run id kept in the run directory, continued by the resumed process (an offline folder each)
    run_id = (run / "wandb" / "run_id").read_text().strip()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.split("-", 3)[3].startswith(run_id) for f in folders)
    history = [_wandb_history(f / f"run-{run_id}.wandb") for f in folders]
    assert history[0] == {**_by_step({0, 1, 2}), 3: FIRST_STEP_3}
    assert history[1] == _by_step({3, 4})
    out, err = capfd.readouterr()
    assert "wandb" not in out + err  # quiet


@pytest.mark.parametrize("package,key", [("tensorboard", "log.tensorboard"), ("wandb", "log.wandb.project")])
def test_a_sink_without_its_package_is_refused_when_the_log_is_made(tmp_path, monkeypatch, package, key):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: import and find_spec fail
    cfg = _config(tmp_path, tensorboard=package == "tensorboard", project="p" if package == "wandb" else None)
    with pytest.raises(ConfigError, match=rf"'{key}'.*pip install {package} \(or pip install -e '\.\[log\]'"):
        MetricsLog(tmp_path / "metrics.jsonl", cfg=cfg)
    # other ranks write nothing, so they need nothing
    MetricsLog(tmp_path / "metrics.jsonl", enabled=False, cfg=cfg).write("eval", step=0, mean_loss=1.0)
    assert list(tmp_path.iterdir()) == []


def test_online_wandb_without_an_api_key_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = RunConfig(run_dir=str(tmp_path), log=LogConfig(wandb=WandbConfig(project="p", mode="online")))
    with pytest.raises(ConfigError, match="no W&B API key.*wandb login"):
        MetricsLog(tmp_path / "metrics.jsonl", cfg=cfg)


def test_records_without_sinks_write_only_the_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", cfg=_config(tmp_path, tensorboard=False, project=None))
    log.write("eval", step=0, mean_loss=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
