"""Shared fixtures: the real default model and the ../shared data folder (tiny models: tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drpruning.models import ModelSourceError, cache_root, fetch_model


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
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip("../shared not present (real data for tests; see README)")
    return path
