"""Optional copies of the metrics.jsonl records in TensorBoard and Weights & Biases (rank 0, like the file).

A record becomes values tagged KIND/KEY[/SUBKEY...] at the record's step (`train/loss`, `eval/eval_loss/wiki`):
numbers as scalars, strings as TensorBoard text and plain W&B values; lists and nulls are skipped. The packages
are imported only when a sink is enabled (`pip install -e '.[log]'` installs both).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from drpruning.config import ConfigError

if TYPE_CHECKING:
    from drpruning.config import RunConfig

INSTALL = "pip install {} (or pip install -e '.[log]' in a checkout)"


def flatten(kind: str, record: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(scalars, texts) of one record, keyed by tag; `kind` and `step` are where, not what."""
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}

    def visit(tag: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{tag}/{key}", inner)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            scalars[tag] = float(value)
        elif isinstance(value, str):
            texts[tag] = value

    for key, value in record.items():
        if key not in ("kind", "step"):
            visit(f"{kind}/{key}", value)
    return scalars, texts


def check_sinks(cfg: RunConfig) -> None:
    """Refuse an enabled sink that cannot work (package missing, online W&B without an API key) before any
    expensive work; imports nothing unless W&B is online."""
    log = cfg.log
    if log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("config key 'log.tensorboard' is true but the tensorboard package is not installed: "
                          f"{INSTALL.format('tensorboard')}, or set log.tensorboard=false")
    if not log.wandb.project:
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"config key 'log.wandb.project' is set but the wandb package is not installed: "
                          f"{INSTALL.format('wandb')}, or unset log.wandb.project")
    if log.wandb.mode == "online":
        import wandb

        # without a key, wandb.init would ask for one on a terminal, or fail once the model is loaded
        if not wandb.login(prompt=False, verify=False):
            raise ConfigError("log.wandb.mode is online but no W&B API key is configured: run `wandb login` or "
                              "set WANDB_API_KEY, or use log.wandb.mode=offline and `wandb sync` the run later")


class TensorBoardSink:
    def __init__(self, folder: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a purge step tells readers to drop the events an earlier writer left at and after it: on resume
        # those are the records metrics.jsonl dropped, written again now; on a fresh start, all of them
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, text in texts.items():
            self.writer.add_text(tag, text, step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run directory: its id is kept in RUN_DIR/wandb/run_id, and a resumed run continues it."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool):
        import wandb

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        # wandb-core talks to this process over a unix socket (TCP only where there are none, on Windows);
        # console off: it does not wrap stdout/stderr (the progress bar); create_new: a run of the user's own
        # in this process is left alone; a flush each second: a killed process loses about a second of records
        key = "x_transaction_log_flush_interval"  # seconds between writes of the run's file, 15 by default
        flush = {key: 1.0} if key in wandb.Settings.model_fields else {}  # an x_ setting: not in every version
        settings = wandb.Settings(silent=True, console="off", allow_val_change=True, reinit="create_new", **flush)
        self.run = wandb.init(project=cfg.log.wandb.project, mode=cfg.log.wandb.mode, dir=str(run_dir),
                              id=run_id, resume="allow", name=run_dir.name, settings=settings,
                              config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
        # W&B history only moves forward: an online run resumed after a kill already holds the steps between
        # its checkpoint and the kill (written again here with the same values, as the resume is exact)
        self.first_step = self.run.step if resume else 0

    def write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        if step >= self.first_step:
            self.run.log({**scalars, **texts}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg: RunConfig, run_dir: Path, resume_step: int | None) -> list:
    """The enabled sinks; `resume_step`: the checkpoint a resumed run continues from, None on a fresh start."""
    sinks: list = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", 0 if resume_step is None else resume_step + 1))
    if cfg.log.wandb.project:
        sinks.append(WandbSink(cfg, run_dir, resume=resume_step is not None))
    return sinks
