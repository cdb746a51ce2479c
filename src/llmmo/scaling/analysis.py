"""From a sweep's ledger to answers: the fits (with held-out budgets checked), the compute plan, the figures."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np

from llmmo.errors import ConfigError
from llmmo.fileio import atomic_path, write_text_atomic
from llmmo.scaling.fit import IsoFlopFit, LawFit, fit_isoflops, fit_law


def _columns(rows: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    return tuple(
        np.array([r[k] for r in rows], dtype=np.float64) for k in ("params_nonembedding", "tokens", "val_loss", "flops")
    )


def analyse(rows: list[dict[str, Any]], fit_budgets: list[float] | None = None, bootstrap: int = 100) -> dict[str, Any]:
    """Approach 3 and approach 2 fits on the runs of `fit_budgets` (all budgets if None); every other run is
    predicted by the law and its relative error reported."""
    budgets = sorted({r["budget"] for r in rows})
    chosen = (
        budgets
        if not fit_budgets
        else [b for b in budgets if any(math.isclose(b, f, rel_tol=1e-6) for f in fit_budgets)]
    )
    if fit_budgets and len(chosen) != len(fit_budgets):
        raise ConfigError(f"--fit-budgets {fit_budgets}: the ledger's budgets are {budgets}")
    fitted = [r for r in rows if r["budget"] in chosen]
    held_out = [r for r in rows if r["budget"] not in chosen]
    sizes = len({r["params_nonembedding"] for r in fitted})
    if sizes < 2 or len(chosen) < 2:
        # one size leaves A and alpha free; one budget puts every run on D = C / (6 N), where the N and D terms
        # trade off against each other: either way the law fits anything, and predicts nothing
        more = " (or name more of them in --fit-budgets)" if fit_budgets else ""
        raise ConfigError(
            f"fitting L(N, D) = E + A/N^alpha + B/D^beta needs runs of at least 2 sizes and 2 budgets (and 5 runs "
            f"in all, for its 5 parameters); the runs fitted have {sizes} size(s) and {len(chosen)} budget(s): "
            f"sweep more --sizes and --budgets{more}"
        )
    n, d, loss, flops = _columns(fitted)
    law = fit_law(n, d, loss, bootstrap=bootstrap)
    try:
        iso: IsoFlopFit | None = fit_isoflops(flops, n, loss, chosen)
    except ConfigError:
        iso = None
    predictions = []
    for r in held_out:
        predicted = float(law.loss(r["params_nonembedding"], r["tokens"]))
        predictions.append(
            {
                "run": r["run"],
                "measured": r["val_loss"],
                "predicted": predicted,
                "relative_error": predicted / r["val_loss"] - 1,
            }
        )
    largest = budgets[-1]
    n_opt, d_opt = law.optimal(largest)
    return {
        "law": law.as_dict(),
        "law_samples": law.samples,
        "tokens_per_param_at_largest_budget": d_opt / n_opt,
        "isoflop": iso.__dict__ if iso else None,
        "fit_budgets": chosen,
        "held_out": predictions,
        "max_abs_relative_error": max((abs(p["relative_error"]) for p in predictions), default=None),
        "runs_fitted": len(fitted),
    }


def law_from(analysis: dict[str, Any]) -> LawFit:
    return LawFit(**analysis["law"], samples=analysis["law_samples"])


def plan(
    analysis: dict[str, Any], rows: list[dict[str, Any]], flops: float | None = None, target_loss: float | None = None
) -> dict[str, Any]:
    """The loss-optimal N and D for a compute budget (or the least compute that reaches a target loss), the
    expected loss with its bootstrap interval, and the wall-clock time at this machine's measured tokens/s."""
    law = law_from(analysis)
    if (flops is None) == (target_loss is None):
        raise ConfigError("plan needs exactly one of --flops C or --target-loss L")
    for name, value, example in (("--flops", flops, "1e20"), ("--target-loss", target_loss, "3.0")):
        if value is not None and not (math.isfinite(value) and value > 0):  # the law's powers of it turn complex
            raise ConfigError(f"{name} must be a positive number (e.g. {name} {example}), got {value}")
    if target_loss is not None:
        if target_loss <= law.E:
            raise ConfigError(
                f"target loss {target_loss} is at or below the fitted irreducible loss E = {law.E:.4f}: no budget "
                "reaches it; ask for more than E"
            )
        low, high = 0.0, 40.0  # log10 C, bisected
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if law.loss(*law.optimal(10**mid)) > target_loss else (low, mid)
        flops = 10**high
    n, d = law.optimal(flops)
    # tokens/s against size, a power law fitted on the sweep's own runs
    sizes = np.log([r["params_nonembedding"] for r in rows])
    speeds = np.log([r["tok_per_s"] for r in rows])
    slope, intercept = np.polyfit(sizes, speeds, 1) if len(set(sizes.tolist())) > 1 else (0.0, speeds.mean())
    tok_s = float(np.exp(intercept + slope * math.log(n)))
    low, high = law.loss_interval(n, d)
    return {
        "flops": flops,
        "params_nonembedding": n,
        "tokens": d,
        "tokens_per_param": d / n,
        "loss": float(law.loss(n, d)),
        "loss_interval_90": [low, high],
        "tok_per_s": tok_s,
        "hours": d / tok_s / 3600,
    }


def plot(rows: list[dict[str, Any]], analysis: dict[str, Any], out: str | Path) -> list[Path]:
    """compute.png (loss against compute, the frontier, the law), isoflop.png, predicted.png and a
    self-contained scaling.html holding all three and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    law = law_from(analysis)
    n, d, loss, flops = _columns(rows)
    budget = np.array([r["budget"] for r in rows])
    budgets = sorted(set(budget.tolist()))
    files = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        files.append(out / name)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points = ax.scatter(flops, loss, c=np.log10(n), cmap="viridis", s=25)
    fig.colorbar(points, label="log10 non-embedding parameters")
    best = [loss[budget == c].min() for c in budgets]
    ax.plot(budgets, best, "k-", lw=1, label="frontier (best run per budget)")
    grid = np.geomspace(min(budgets) / 2, max(budgets) * 10, 50)
    ax.plot(grid, [law.loss(*law.optimal(c)) for c in grid], "r--", lw=1, label="fitted law at the optimal N, D")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="validation loss", title="Loss against compute")
    ax.legend(fontsize=8)
    save(fig, "compute.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c in budgets:
        mine = budget == c
        order = np.argsort(n[mine])
        ax.plot(n[mine][order], loss[mine][order], "o-", label=f"C = {c:.1e}")
    iso = analysis.get("isoflop")
    if iso:
        ax.plot(iso["n_opt"], iso["loss_opt"], "k*", ms=10, label="parabola minima")
    ax.set(xscale="log", xlabel="non-embedding parameters", ylabel="validation loss", title="IsoFLOP curves")
    ax.tick_params(axis="x", which="minor", labelbottom=False)
    ax.legend(fontsize=8)
    save(fig, "isoflop.png")

    fig, ax = plt.subplots(figsize=(5, 4.5))
    predicted = law.loss(n, d)
    ax.scatter(loss, predicted, s=20)
    lo, hi = min(loss.min(), predicted.min()), max(loss.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="measured validation loss", ylabel="predicted by the law", title="Predicted against measured")
    save(fig, "predicted.png")

    images = "".join(
        f'<img alt="{f.stem}" src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">' for f in files
    )
    fit = analysis["law"]
    rows_html = "".join(f"<tr><td>{k}</td><td>{v:.4g}</td></tr>" for k, v in fit.items() if isinstance(v, float))
    html = (
        "<!doctype html><meta charset=utf-8><title>llmmo scaling</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:48%;margin:.5em}</style>"
        f"<h1>Scaling law: L(N, D) = E + A/N<sup>&alpha;</sup> + B/D<sup>&beta;</sup></h1>"
        f"<table>{rows_html}</table>"
        f"<p>{len(rows)} runs; compute-optimal tokens per parameter at the largest budget: "
        f"{analysis['tokens_per_param_at_largest_budget']:.1f}</p>{images}"
    )
    write_text_atomic(out / "scaling.html", html)
    return [*files, out / "scaling.html"]
