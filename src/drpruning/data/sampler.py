"""Mixture sampler: each sequence's domain is drawn from the current proportions.

Every rank draws the same global batch (same seed, same proportions) and keeps its own shard, so ranks never
overlap and a run resumes identically with any world size. Within a domain, sequences are visited in a seeded
permutation without reuse; an exhausted domain starts a new permutation (one warning per domain).

The permutation is a keyed bijection (`shuffled_index`), computed per draw: nothing of size n is stored, so
memory and the resume state stay small for billions of sequences.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
MASK64 = (1 << 64) - 1
ROUNDS = 4  # a 4-round Feistel network with pseudo-random round functions is a pseudo-random permutation


def _mix(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def permutation_keys(*parts: int) -> list[int]:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(ROUNDS)]


def shuffled_index(i: int, n: int, keys: list[int]) -> int:
    """The i-th element of a keyed permutation of range(n): a Feistel network over the smallest even number
    of bits covering n, cycle-walked back into range (fewer than 4 rounds on average)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


class MixtureSampler:
    def __init__(self, sizes: list[int], seed: int = 0, names: list[str] | None = None):
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every domain needs at least one sequence, got sizes {sizes}")
        self.sizes = list(sizes)
        self.names = names or [str(i) for i in range(len(sizes))]
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.position = [0] * len(sizes)
        self.epoch = [0] * len(sizes)
        self._keys = [self._order(d) for d in range(len(sizes))]

    def _order(self, domain: int) -> list[int]:
        return permutation_keys(self.seed, domain, self.epoch[domain])

    def _take(self, domain: int) -> int:
        if self.position[domain] == self.sizes[domain]:
            if self.epoch[domain] == 0:
                log.warning("domain %s is exhausted after %d sequences; it now cycles (sequences are reused)",
                            self.names[domain], self.sizes[domain])
            self.epoch[domain] += 1
            self.position[domain] = 0
            self._keys[domain] = self._order(domain)
        index = shuffled_index(self.position[domain], self.sizes[domain], self._keys[domain])
        self.position[domain] += 1
        return index

    def next_batch(self, proportions: list[float], batch_size: int) -> list[tuple[int, int]]:
        """The global batch as (domain, sequence index) pairs; shard it with `batch[rank::world]`."""
        probs = torch.tensor(proportions, dtype=torch.float64)
        domains = torch.multinomial(probs, batch_size, replacement=True, generator=self.generator)
        return [(int(d), self._take(int(d))) for d in domains]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "position": list(self.position),
                "epoch": list(self.epoch), "seed": self.seed, "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"sampler state is for domain sizes {state['sizes']}, the data has {self.sizes}: "
                             "the data changed since the checkpoint; resume with the same data")
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.position = list(state["position"])
        self.epoch = list(state["epoch"])
        self._keys = [self._order(d) for d in range(len(self.sizes))]

    def continue_from(self, state: dict) -> list[str]:
        """Start each domain where another run's sampler (`state_dict`) left it, if that run had this seed and
        the domain has the same size: its permutations are then this run's, so this run reads on to windows the
        other did not. The domains' draws start afresh. Returns the domains continued."""
        if state.get("seed") != self.seed:
            return []
        done = []
        for d, name in enumerate(self.names):
            if name in state.get("names", []):
                i = state["names"].index(name)
                if state["sizes"][i] == self.sizes[d]:
                    self.position[d], self.epoch[d] = int(state["position"][i]), int(state["epoch"][i])
                    self._keys[d] = self._order(d)
                    done.append(name)
        return done


STREAM_FILE = "drpruning_data_stream.json"  # beside an exported model: where its run's data stream stopped


def save_stream(sampler: MixtureSampler, model_dir: str | Path) -> None:
    """Record where the sampler stopped in the exported model's folder (atomically), so that a run continuing
    from that model (continued pretraining after pruning) reads on instead of replaying the same windows."""
    state = {k: v for k, v in sampler.state_dict().items() if k != "generator"}
    path = Path(model_dir) / STREAM_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**state, "names": sampler.names}) + "\n")
    os.replace(tmp, path)


def continue_stream(sampler: MixtureSampler, model_dir: str | Path) -> None:
    """Continue the data stream of the run that exported `model_dir`, where it recorded one (`save_stream`)."""
    path = Path(model_dir) / STREAM_FILE
    if not path.is_file():
        return
    done = sampler.continue_from(json.loads(path.read_text()))
    skipped = [n for n in sampler.names if n not in done]
    log.info("data: continuing the stream of the run that exported %s for %s%s", model_dir, done or "no domain",
             f"; starting afresh for {skipped} (another seed or other data)" if skipped else "")
