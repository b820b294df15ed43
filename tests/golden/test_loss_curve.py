"""Replays the stored golden loss curve (see loss_curve.py): a change that shifts the numbers on every path at
once (sampler seeds, float32 policy, reduction order, mask maths) fails here even when every
self-consistency test passes."""

import json
import math

import pytest
from loss_curve import ASSET, run

REL = 1e-6  # losses: torch on one thread agrees to 2e-7 between an AVX2 and an AVX512 CPU
# the mixer's outputs come out of scipy's least-squares fit of the scaling law, whose iterations follow the
# CPU's SIMD path: 1.4e-4 apart between those two CPUs; a change of the mixing maths moves them by far more
REL_MIX = 1e-3
MIXER_FIELDS = ("proportions", "mix_weights")


def _close(a, b, where: str, rel: float = REL) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}", REL_MIX if k in MIXER_FIELDS else rel)
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} values, stored {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]", rel)
    elif a is None or b is None:
        assert a is None and b is None, f"{where}: {a} vs stored {b}"
    else:
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), f"{where}: {a!r} vs stored {b!r}"


@pytest.mark.golden
def test_golden_loss_curve(tmp_path):
    stored = json.loads(ASSET.read_text())
    got = run(tmp_path)
    assert len(got["prune"]["train_loss"]) == 20 and len(got["cpt"]["train_loss"]) == 10
    _close(got, stored, "curve")
