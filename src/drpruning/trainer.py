"""The training loop, in plain PyTorch: continued pretraining, or pruning when `pruning.enabled`.

Read top to bottom: set-up (validate, load, build), then `run()`: evaluate the source model, then steps of
sample -> forward/backward with per-domain loss accounting -> optimiser step, with an evaluation and a mixing
update every `eval_every` steps and an atomic checkpoint every `checkpoint_every` steps.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model

from drpruning import distributed as dist
from drpruning import parallel
from drpruning.checkpoint import Checkpointer, check_disk_space
from drpruning.config import ConfigError, RunConfig, save_config
from drpruning.cpu_memory import keep_freed_memory
from drpruning.data import check_sources, load_corpus
from drpruning.metrics import MetricsLog, progress

log = logging.getLogger(__name__)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16  # about twice as fast as float32 on recent x86 CPUs


def token_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every predicted token, [batch, seq_len - 1], in float32."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def initial_proportions(cfg: RunConfig, train_tokens: list[int]) -> list[float]:
    if cfg.data.proportions is not None:
        return [float(x) for x in cfg.data.proportions]
    if cfg.data.temperature is not None:
        from drpruning.mixing import temperature_proportions

        return temperature_proportions(train_tokens, cfg.data.temperature)
    return [1.0 / len(train_tokens)] * len(train_tokens)


class Trainer:
    def __init__(self, cfg: RunConfig):
        from drpruning.models import load_model, load_model_config, model_max_length

        self.cfg = cfg
        self.device = dist.init()
        if self.device.type == "cpu":
            keep_freed_memory()
        self.main = dist.is_main()
        self.run_dir = Path(cfg.run_dir)
        t = cfg.train
        # Cheap checks first: model config, target shape, data folders. Weights and tokens come after.
        model_config, _, _ = load_model_config(cfg.model.source)
        if cfg.data.seq_len > model_max_length(model_config):
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is beyond the model's context of "
                              f"{model_max_length(model_config)} tokens; lower data.seq_len")
        if cfg.pruning.enabled:
            from drpruning.target import resolve_target

            self.target = resolve_target(model_config, cfg.pruning)
        per_step = t.micro_batch_size * dist.world()
        if t.batch_size % per_step:
            raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size x ranks "
                              f"= {per_step}; change train.batch_size or train.micro_batch_size")
        if not cfg.resume and Checkpointer(self.run_dir).steps():
            raise ConfigError(f"run_dir {self.run_dir} already holds checkpoints: pass resume=true to continue "
                              "that run, or choose a new run_dir")
        sources = check_sources(cfg.data.domains)

        self.seed_everything(t.seed)
        # weights are trained in model.dtype (auto: float32 master weights) and saved in the source's dtype
        self.model, self.tokenizer = load_model(cfg.model.source, dtype=cfg.model.dtype)
        self.save_dtype = _as_torch_dtype(getattr(model_config, "dtype", None))
        self.model.to(self.device)
        self.model.config.use_cache = False
        self.corpus = load_corpus(cfg.data, self.tokenizer, sources)
        self.names = self.corpus.names
        self.initial = initial_proportions(cfg, self.corpus.train_tokens)
        if len(self.initial) != len(self.names):
            raise ConfigError(f"data.proportions has {len(self.initial)} values but the data has "
                              f"{len(self.names)} domains ({', '.join(self.names)})")
        self.amp_dtype = autocast_dtype(t.dtype, self.device)

        self.pruner = None
        if cfg.pruning.enabled:
            from drpruning.masks import Pruner

            self.pruner = Pruner(self.model, cfg.pruning, t.steps).to(self.device)
            self.pruner.seed(t.seed * 1000 + dist.rank())
            self.pruner.attach()

        from drpruning.mixing import build_mixer
        from drpruning.sampler import MixtureSampler

        final_sparsity = self.pruner.final_sparsity() if self.pruner is not None else None
        self.mixer = build_mixer(cfg.mixing, self.names, self.initial, t.steps, cfg.pruning.enabled, final_sparsity)
        self.sampler = MixtureSampler([len(x) for x in self.corpus.train], seed=t.seed, names=self.names)
        self.train_model = self.model
        if dist.world() > 1:
            from drpruning.parallel import wrap_model

            self.train_model = wrap_model(self.model, cfg.parallel, self.device)
        self.optimizers = self.build_optimizers()
        warmup = round(t.warmup_fraction * t.steps)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_factor(s, t.steps, warmup, t.min_lr_ratio)) for o in self.optimizers]
        self.step = 0
        self.domain_tokens = [0] * len(self.names)
        self.checkpointer = Checkpointer(self.run_dir, t.keep_checkpoints)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.main)

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """AdamW for the weights; when pruning, a second AdamW for masks (descending) and multipliers
        (ascending). Separate optimisers keep the weights' state shardable (FSDP) apart from the small,
        replicated pruning state."""
        t, p = self.cfg.train, self.cfg.pruning
        betas = tuple(t.betas)
        weights = [q for q in self.train_model.parameters() if q.requires_grad]
        optimizers = [torch.optim.AdamW(weights, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay)]
        if self.pruner is not None:
            groups = [{"params": list(self.pruner.mask_parameters()), "lr": p.mask_lr},
                      {"params": list(self.pruner.lagrangian_parameters()), "lr": p.lagrangian_lr, "maximize": True}]
            optimizers.append(torch.optim.AdamW(groups, betas=betas, eps=t.eps, weight_decay=0.0))
        return optimizers

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, exact: bool = False) -> list[float]:
        """Per-domain held-out loss (token-weighted), with deterministic masks when pruning."""
        self.model.eval()
        if self.pruner is not None:
            self.pruner.eval(exact=exact)
        # on the device: NCCL reduces device tensors only, and no host sync per batch
        sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        counts = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        bs = self.cfg.train.eval_batch_size
        # FSDP forwards are collective (weights are all-gathered): every rank runs as many batches as the
        # busiest one; a rank out of sequences runs a throw-away one
        collective = parallel.is_fsdp(self.model)
        for d, seqs in enumerate(self.corpus.eval):
            mine = seqs[dist.rank()::dist.world()]
            n = math.ceil(len(seqs) / dist.world()) if collective else len(mine)
            for i in range(0, n, bs):
                ids = mine[i:i + bs].to(self.device)
                dummy = len(ids) == 0
                if dummy:
                    ids = seqs[:1].to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    tl = token_losses(self.model, ids)
                if not dummy:
                    sums[d] += tl.double().sum()
                    counts[d] += tl.numel()
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(counts)
        self.model.train()
        if self.pruner is not None:
            self.pruner.train()
        return (sums / counts).tolist()

    def log_eval(self, losses: list[float]) -> None:
        worst = int(np.argmax(losses))
        self.metrics.write("eval", step=self.step, tokens=sum(self.domain_tokens),
                           eval_loss=dict(zip(self.names, losses)),
                           eval_ppl={n: math.exp(x) for n, x in zip(self.names, losses)},
                           mean_loss=float(np.mean(losses)), worst_loss=losses[worst],
                           worst_domain=self.names[worst])

    def evaluate_and_mix(self, last: bool) -> list[float]:
        losses = self.evaluate(exact=last)
        self.log_eval(losses)
        if self.main:
            sparsity = self.pruner.expected_sparsity() if self.pruner is not None else None
            record = self.mixer.update(self.step, losses, list(self.domain_tokens), sparsity)
            self.metrics.write("mix", step=self.step, **record)
        proportions = dist.broadcast_floats(self.mixer.proportions)
        if not self.main:
            self.mixer.proportions = proportions
        return losses

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        t = self.cfg.train
        k, seq_len = len(self.names), self.cfg.data.seq_len
        proportions = list(self.mixer.proportions)
        batch = self.sampler.next_batch(proportions, t.batch_size)
        for d, _ in batch:
            self.domain_tokens[d] += seq_len
        local = batch[dist.rank()::dist.world()]
        n_global = t.batch_size * (seq_len - 1)
        sums = torch.zeros(k, dtype=torch.float64, device=self.device)  # device: see evaluate()
        counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        micro = [local[i:i + t.micro_batch_size] for i in range(0, len(local), t.micro_batch_size)]
        for j, chunk in enumerate(micro):
            ids = torch.stack([self.corpus.train[d][i] for d, i in chunk]).to(self.device)
            domains = torch.tensor([d for d, _ in chunk], device=self.device)
            sync = j == len(micro) - 1
            with _maybe_no_sync(self.train_model, sync):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    tl = token_losses(self.train_model, ids)
                seq_sums = tl.sum(dim=1)
                # DDP averages gradients over ranks, so each rank's share is scaled by the world size
                (seq_sums.sum() / n_global * dist.world()).backward()
            sums.index_add_(0, domains, seq_sums.detach().double())
            counts.index_add_(0, domains, torch.full((len(chunk),), float(seq_len - 1), dtype=torch.float64,
                                                     device=self.device))
        record: dict = {}
        if self.pruner is not None:
            if dist.world() > 1:  # masks live outside DDP: average their gradients by hand
                for q in self.pruner.mask_parameters():
                    if q.grad is not None:
                        dist.all_reduce_sum(q.grad).div_(dist.world())
            penalty, prune_log = self.pruner.penalty(self.step)
            penalty.backward()
            record.update(lagrangian=float(penalty.detach()), **prune_log)
        torch.nn.utils.clip_grad_norm_(self.optimizers[0].param_groups[0]["params"], t.grad_clip)
        lr = self.optimizers[0].param_groups[0]["lr"]
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if self.pruner is not None:
            self.pruner.clamp_()
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(counts)
        domain_loss = (sums / counts).tolist()  # nan for a domain absent from the batch
        loss = float(sums.sum() / counts.sum())
        self.mixer.observe_train(domain_loss)
        if self.pruner is not None:
            record["lm_loss"] = loss
        record.update(step=self.step + 1, tokens=sum(self.domain_tokens), lr=lr, loss=loss,
                      domain_loss=dict(zip(self.names, domain_loss)),
                      domain_tokens=dict(zip(self.names, self.domain_tokens)),
                      proportions=dict(zip(self.names, proportions)))
        return record

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        if self.pruner is not None:
            parallel.check_replicated(list(self.pruner.parameters()), "pruning masks and multipliers")
            # each rank samples masks with its own generator: keep every rank's state for an exact resume
            self._pruner_rngs = parallel.gather_objects(self.pruner.generator.get_state())
        if parallel.is_fsdp(self.model):  # every rank writes its shards (DCP); rank 0 seals the folder
            self.checkpointer.save_collective(self.step, self._write, self.main, dist.barrier)
            return
        if self.main:
            self.checkpointer.save(self.step, self._write)
        dist.barrier()

    def check_disk_space(self) -> None:
        """Fail at the start, not at the first checkpoint hours later, when the disk cannot hold one."""
        weights = sum(q.numel() * q.element_size() for q in self.model.parameters())
        adam = 2 * sum(q.numel() * q.element_size() for q in self.model.parameters() if q.requires_grad)
        pruner = sum(q.numel() * 4 * 3 for q in self.pruner.parameters()) if self.pruner is not None else 0
        export = sum(q.numel() for q in self.model.parameters()) * (
            torch.finfo(self.save_dtype).bits // 8 if self.save_dtype is not None else 4)
        check_disk_space(self.run_dir, weights + adam + pruner, self.cfg.train.keep_checkpoints, export)

    def _write(self, folder: Path) -> None:
        sharded = parallel.is_fsdp(self.model)
        if sharded:  # collective: weights and their optimiser state, one file per rank
            parallel.save_sharded(self.model, self.optimizers[0], folder)
            if not self.main:
                return
        else:
            save_model(self.model, str(folder / "model.safetensors"))
        if self.pruner is not None:
            save_file({k: v.contiguous() for k, v in self.pruner.state_dict().items()},
                      str(folder / "pruner.safetensors"))
        state = {"step": self.step, "domain_tokens": self.domain_tokens,
                 "optimizers": [None if sharded and i == 0 else o.state_dict() for i, o in enumerate(self.optimizers)],
                 "schedulers": [s.state_dict() for s in self.schedulers],
                 "sampler": self.sampler.state_dict(), "mixer": self.mixer.state_dict(),
                 "proportions": list(self.mixer.proportions),
                 "rng": rng_state(),
                 "pruner_rng": self._pruner_rngs if self.pruner is not None else None}
        tmp = folder / "state.pt"
        torch.save(state, tmp)

    def _read(self, folder: Path) -> int:
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
        saved_optimizers = list(state["optimizers"])
        if parallel.is_dcp_checkpoint(folder):  # written under FSDP: DCP reshards to this world size / layout
            parallel.load_sharded(self.model, self.optimizers[0], folder)
            saved_optimizers[0] = None
        elif parallel.is_fsdp(self.model):  # a one-process / DDP checkpoint resumed under FSDP
            parallel.load_full_into_sharded(self.model, self.optimizers[0],
                                            load_file(str(folder / "model.safetensors")), saved_optimizers[0])
            saved_optimizers[0] = None
        else:
            missing, unexpected = load_model(self.model, str(folder / "model.safetensors"), device=str(self.device))
            if missing or unexpected:
                raise ValueError(f"model weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if self.pruner is not None:
            self.pruner.load_state_dict(load_file(str(folder / "pruner.safetensors"), device=str(self.device)))
            rngs = state["pruner_rng"]
            rngs = rngs if isinstance(rngs, list) else [rngs]  # one process: a single state
            if dist.rank() < len(rngs):
                self.pruner.generator.set_state(rngs[dist.rank()])
            else:  # more ranks than when saved: a fresh stream, distinct per rank and per resume step
                self.pruner.generator.manual_seed(self.cfg.train.seed * 1000 + dist.rank() + 7919 * int(state["step"]))
        for optimizer, saved in zip(self.optimizers, saved_optimizers):
            if saved is not None:
                optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.sampler.load_state_dict(state["sampler"])
        self.mixer.load_state_dict(state["mixer"])
        self.mixer.proportions = list(state["proportions"])
        self.domain_tokens = list(state["domain_tokens"])
        set_rng_state(state["rng"])
        return int(state["step"])

    # ---------------------------------------------------------------- the run
    def run(self) -> Path:
        t = self.cfg.train
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            self.check_disk_space()
        resumed = self.checkpointer.load_latest(self._read) if self.cfg.resume else None
        if resumed is not None:
            self.step = resumed[0]
            self.metrics.truncate_after(self.step)
            log.info("resumed from %s", self.checkpointer.path(self.step))
        else:
            if self.main and (self.run_dir / "metrics.jsonl").exists():
                (self.run_dir / "metrics.jsonl").unlink()
            losses = self.evaluate()  # the source model: reference losses and the starting point
            self.log_eval(losses)
            self.mixer.start(losses)
        bar = progress(t.steps, self.step, self.main, "prune" if self.pruner is not None else "train")
        start = time.perf_counter()
        while self.step < t.steps:
            record = self.train_step()
            self.step += 1
            record["elapsed_s"] = time.perf_counter() - start
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.metrics.write("train", **record)
            postfix = {"loss": f"{record['loss']:.3f}"}
            last = self.step == t.steps
            if self.step % t.eval_every == 0 or last:
                losses = self.evaluate_and_mix(last)
                postfix["worst"] = f"{max(losses):.3f}"
            if self.pruner is not None:
                postfix["params"] = f"{record['expected_params'] / 1e6:.1f}M"
            bar.set_postfix(postfix)
            bar.update(1)
            if self.step % t.checkpoint_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        out = self.run_dir / "model"
        # FSDP: gather the full weights (collective) into a plain model on rank 0 for export
        model = parallel.unsharded_model(self.model) if parallel.is_fsdp(self.model) else self.model
        if self.main:
            if self.pruner is not None:
                from drpruning.export import export_model

                export_model(model, self.pruner, out, self.tokenizer, dtype=self.save_dtype)
            else:
                model.to(self.save_dtype or next(model.parameters()).dtype).save_pretrained(out)
                self.tokenizer.save_pretrained(out)
            config = self.model.config if self.pruner is None else _read_json(out / "config.json")
            shape = {key: (config[key] if isinstance(config, dict) else getattr(config, key)) for key in
                     ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size")}
            self.metrics.write("final", step=self.step, model_dir=str(out), shape=shape)
        dist.barrier()
        return out


def rng_state() -> dict:
    """Global RNG states as plain types and tensors (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _as_torch_dtype(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, value, None) if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


class _maybe_no_sync:
    """DDP's no_sync for all but the last micro-batch; a no-op for a plain module."""

    def __init__(self, model: torch.nn.Module, sync: bool):
        self.ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def train(cfg: RunConfig) -> Path:
    return dist.run_or_abort(lambda: Trainer(cfg).run())
