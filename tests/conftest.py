"""Shared fixtures: the real default model and the ../shared data folder. Helpers (tiny random models, run
overrides) live in tests/helpers, put on sys.path here.

Tiers: unit/ mirrors the package; integration/ runs the trainer (SIGKILL resume, torchrun, export of a run);
golden/ replays the stored loss curve; slow/ runs the real SmolLM2-135M on ../shared (marker `slow`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

from drpruning.models import ModelSourceError, cache_root, fetch_model  # noqa: E402
from drpruning.paths import shared_dir as find_shared  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted default model (smollm2-135m): the cached folder, else fetched now (~90 MB, ~20 s)."""
    cached = cache_root() / "models" / "smollm2-135m"
    if (cached / "config.json").is_file():
        return cached
    try:
        return fetch_model("smollm2-135m")
    except ModelSourceError as e:
        pytest.skip(f"default model not cached and cannot be fetched (offline?): {e}")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared()
    if not path.is_dir():
        pytest.skip("../shared not present (real data for tests; see README)")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread, the machine's cores are shared, and in-process reference runs
    then use the same kernels as each torchrun worker (OMP_NUM_THREADS=1). Subprocesses are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
