"""Scaling-law fit of one domain's loss curve: L(D, s) = A * D^(-alpha) * s^(-beta) + E.

D is the number of tokens of the domain consumed so far and s the expected sparsity (only while pruning;
beta <= 0, so the loss rises with sparsity). As in Chinchilla's fit (and the DRPruning authors' code), the
residual is taken in log space, log(prediction) - log(loss), under a Huber loss with delta 1e-3, from a grid
of starting points; the best 3 fits are kept and their predictions averaged, which is steadier than the
single best on short, noisy curves. A fit of 64 points takes a few milliseconds, so it runs in process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

HUBER_DELTA = 1e-3
KEEP_BEST = 3
# starting points: log A, alpha, log E and (with sparsity) beta
START_LOG_A = (0.0, 10.0, 20.0)
START_ALPHA = (0.0, 0.5, 1.0)
START_LOG_E = (0.0, 1.0)
START_BETA = (0.0, -0.5)
MIN_SPARSITY = 1e-4  # s^(-beta) with s = 0 has no logarithm; the source model's s is this small


SCREEN_ITERATIONS = 30  # the best starts settle within ~20; scipy finishes them


def _log_sparsity(sparsity: Sequence[float] | np.ndarray | float) -> np.ndarray:
    return np.log(np.clip(np.asarray(sparsity, dtype=np.float64), MIN_SPARSITY, 1.0))


class ScalingLaw:
    """A fitted law: `ScalingLaw.fit(tokens, losses, sparsity=None)`, then `.predict(tokens, sparsity)`."""

    def __init__(self, fits: list[dict[str, float]], uses_sparsity: bool):
        if not fits:
            raise ValueError("a scaling law needs at least one fitted parameter set")
        self.fits = [dict(f) for f in fits]  # best first; predictions average over all of them
        self.uses_sparsity = uses_sparsity

    @property
    def params(self) -> dict[str, float]:
        """The best fit: A, alpha, beta (0 without sparsity), E and its Huber cost."""
        return dict(self.fits[0])

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, tokens: Sequence[float], losses: Sequence[float],
            sparsity: Sequence[float] | None = None) -> ScalingLaw:
        d = np.asarray(tokens, dtype=np.float64)
        y = np.asarray(losses, dtype=np.float64)
        if d.ndim != 1 or d.shape != y.shape:
            raise ValueError(f"tokens ({d.shape}) and losses ({y.shape}) must be 1-d of the same length")
        if not (np.all(np.isfinite(d)) and np.all(d > 0) and np.all(np.isfinite(y)) and np.all(y > 0)):
            raise ValueError("tokens and losses must be finite and positive")
        uses_sparsity = sparsity is not None
        n_free = 4 if uses_sparsity else 3  # x = [log A, alpha, log E, beta]; beta stays 0 without sparsity
        if len(d) <= n_free:
            raise ValueError(f"{len(d)} points are too few to fit {n_free} parameters")
        log_d = np.log(d)
        log_y = np.log(y)
        if uses_sparsity:
            log_s = _log_sparsity(sparsity)
            if log_s.shape != d.shape:
                raise ValueError(f"sparsity has {log_s.shape[0]} values for {d.shape[0]} points")
        else:
            log_s = np.zeros_like(d)

        lower = np.array([-np.inf, 0.0, -np.inf, -np.inf])[:n_free]
        upper = np.array([np.inf, np.inf, np.inf, 0.0])[:n_free]
        betas = START_BETA if uses_sparsity else (0.0,)
        starts = np.array(list(itertools.product(START_LOG_A, START_ALPHA, START_LOG_E, betas)))[:, :n_free]
        # Screening every start with scipy costs ~100 evaluations of ~0.1 ms each; one batched numpy run over
        # all starts finds the basins in a few ms, then scipy polishes the best few to its own tolerance.
        screened, costs = _screen(starts, log_d, log_s, log_y, lower, upper)
        order = np.argsort(costs, kind="stable")[:KEEP_BEST]

        def residual(x: np.ndarray) -> np.ndarray:
            return _residual(x[None], log_d, log_s, log_y)[0][0]

        def jacobian(x: np.ndarray) -> np.ndarray:
            return _jacobian(x[None], _residual(x[None], log_d, log_s, log_y)[1], log_d, log_s)[0]

        results = []
        for i in order:
            x0 = np.clip(screened[i], lower, upper)
            try:
                r = least_squares(residual, x0, jac=jacobian, bounds=(lower, upper), loss="huber",
                                  f_scale=HUBER_DELTA, method="trf")
                cost, x = float(r.cost), r.x
            except (ValueError, np.linalg.LinAlgError):
                cost, x = float(costs[i]), screened[i]  # keep the screened point: it is a valid fit
            if np.all(np.isfinite(x)) and math.isfinite(cost):
                results.append((cost, x))
        if not results:
            raise ValueError("the scaling-law fit failed from every starting point")
        results.sort(key=lambda item: item[0])
        fits = []
        for cost, x in results:
            fits.append({"A": float(np.exp(min(x[0], 700.0))), "log_A": float(x[0]), "alpha": float(x[1]),
                         "beta": float(x[3]) if n_free == 4 else 0.0, "E": float(np.exp(min(x[2], 700.0))),
                         "log_E": float(x[2]), "cost": cost})
        return cls(fits, uses_sparsity)

    # ------------------------------------------------------------------ prediction
    def predict(self, tokens: float | Sequence[float] | np.ndarray,
                sparsity: float | Sequence[float] | np.ndarray | None = None) -> float | np.ndarray:
        """Mean prediction of the kept fits; a float for scalar input, an array otherwise."""
        log_d = np.log(np.asarray(tokens, dtype=np.float64))
        if self.uses_sparsity:
            if sparsity is None:
                raise ValueError("this law was fitted with sparsity: pass the sparsity to predict at")
            log_s = _log_sparsity(sparsity)
        else:
            log_s = np.zeros(())
        total = 0.0
        for f in self.fits:
            u = f["log_A"] - f["alpha"] * log_d - f["beta"] * log_s
            total = total + np.exp(np.logaddexp(u, f["log_E"]))
        out = total / len(self.fits)
        return float(out) if np.ndim(out) == 0 else out

    # ------------------------------------------------------------------ plain-python state
    def to_dict(self) -> dict:
        return {"fits": [dict(f) for f in self.fits], "uses_sparsity": self.uses_sparsity}

    @classmethod
    def from_dict(cls, state: dict) -> ScalingLaw:
        return cls(state["fits"], bool(state["uses_sparsity"]))


def _residual(x: np.ndarray, log_d: np.ndarray, log_s: np.ndarray,
              log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-space residuals [starts, points] and the log of the power-law term."""
    beta = x[:, 3:4] if x.shape[1] == 4 else 0.0
    u = x[:, 0:1] - x[:, 1:2] * log_d - beta * log_s
    return np.logaddexp(u, x[:, 2:3]) - log_y, u


def _jacobian(x: np.ndarray, u: np.ndarray, log_d: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    w = expit(u - x[:, 2:3])  # share of the power-law term in the prediction
    cols = [w, -w * log_d, 1.0 - w, -w * log_s][: x.shape[1]]
    return np.stack(cols, axis=2)


def _huber_cost(r: np.ndarray) -> np.ndarray:
    """scipy's huber cost (0.5 * sum of rho), per start."""
    a = np.abs(r)
    d = HUBER_DELTA
    return 0.5 * np.sum(np.where(a <= d, r * r, 2 * d * a - d * d), axis=1)


def _screen(x: np.ndarray, log_d: np.ndarray, log_s: np.ndarray, log_y: np.ndarray,
            lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt with Huber reweighting on all starts at once (projected onto the bounds); a start
    leaves the batch once it converges or stalls, so the cost follows the slowest few."""
    x = x.astype(np.float64).copy()
    n = x.shape[1]
    r, u = _residual(x, log_d, log_s, log_y)
    cost = _huber_cost(r)
    damping = np.full(len(x), 1e-3)
    live = np.flatnonzero(np.isfinite(cost))
    eye = np.eye(n)
    diag = np.arange(n)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(SCREEN_ITERATIONS):
            if live.size == 0:
                break
            xl, rl, ul, cl = x[live], r[live], u[live], cost[live]
            jac = _jacobian(xl, ul, log_d, log_s)
            weight = np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(rl), 1e-300))  # Huber as reweighting
            jw = jac * weight[:, :, None]
            jwt = jw.transpose(0, 2, 1)
            h = jwt @ jac  # batched J^T W J (matmul: several times faster than einsum here)
            g = (jwt @ rl[:, :, None])[:, :, 0]
            a = h + (damping[live, None] * h[:, diag, diag] + 1e-12)[:, :, None] * eye
            try:
                step = -np.linalg.solve(a, g[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                break
            x_new = np.clip(xl + step, lower, upper)
            r_new, u_new = _residual(x_new, log_d, log_s, log_y)
            cost_new = _huber_cost(r_new)
            better = np.isfinite(cost_new) & (cost_new < cl)
            took = live[better]
            x[took], r[took], u[took] = x_new[better], r_new[better], u_new[better]
            cost[took] = cost_new[better]
            damping[live] = np.clip(np.where(better, damping[live] * 0.3, damping[live] * 10.0), 1e-12, 1e12)
            converged = better & (cl - cost_new <= 1e-9 * cl)
            stuck = damping[live] >= 1e8
            live = live[~(converged | stuck)]
    return x, np.where(np.isfinite(cost), cost, np.inf)
