"""A pruning pipeline's stages. One run, except for learnt (L0) masks with `pruning.mask_phase_steps`: the masks
learn over the first steps of the budget in RUN_DIR/mask-phase, whose exported compact model then trains for the
rest of train.steps in RUN_DIR, distilled from the source (the recipe measured in experiments/l0_budget).

Each stage is a whole run of its own (its warmup and cosine, its mixing state, checkpoints and metrics), as in
that study; the second reads on in the data stream, not the mask phase's windows again. A rerun with resume
skips a finished mask phase and continues whichever stage was cut off.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from drpruning.config import RunConfig, save_config, two_stage, validate
from drpruning.training import checkpoint as ckpt
from drpruning.training import distributed as dist
from drpruning.training.trainer import train

MASK_PHASE = "mask-phase"


def derive(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` with `key=value` overrides applied, validated again."""
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    out: RunConfig = OmegaConf.to_object(merged)
    validate(out)
    return out


def stage_configs(cfg: RunConfig) -> tuple[RunConfig, RunConfig]:
    """(mask phase, compact training) of a two-stage config."""
    run, p, t = Path(cfg.run_dir), cfg.pruning, cfg.train
    teacher = t.distill.teacher or cfg.model.source
    mask = derive(cfg, [f"run_dir={run / MASK_PHASE}", f"train.steps={p.mask_phase_steps}",
                        "pruning.mask_phase_steps=0"])
    compact = derive(cfg, ["pruning.enabled=false", "pruning.mask_phase_steps=0",
                           f"model.source={run / MASK_PHASE / 'model'}",
                           f"train.steps={t.steps - p.mask_phase_steps}", f"train.distill.teacher={teacher}"])
    return mask, compact


def run(cfg: RunConfig) -> Path:
    """Train `cfg`: one run, or the mask phase and then the compact model's training; the final model's folder."""
    if not two_stage(cfg.pruning):
        return train(cfg)
    mask, compact = stage_configs(cfg)
    if not cfg.resume:  # refuse before the mask phase's work, not after it
        for stage in (mask, compact):
            ckpt.refuse_existing(Path(stage.run_dir))
    if dist.rank_from_env() == 0:  # the pipeline as given; each stage's own config.yaml is what it ran
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "pipeline.yaml")
    mask_model = Path(mask.run_dir) / "model"
    if not (cfg.resume and (mask_model / "config.json").is_file()):
        train(mask)
        compact.resume = False  # the mask phase just finished: the compact model starts
    elif cfg.resume is True:
        compact.resume = "auto"  # cut off between the stages: nothing of the second to resume yet
    return train(compact)
