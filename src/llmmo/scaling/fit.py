"""Fitting scaling laws to a ledger of training runs (Hoffmann et al. 2022, "Chinchilla").

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as the paper does: in log space,
log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimising the Huber loss
(delta 1e-3) of the residuals of log L, with L-BFGS from many starting points, keeping the best. The starts
come from a grid over (alpha, beta), where (E, A, B) follow by least squares (`grid_starts`).
Confidence intervals: the same fit on bootstrap resamples of the runs (percentiles).

Approach 2: for each compute budget, a parabola of loss against log N (an IsoFLOP curve); its minimum is the
loss-optimal N for that C, and power laws N_opt = k C^a, D_opt = C / (6 N_opt) follow by least squares in
log-log space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from llmmo.errors import ConfigError

HUBER_DELTA = 1e-3


@dataclass
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals and the fit's error."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    rmse_log: float  # root mean square residual of log L over the runs fitted
    intervals: dict[str, tuple[float, float]]  # 5th-95th percentile of each parameter over bootstrap fits
    samples: list[dict[str, float]]  # the bootstrap fits (for prediction intervals)

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def loss_interval(self, n: float, d: float) -> tuple[float, float]:
        """5th-95th percentile of the predicted loss over the bootstrap fits."""
        with np.errstate(over="ignore"):  # a bootstrap fit's huge exponent sends its term to 0, not an error
            n, d = np.float64(n), np.float64(d)
            values = [s["E"] + s["A"] / n ** s["alpha"] + s["B"] / d ** s["beta"] for s in self.samples]
        return (float(np.percentile(values, 5)), float(np.percentile(values, 95))) if values else (math.nan,) * 2

    def optimal(self, flops: float) -> tuple[float, float]:
        """Loss-optimal (N, D) for C = 6 N D under this law (Hoffmann et al. eq. 4):
        N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D_opt = C / (6 N_opt)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (6 * n)

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["samples"]
        return out


def _minimise(
    start: tuple, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """L-BFGS from one start on the Huber loss of log L's residuals; (objective, (a, b, e, alpha, beta))."""
    params = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        a, b, e, alpha, beta = params
        pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(log_n)]), 0)
        loss = torch.nn.functional.huber_loss(pred, log_l, delta=HUBER_DELTA, reduction="sum") / HUBER_DELTA
        loss.backward()
        return loss

    return float(opt.step(objective).detach()), params.detach().clone()


def _fit_once(log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor, starts: list[tuple]) -> tuple:
    """Best (a, b, e, alpha, beta) and its objective over the starting points."""
    best = (math.inf, None)
    for start in starts:
        try:
            value, params = _minimise(start, log_n, log_d, log_l)
        except RuntimeError:  # a start that leaves the finite range
            continue
        if math.isfinite(value) and value < best[0]:
            best = (value, params)
    if best[1] is None:
        raise ConfigError("the scaling-law fit did not converge from any starting point; check the ledger's losses")
    return best[1], best[0]


def grid_starts(n: np.ndarray, d: np.ndarray, loss: np.ndarray, keep: int = 8) -> list[tuple]:
    """Starting points for the fit: for each (alpha, beta) on a grid, L = E + A x + B y is linear in (E, A, B)
    (x = N^-alpha, y = D^-beta), so least squares gives them at once; the `keep` best grid points with
    positive E, A, B become starts in (a, b, e, alpha, beta) form."""
    grid = np.arange(0.02, 1.5, 0.02)
    alphas, betas = np.meshgrid(grid, grid, indexing="ij")
    alphas, betas = alphas.ravel(), betas.ravel()
    x = np.power(n[None, :], -alphas[:, None])  # (G, runs)
    y = np.power(d[None, :], -betas[:, None])
    scale = np.stack([np.ones(len(x)), x.max(1), y.max(1)], axis=-1)  # columns scaled to 1 for conditioning
    design = np.stack([np.ones_like(x), x, y], axis=-1) / scale[:, None, :]  # (G, runs, 3)
    gram = np.einsum("gri,grj->gij", design, design) + 1e-12 * np.eye(3)
    scaled = np.linalg.solve(gram, np.einsum("gri,r->gi", design, loss)[..., None])[..., 0]
    coef = scaled / scale  # (G, 3): E, A, B
    design = design * scale[:, None, :]
    err = ((np.einsum("gri,gi->gr", design, coef) - loss) ** 2).sum(-1)
    err[(coef <= 0).any(-1)] = np.inf
    starts = []
    for g in np.argsort(err)[:keep]:
        if np.isfinite(err[g]):
            e, a, b = np.log(coef[g])
            starts.append((a, b, e, alphas[g], betas[g]))
    return starts + [(5.0, 5.0, 0.0, 0.3, 0.3), (10.0, 10.0, 0.5, 0.5, 0.5)]


def fit_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, bootstrap: int = 100, seed: int = 0) -> LawFit:
    """Approach 3 on runs (N, D, final loss); `bootstrap` refits on resampled runs for the intervals."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    points = len(set(zip(n.tolist(), d.tolist(), strict=True)))  # a run repeated adds no equation
    if points < 5:
        raise ConfigError(
            f"fitting 5 parameters needs at least 5 runs of distinct sizes or token counts; the ledger has {points} "
            f"({len(n)} runs): sweep more --sizes or --budgets"
        )
    log = [torch.from_numpy(np.log(v)) for v in (n, d, loss)]
    params, _ = _fit_once(*log, grid_starts(n, d, loss))
    a, b, e, alpha, beta = params.tolist()
    residual = torch.logsumexp(torch.stack([a - alpha * log[0], b - beta * log[1], torch.full_like(log[0], e)]), 0)
    rmse = float(((residual - log[2]) ** 2).mean().sqrt())
    rng = np.random.default_rng(seed)
    samples = []
    near = [tuple(params.tolist())]  # bootstrap fits start from the full fit: the optimum moves little
    for _ in range(bootstrap):
        pick = rng.integers(0, len(n), len(n))
        if len(set(pick.tolist())) < 5:
            continue
        p, _ = _fit_once(*(t[torch.from_numpy(pick)] for t in log), near)
        sa, sb, se, salpha, sbeta = p.tolist()
        samples.append({"E": math.exp(se), "A": math.exp(sa), "B": math.exp(sb), "alpha": salpha, "beta": sbeta})
    intervals = (
        {
            k: (float(np.percentile([s[k] for s in samples], 5)), float(np.percentile([s[k] for s in samples], 95)))
            for k in ("E", "A", "B", "alpha", "beta")
        }
        if samples
        else {}
    )
    return LawFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, rmse, intervals, samples)


@dataclass
class IsoFlopFit:
    """Approach 2: the loss-optimal N of each budget, and N_opt = k_n C^a_n, D_opt = k_d C^a_d."""

    budgets: list[float]
    n_opt: list[float]
    d_opt: list[float]
    loss_opt: list[float]
    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float


def fit_isoflops(flops: np.ndarray, n: np.ndarray, loss: np.ndarray, budgets: list[float]) -> IsoFlopFit:
    """Per budget (runs whose C is within 10% of it), a parabola in log N; then power laws over budgets."""
    flops, n, loss = (np.asarray(v, dtype=np.float64) for v in (flops, n, loss))
    n_opt, loss_opt, used = [], [], []
    for c in budgets:
        mine = np.abs(flops / c - 1) < 0.1
        if len(np.unique(n[mine])) < 3:
            continue  # a parabola needs three sizes (three runs of two would be fitted poorly, with a RankWarning)
        x = np.log(n[mine])
        k2, k1, k0 = np.polyfit(x, loss[mine], 2)
        if k2 <= 0:  # no minimum: the budget's sizes do not bracket the optimum
            continue
        best = np.clip(-k1 / (2 * k2), x.min() - 1, x.max() + 1)
        n_opt.append(float(np.exp(best)))
        loss_opt.append(float(k2 * best**2 + k1 * best + k0))
        used.append(c)
    if len(used) < 2:
        raise ConfigError(
            "IsoFLOP fits need at least two budgets with three or more sizes each whose losses curve upwards; "
            "add sizes on both sides of the best one"
        )
    d_opt = [c / (6 * m) for c, m in zip(used, n_opt, strict=True)]
    an, kn = np.polyfit(np.log(used), np.log(n_opt), 1)
    ad, kd = np.polyfit(np.log(used), np.log(d_opt), 1)
    return IsoFlopFit(used, n_opt, d_opt, loss_opt, float(an), float(np.exp(kn)), float(ad), float(np.exp(kd)))
