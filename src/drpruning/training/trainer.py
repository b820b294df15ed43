"""The training loop, in plain PyTorch: continued pretraining, or pruning when `pruning.enabled`.

Read top to bottom: set-up (cheap checks, then model, data, pruner, mixer, sampler, optimisers), then
`run()`: evaluate the source model, then steps of sample -> forward/backward with per-domain loss accounting
-> optimiser step, with an evaluation and a mixing update every `eval_every` steps and an atomic checkpoint
every `checkpoint_every` steps, then the model (compact, when pruning) in RUN_DIR/model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from drpruning.config import ConfigError, RunConfig, save_config
from drpruning.data import MixtureSampler, check_sources, initial_proportions, load_corpus
from drpruning.data.sampler import continue_stream, save_stream
from drpruning.evaluation.perplexity import domain_nll, loss_and_error
from drpruning.loss import autocast, autocast_dtype, token_losses
from drpruning.mixing import build_mixer
from drpruning.models import card, shape_search
from drpruning.models.loading import load_model, load_model_config, model_max_length, save_model, source_dtype
from drpruning.models.shape import SHAPE_KEYS, resolve_target, source_shape
from drpruning.plan import check_memory
from drpruning.pruning import Pruner, attach, export_model, one_shot
from drpruning.pruning.importance import calibrate
from drpruning.pruning.summary import shape_summary, tie_groups
from drpruning.training import checkpoint as ckpt
from drpruning.training import compiling, parallel
from drpruning.training import distributed as dist
from drpruning.training.cpu_memory import keep_freed_memory
from drpruning.training.distill import load_teacher
from drpruning.training.health import HealthGuard, TrainingError, check_exportable, export_gap_record, export_refusal
from drpruning.training.metrics import MetricsLog, progress
from drpruning.training.optim import build_optimizers, build_schedulers

log = logging.getLogger(__name__)
RANK_SEED_STRIDE = 1000  # mask sampling on rank r is seeded train.seed * 1000 + r
RESUME_SEED_STRIDE = 7919  # a rank without a saved mask-sampling state gets a seed distinct per resume step


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = dist.init()
        if self.device.type == "cpu":
            keep_freed_memory()
        self.main = dist.is_main()
        self.run_dir = Path(cfg.run_dir)
        t = cfg.train
        # Cheap checks first: model config, target shape, data folders. Weights and tokens come after.
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main, cfg=cfg)  # log sinks' packages
        model_config, source_dir, _ = load_model_config(cfg.model.source)
        if cfg.data.seq_len > model_max_length(model_config):
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is beyond the model's context of "
                              f"{model_max_length(model_config)} tokens; lower data.seq_len")
        if cfg.pruning.enabled:
            resolve_target(model_config, cfg.pruning)
        compiling.check_available(t.compile, self.device)
        check_memory(cfg, model_config, self.device, dist.world())  # refuse what cannot fit (drpruning plan)
        per_step = t.micro_batch_size * dist.world()
        if t.batch_size % per_step:
            raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size x ranks "
                              f"= {per_step}; change train.batch_size or train.micro_batch_size")
        if not cfg.resume:
            ckpt.refuse_existing(self.run_dir)
        sources = check_sources(cfg.data.domains)

        ckpt.seed_everything(t.seed)
        # weights are trained in model.dtype (auto: float32 master weights) and saved in the source's dtype
        self.model, self.tokenizer = load_model(cfg.model.source, dtype=cfg.model.dtype)
        self.save_dtype = source_dtype(model_config)
        self.model.to(self.device)
        self.model.config.use_cache = False
        self.corpus = load_corpus(cfg.data, self.tokenizer, sources)
        self.names = self.corpus.names
        self.initial = initial_proportions(cfg.data, self.names, self.corpus.train_tokens)
        self.amp_dtype = autocast_dtype(t.dtype, self.device)
        self.forward_dtype = self.amp_dtype  # every forward's autocast; None once FSDP gathers weights in it
        self.checkpointer = ckpt.Checkpointer(self.run_dir, t.keep_checkpoints)
        cfg.pruning = shape_search.searched(cfg, self.model, self.corpus, self.forward_dtype, self.main)  # best shape

        self.pruner, self.cut, source, final_sparsity = None, None, None, None
        if cfg.pruning.enabled:
            pruner = Pruner(self.model.config, cfg.pruning, t.steps, self.device)
            pruner.seed(t.seed * RANK_SEED_STRIDE + dist.rank())
            final_sparsity = pruner.final_sparsity()
            if pruner.one_shot:  # cut once, then train the compact model: the source stays whole (a teacher)
                source = self.model
                with autocast(self.device, self.forward_dtype):
                    self.model, self.cut = one_shot.cut_once(  # the source's losses and their errors, before the cut
                        self.run_dir, pruner, source, self.corpus.train, t.micro_batch_size,
                        lambda: {"losses": self.evaluate(), "se": self.eval_se}, self.tokenizer,
                        bool(cfg.resume and self.checkpointer.steps()), cfg.model.dtype, self.main)
                self.model.to(self.device)
                dist.barrier()
            else:
                self.pruner = pruner
                self.masked = attach(self.model, self.pruner)
        self.teacher = load_teacher(cfg, self.model, self.device, source) if t.distill.weight > 0 else None
        del source
        self.compiled = compiling.compile_run(t.compile, self.device, t.batch_size, cfg.data.seq_len, t.steps,
                                              self.model, self.teacher, dist.world())
        self.mixer = build_mixer(cfg.mixing, self.names, self.initial, t.steps, cfg.pruning.enabled, final_sparsity)
        self.sampler = MixtureSampler([len(x) for x in self.corpus.train], seed=t.seed, names=self.names)
        continue_stream(self.sampler, source_dir)  # after pruning: read on, not the pruning run's windows again
        if t.activation_checkpointing:  # on the plain model, before DDP / FSDP wrap it (same numbers, less memory)
            parallel.enable_activation_checkpointing(self.model)
        self.train_model = parallel.wrap_model(self.model, cfg.parallel, self.device, self.amp_dtype) \
            if dist.world() > 1 else self.model
        self.forward_dtype = parallel.forward_dtype(self.train_model, self.amp_dtype)
        self.optimizers = build_optimizers(self.train_model, self.pruner, t)
        self.schedulers = build_schedulers(self.optimizers, t, cfg.pruning if self.pruner is not None else None)
        self.step, self.elapsed_s, self.domain_tokens = 0, 0.0, [0] * len(self.names)  # elapsed_s: kept on resume
        self.health = HealthGuard(t.max_bad_steps, self.metrics, self.checkpointer)

    def evaluate(self, exact: bool = False) -> list[float]:
        """Per-domain held-out loss (token-weighted), with deterministic masks when pruning."""
        with self.pruner.evaluating(exact) if self.pruner is not None else contextlib.nullcontext():
            held_out = [e[:self.cfg.train.eval_limit] for e in self.corpus.eval]  # [:None] keeps all
            stats = domain_nll(self.model, held_out, self.cfg.train.eval_batch_size, self.forward_dtype,
                               shard=(dist.rank(), dist.world()), collective=parallel.is_fsdp(self.model))
        losses, self.eval_se = loss_and_error(dist.all_reduce_sum(stats))
        return losses

    def log_eval(self, losses: list[float], **extra) -> None:
        worst = int(np.argmax(losses))
        self.metrics.write("eval", step=self.step, tokens=sum(self.domain_tokens), **extra,
                           eval_loss=dict(zip(self.names, losses)), eval_se=dict(zip(self.names, self.eval_se)),
                           eval_ppl={n: math.exp(min(x, 700.0)) for n, x in zip(self.names, losses)},
                           mean_loss=float(np.mean(losses)), worst_loss=losses[worst],
                           worst_domain=self.names[worst])

    def evaluate_and_mix(self, last: bool) -> list[float]:
        losses = self.evaluate(exact=last)
        shape = shape_summary(self.pruner, last) if self.pruner is not None else (self.cut or {}).get("shape")
        self.log_eval(losses, **({"shape": shape} if shape else {}))
        if self.main:
            sparsity = self.pruner.expected_sparsity() if self.pruner is not None else self.mixer.final_sparsity
            record = self.mixer.update(self.step, losses, list(self.domain_tokens), sparsity)
            self.metrics.write("mix", step=self.step, **record)
        proportions = dist.broadcast_floats(self.mixer.proportions)
        if not self.main:
            self.mixer.proportions = proportions
        return losses

    def train_step(self) -> dict:
        t = self.cfg.train
        k, seq_len = len(self.names), self.cfg.data.seq_len
        proportions = list(self.mixer.proportions)
        batch = self.sampler.next_batch(proportions, t.batch_size)
        for d, _ in batch:
            self.domain_tokens[d] += seq_len
        local = batch[dist.rank()::dist.world()]
        n_global = t.batch_size * (seq_len - 1)
        # per-domain sums stay on the device: NCCL reduces device tensors only, and no host sync per micro-batch
        sums, kl_sums, counts = (torch.zeros(k, dtype=torch.float64, device=self.device) for _ in range(3))
        w = t.distill.weight if self.teacher is not None else 0.0
        micro = [local[i:i + t.micro_batch_size] for i in range(0, len(local), t.micro_batch_size)]
        if self.pruner is not None:  # hardening (the last steps: exact masks), deterministic gates' temperature
            self.pruner.begin_step(self.step)
        for j, chunk in enumerate(micro):
            ids = torch.stack([self.corpus.train[d][i] for d, i in chunk]).to(self.device)
            domains = torch.tensor([d for d, _ in chunk], device=self.device)
            with parallel.maybe_no_sync(self.train_model, sync=j == len(micro) - 1):
                with autocast(self.device, self.forward_dtype):
                    nll, kl = token_losses(self.train_model, ids, self.teacher, t.distill.temperature)
                seq_sums = nll.sum(dim=1)
                objective = seq_sums if kl is None else (1 - w) * seq_sums + w * kl.sum(dim=1)
                # DDP averages gradients over ranks, so each rank's share is scaled by the world size
                (objective.sum() / n_global * dist.world()).backward()
            sums.index_add_(0, domains, seq_sums.detach().double())
            if kl is not None:
                kl_sums.index_add_(0, domains, kl.detach().sum(dim=1).double())
            counts.index_add_(0, domains, torch.full((len(chunk),), float(seq_len - 1), dtype=torch.float64,
                                                     device=self.device))
        record = self.pruner.penalty_step(self.step) if self.pruner is not None else {}
        for x in (sums, kl_sums, counts):
            dist.all_reduce_sum(x)
        domain_loss = (sums / counts).tolist()  # nan for a domain absent from the batch
        if self.teacher is not None:  # the mixer's signal stays the cross-entropy
            record["domain_kl"] = dict(zip(self.names, (kl_sums / counts).tolist()))
        loss = float(sums.sum() / counts.sum())
        weights = self.optimizers["weights"]
        norm = torch.nn.utils.clip_grad_norm_(weights.param_groups[0]["params"], t.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        lr = weights.param_groups[0]["lr"]
        healthy = math.isfinite(loss) and math.isfinite(norm)
        for name, optimizer in self.optimizers.items():
            if healthy:  # a bad step leaves weights, masks and their optimiser states untouched
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.schedulers[name].step()
        if not healthy:
            record["bad"] = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        elif self.pruner is not None:
            self.pruner.after_step()
        if healthy:
            self.mixer.observe_train(domain_loss)
        record.update(step=self.step + 1, tokens=sum(self.domain_tokens), lr=lr, loss=loss,
                      domain_loss=dict(zip(self.names, domain_loss)),
                      domain_tokens=dict(zip(self.names, self.domain_tokens)),
                      proportions=dict(zip(self.names, proportions)))
        return record

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        rngs = None
        if self.pruner is not None:
            parallel.check_replicated(list(self.pruner.parameters()), "pruning masks and multipliers")
            # each rank samples masks with its own generator: keep every rank's state for an exact resume
            rngs = parallel.gather_objects(self.pruner.rng_state())
        state = {"step": self.step, "domain_tokens": self.domain_tokens, "elapsed_s": time.perf_counter() - self.start,
                 "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                 "sampler": self.sampler.state_dict(), "mixer": self.mixer.state_dict(), "pruner_rng": rngs,
                 "health": self.health.state_dict()}

        def write(folder: Path) -> None:
            ckpt.write_state(folder, self.model, self.optimizers, state, self.pruner, self.main)

        # FSDP: every rank writes its shards (DCP) and rank 0 seals the folder; else rank 0 writes it all
        self.checkpointer.save_from_ranks(self.step, write, parallel.is_fsdp(self.model), self.main, dist.barrier)

    def load_checkpoint(self, folder: Path) -> int:
        state = ckpt.read_state(folder)
        saved = state["optimizers"]  # the weights' optimiser is read with the weights, the others below
        ckpt.read_weights(folder, self.model, self.optimizers["weights"], saved.get("weights"), str(self.device))
        if self.pruner is not None:
            ckpt.read_pruner(folder, self.pruner, str(self.device))
            rngs = state["pruner_rng"]
            fresh = self.cfg.train.seed * RANK_SEED_STRIDE + dist.rank() + RESUME_SEED_STRIDE * int(state["step"])
            self.pruner.load_rng_state(rngs if isinstance(rngs, list) else [rngs], dist.rank(), fresh)
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
            if name != "weights":  # the masks' (and the multipliers') optimiser
                self.optimizers[name].load_state_dict(saved[name])
        self.sampler.load_state_dict(state["sampler"])
        self.mixer.load_state_dict(state["mixer"])
        self.health.load_state_dict(state.get("health", self.health.state_dict()))  # older: none kept
        self.domain_tokens, self.elapsed_s = list(state["domain_tokens"]), float(state.get("elapsed_s", 0.0))
        ckpt.set_rng_state(state["rng"])
        return int(state["step"])

    # ---------------------------------------------------------------- the run
    def run(self) -> Path:
        t = self.cfg.train
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            ckpt.check_room(self.run_dir, self.model, self.pruner, self.save_dtype, t.keep_checkpoints)
        resumed = self.checkpointer.load_latest(self.load_checkpoint) if self.cfg.resume else None
        if resumed is None and self.cfg.resume is True:
            raise ConfigError(f"resume=true but {self.checkpointer.root} holds no checkpoint: nothing to resume. "
                              "Check run_dir, or pass resume=auto to start when there is nothing to resume")
        if resumed is not None:
            self.step = resumed[0]
            self.metrics.truncate_after(self.step)
            log.info("resumed from %s", self.checkpointer.path(self.step))
        else:
            if self.main and (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()
            if self.cut is not None:  # one-shot: calibrated and evaluated before the cut
                self.metrics.write("calibration", step=0, protected_hidden=self.cut["protected_hidden"])
                losses, self.eval_se = self.cut["source_eval"]["losses"], self.cut["source_eval"]["se"]
            else:
                with self.masked.unmasked() if self.pruner is not None else contextlib.nullcontext():
                    if self.pruner is not None and self.cfg.pruning.init != "uniform":
                        with autocast(self.device, self.forward_dtype):
                            kept = calibrate(self.pruner, self.model, self.corpus.train,
                                             self.cfg.train.micro_batch_size)
                        self.metrics.write("calibration", step=0, protected_hidden=kept)
                    losses = self.evaluate()  # the source model itself: reference losses and the starting point
            self.log_eval(losses)
            self.mixer.start(losses)
        self.model.train()  # from_pretrained gives eval mode (dropout off); a resumed run has not evaluated yet
        bar = progress(t.steps, self.step, self.main, "prune" if self.pruner is not None else "train")
        self.start = time.perf_counter() - self.elapsed_s
        while self.step < t.steps:
            record = self.train_step()
            self.step += 1
            record["elapsed_s"] = time.perf_counter() - self.start
            self.health.check(self.step, record)
            last = self.step == t.steps
            if self.step % t.log_every == 0 or last:
                self.metrics.write("train", **record)
            postfix = {"loss": f"{record['loss']:.3f}"}
            if self.step % t.eval_every == 0 or last or self.step == getattr(self.pruner, "last_learnt_step", None):
                postfix["worst"] = f"{max(self.evaluate_and_mix(last)):.3f}"
            if "expected_params" in record:
                postfix["params"] = f"{record['expected_params'] / 1e6:.1f}M"
            bar.set_postfix(postfix)
            bar.update(1)
            if self.step % t.checkpoint_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        problem = check_exportable(self.run_dir / "metrics.jsonl", self.model.config.vocab_size) if self.main else ""
        if dist.broadcast_floats([float(bool(problem))])[0] > 0 and not self.cfg.force:
            raise TrainingError(export_refusal(self.run_dir / "model", problem))
        out = self.run_dir / "model"
        # FSDP: gather the full weights (collective) into a plain model on rank 0 for export
        model = parallel.unsharded_model(self.model) if parallel.is_fsdp(self.model) else self.model
        if self.main:
            if self.pruner is not None:
                export_model(model, self.pruner, out, self.tokenizer, dtype=self.save_dtype)
                shape, extra = self.pruner.target, {"tie_groups": tie_groups(self.pruner, exact=True),
                                                    **export_gap_record(self.run_dir / "metrics.jsonl", self.pruner)}
            else:  # continued pretraining, or a one-shot run: the model is already compact
                save_model(model, out, self.tokenizer, self.save_dtype)
                shape, extra = source_shape(self.model.config), {"tie_groups": self.cut["tie_groups"]} if self.cut \
                    else {}
            save_stream(self.sampler, out)
            self.metrics.write("final", step=self.step, model_dir=str(out),
                               shape={key: getattr(shape, key) for key in SHAPE_KEYS}, **extra)
            card.write_model_card(out, self.cfg, self.run_dir)
        dist.barrier()
        return out


def train(cfg: RunConfig) -> Path:
    return dist.run_or_abort(lambda: Trainer(cfg).run())
