"""Scaling lab: the fits recover known laws from noisy ledgers, and a tiny real sweep goes through sweep ->
fit -> plot -> plan, resuming without repeating a run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from llmmo import cli
from llmmo.scaling.fit import fit_isoflops, fit_law

# Hoffmann et al. 2022's fitted law (approach 3)
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def law(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return E + A / n**ALPHA + B / d**BETA


def test_the_fit_recovers_a_known_law_from_noisy_runs() -> None:
    rng = np.random.default_rng(0)
    n = np.exp(rng.uniform(np.log(1e6), np.log(1e9), 40))
    d = np.exp(rng.uniform(np.log(1e8), np.log(1e11), 40))
    loss = law(n, d) * np.exp(rng.normal(0, 0.005, 40))  # 0.5% noise
    fit = fit_law(n, d, loss, bootstrap=20)
    assert abs(fit.alpha - ALPHA) < 0.03 and abs(fit.beta - BETA) < 0.03
    assert abs(fit.E / E - 1) < 0.02
    assert fit.intervals["alpha"][0] <= fit.alpha <= fit.intervals["alpha"][1]
    assert fit.rmse_log < 0.01
    n_opt, d_opt = fit.optimal(1e21)  # Chinchilla's compute-optimal allocation at 1e21 FLOPs
    true_g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    assert n_opt == pytest.approx(true_g * (1e21 / 6) ** (BETA / (ALPHA + BETA)), rel=0.5)
    assert d_opt == pytest.approx(1e21 / (6 * n_opt))


def test_isoflop_parabolas_find_the_optimal_sizes() -> None:
    budgets = [1e17, 1e18, 1e19, 1e20]
    runs = [(c, n) for c in budgets for n in np.geomspace(1e6, 1e10, 25) if 1e7 < c / (6 * n) < 1e13]
    flops, n = np.array([c for c, _ in runs]), np.array([m for _, m in runs])
    iso = fit_isoflops(flops, n, law(n, flops / (6 * n)), budgets)
    # the law's own optimum scales as C^(beta / (alpha + beta)) = C^0.452
    assert iso.n_exponent == pytest.approx(BETA / (ALPHA + BETA), abs=0.03)
    assert iso.d_exponent == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.03)


def tiny_sweep(out: Path, budgets: str, sizes: str, lr: str) -> list[str]:
    """`llmmo scale sweep` arguments for seconds-sized runs on tinyshakespeare."""
    return [
        "scale", "sweep", "--budgets", budgets, "--sizes", sizes, "--min-steps", "5", "--out", str(out),
        "--model.aspect", "16", "--data.block_size", "32", "--train.batch_size", "4", "--train.eval_batches", "2",
        "--train.device", "cpu", "--train.lr", lr,
    ]  # fmt: skip


def test_a_tiny_sweep_fits_plots_and_plans(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    sweep = tiny_sweep(out, "5e8,1e9,2e9", "1,2", lr="3e-3")
    assert cli.main(sweep) == 0
    rows = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["depth"] for r in rows} == {1, 2}
    for r in rows:
        assert r["flops"] == pytest.approx(r["budget"], rel=0.05)  # tokens set by the budget
        assert r["params_nonembedding"] < r["params"] and r["val_loss"] < 4.2  # it learned something
    assert (out / "ledger.csv").read_text().count("\n") == 7
    assert rows[0]["lr"] == pytest.approx(2 * rows[1]["lr"])  # width 16 against 32: lr scales with 1 / width
    mtime = (out / "ledger.jsonl").stat().st_mtime_ns
    assert cli.main(sweep) == 0  # resumes: nothing left to run
    assert (out / "ledger.jsonl").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert cli.main(["scale", "fit", str(out), "--bootstrap", "5"]) == 0
    fit = json.loads(capsys.readouterr().out)
    assert {"E", "A", "B", "alpha", "beta", "rmse_log"} <= set(fit["law"]) and fit["runs_fitted"] == 6
    assert (out / "fit.json").is_file()
    assert cli.main(["scale", "fit", str(out), "--bootstrap", "0", "--fit-budgets", "5e8,1e9"]) == 2  # 4 runs < 5
    assert cli.main(["scale", "plot", str(out), "--bootstrap", "5"]) == 0
    for name in ("compute.png", "isoflop.png", "predicted.png", "scaling.html"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert "data:image/png;base64," in (out / "plots" / "scaling.html").read_text()
    capsys.readouterr()
    assert cli.main(["scale", "plan", str(out), "--flops", "1e10", "--bootstrap", "5"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tokens"] == pytest.approx(1e10 / (6 * plan["params_nonembedding"]))
    assert plan["hours"] > 0 and plan["loss_interval_90"][0] <= plan["loss_interval_90"][1]
    assert cli.main(["scale", "plan", str(out), "--target-loss", "0.01", "--bootstrap", "5"]) == 2  # below E


def write_ledger(path: Path, sizes: list[float], budgets: list[float], repeats: int = 1) -> Path:
    """A ledger as a sweep writes it, its losses from the known law: one row per (budget, size, repeat)."""
    rows = [
        {"run": f"c{c:g}-n{n:g}-{i}", "budget": c, "params_nonembedding": n, "tokens": c / (6 * n), "flops": c,
         "val_loss": float(law(n, c / (6 * n))) * (1 + 0.001 * i), "tok_per_s": 1e9 / n}
        for c in budgets for n in sizes for i in range(repeats)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--sizes", "a,b", "--sizes takes auto or comma-separated depths like 1,2,3; got 'a,b'"),
        ("--sizes", "0", "--sizes: a depth must be positive"),
        ("--tokens-per-param", "-1", "--tokens-per-param must be a positive number"),
        ("--budgets", "", "--budgets is empty"),
        ("--budgets", "1e9,-5", "--budgets must be positive numbers of training FLOPs (e.g. 1e12), got -5.0"),
    ],
)
def test_sweep_options_are_checked_before_any_run(
    option: str, value: str, message: str, tmp_path: Path, capsys
) -> None:
    args = {"--budgets": "1e9", "--sizes": "1,2", "--tokens-per-param": "20"} | {option: value}
    assert cli.main(["scale", "sweep", *(x for kv in args.items() for x in kv), "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", [["fit"], ["plan", "--flops", "1e20"]])
def test_a_ledger_row_without_a_field_is_named(command: list[str], tmp_path: Path, capsys) -> None:
    ledger = write_ledger(tmp_path / "ledger.jsonl", [1e6, 1e7, 1e8], [1e17, 1e18])
    lines = ledger.read_text().splitlines()
    row = json.loads(lines[1])
    del row["budget"]
    ledger.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    assert cli.main(["scale", *command, str(ledger), "--bootstrap", "0"]) == 2
    assert f"row 2 of {ledger} lacks field 'budget': it is not a sweep ledger" in capsys.readouterr().err


@pytest.mark.parametrize("flops", ["-1", "0", "inf"])
def test_plan_needs_a_positive_budget(flops: str, tmp_path: Path, capsys) -> None:
    ledger = write_ledger(tmp_path / "ledger.jsonl", [1e6, 1e7, 1e8], [1e17, 1e18])
    assert cli.main(["scale", "plan", str(ledger), f"--flops={flops}", "--bootstrap", "0"]) == 2
    assert "--flops must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sizes, budgets, repeats",
    [([1e7], [1e18], 6), ([1e7], [1e17, 1e18, 1e19, 1e20, 1e21], 1), ([1e6, 1e7, 1e8, 1e9, 1e10], [1e18], 1)],
)
def test_a_fit_refuses_a_ledger_of_one_size_or_one_budget(
    sizes: list[float], budgets: list[float], repeats: int, tmp_path: Path, capsys
) -> None:
    ledger = write_ledger(tmp_path / "ledger.jsonl", sizes, budgets, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RankWarning included: none is printed
        assert cli.main(["scale", "fit", str(ledger), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert "needs runs of at least 2 sizes and 2 budgets" in err and "sweep more --sizes and --budgets" in err
    assert f"{len(sizes)} size(s) and {len(budgets)} budget(s)" in err
    assert not (tmp_path / "fit.json").exists()


def test_a_diverging_run_is_recorded_and_left_out_of_fits(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    sweep = tiny_sweep(out, "5e8", "1", lr="1e30")
    assert cli.main(sweep) == 0  # one diverging run does not stop the grid
    (row,) = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert row["val_loss"] is None and row["diverged"].startswith("training diverged at step")
    assert "diverged" in (out / "ledger.csv").read_text().splitlines()[0]
    mtime = (out / "ledger.jsonl").stat().st_mtime_ns
    assert cli.main(sweep) == 0 and (out / "ledger.jsonl").stat().st_mtime_ns == mtime  # not run again
    capsys.readouterr()
    assert cli.main(["scale", "fit", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 runs diverged and are left out; to run them, lower --train.lr" in err
