"""Mixture sampler: each sequence's domain is drawn from the current proportions.

Every rank draws the same global batch (same seed, same proportions) and keeps its own shard, so ranks never
overlap and a run resumes identically with any world size. Within a domain, sequences are visited in a seeded
permutation without reuse; an exhausted domain starts a new permutation (one warning per domain).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


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
        self._orders = [self._order(d) for d in range(len(sizes))]

    def _order(self, domain: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + domain * 10_007 + self.epoch[domain])
        return torch.randperm(self.sizes[domain], generator=g)

    def _take(self, domain: int) -> int:
        if self.position[domain] == self.sizes[domain]:
            if self.epoch[domain] == 0:
                log.warning("domain %s is exhausted after %d sequences; it now cycles (sequences are reused)",
                            self.names[domain], self.sizes[domain])
            self.epoch[domain] += 1
            self.position[domain] = 0
            self._orders[domain] = self._order(domain)
        index = int(self._orders[domain][self.position[domain]])
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
        self._orders = [self._order(d) for d in range(len(self.sizes))]
