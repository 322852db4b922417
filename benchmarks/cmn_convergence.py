r"""How a CAVI-CMN fit converges: the ELBO, the experts in use and the test metrics, sweep by sweep.

The primary CAVI-CMN fit of ``cmn_uci.py`` (one restart, mean-field, Forgy initialisation,
float32) is run sweep by sweep with the same stopping rule (|ΔELBO| ≤ ``--tol``·|ELBO|, at most
``--max-sweeps``); at the checkpoint sweeps it records

* the ELBO's gap to the fit's final ELBO (nats),
* the experts in use: experts whose expected number of training points Σ_n q(z_n = k) is at least
  one (mean-field CAVI switches experts off when the data do not need them, the automatic
  relevance of a Bayesian mixture; each switch-off raises the ELBO),
* test accuracy, mean test log predictive density and ECE (20 bins) of the Monte Carlo posterior
  predictive ``cmn.predict_proba`` (200 draws, seeded), as in ``cmn_uci.py``,
* CPU seconds so far.

It answers two questions the tables of ``cmn_uci.py`` raise: why the ELBO keeps rising for
hundreds of sweeps (and so the time "to 1 % of the final ELBO" is long on some sets), and how
the predictive after the authors' fixed 200 sweeps compares with the one at convergence.

Run::

    python benchmarks/cmn_convergence.py --datasets pinwheels sonar breast_cancer vehicle banknote --seeds 0 1 2 3 4
    python benchmarks/cmn_convergence.py --datasets rice waveform --seeds 0 1 2 3 4 --max-sweeps 300
    python benchmarks/cmn_convergence.py --report
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
from typing import Dict, List

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cmn_uci import (ANCHOR_CAVI, DATASETS, _scores, cmn, first_sweep_reaching, fit_study_parser,  # noqa: E402
                     load, run_study, timed_sweeps)

from pyro_cavi import CAVI  # noqa: E402

RUNS = HERE / "out" / "cmn_convergence.jsonl"
CHECKPOINTS = (10, 25, 50, 100, 200, 300)


def experts_in_use(engine: CAVI) -> int:
    """Experts with at least one expected training point, Σ_n q(z_n = k) ≥ 1."""
    return int((engine.posterior["z"].probs.sum(0) >= 1.0).sum())


def trace_fit(Xtr, ytr, Xte, yte, K: int, seed: int, max_sweeps: int, tol: float, num_samples: int) -> dict:
    """Sweep one CAVI-CMN fit to convergence, scoring it at the checkpoint sweeps and at the end."""
    engine = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=K), seed=seed, init="forgy")

    def checkpoint(sweep: int, cpu: float) -> dict:
        torch.manual_seed(seed)
        scores = _scores(cmn.predict_proba(engine, Xte, num_samples=num_samples), yte)
        return {"sweep": sweep, "elbo": engine.elbo_trace[-1], "experts": experts_in_use(engine), "cpu": cpu, **scores}

    points, converged = [], False
    for sweep, cpu, converged in timed_sweeps(engine, Xtr, ytr, max_sweeps, tol):
        if sweep in CHECKPOINTS or converged or sweep == max_sweeps:
            points.append(checkpoint(sweep, cpu))
    final = engine.elbo_trace[-1]
    near = first_sweep_reaching(engine.elbo_trace, final - 0.01 * abs(final))
    return {"points": points, "converged": converged, "sweeps": len(engine.elbo_trace), "sweeps_to_1pct": near}


def benchmark(args) -> None:
    torch.set_num_threads(1)
    RUNS.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    for name in args.datasets:
        K = DATASETS[name][1]
        for seed in args.seeds:
            Xtr, ytr, Xte, yte = load(name, seed, torch.float32)
            rec = trace_fit(Xtr, ytr, Xte, yte, K, seed, args.max_sweeps, args.tol, args.num_samples)
            rec.update(dataset=name, seed=seed, K=K, commit=commit, max_sweeps=args.max_sweeps, tol=args.tol)
            line = json.dumps(rec)
            print(line, flush=True)
            with open(RUNS, "a") as f:
                f.write(line + "\n")


def _at(rec: dict, sweep: int) -> dict:
    """The record's scores at ``sweep``, or at its final sweep if it stopped earlier."""
    return next((p for p in rec["points"] if p["sweep"] == sweep), rec["points"][-1])


def report(path: pathlib.Path = RUNS) -> str:
    latest: Dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        latest[(rec["dataset"], rec["seed"])] = rec
    by_set: Dict[str, List[dict]] = {}
    for (name, _), rec in sorted(latest.items(), key=lambda kv: (list(DATASETS).index(kv[0][0]), kv[0][1])):
        by_set.setdefault(name, []).append(rec)
    mean = statistics.fmean
    out = ["Means over split seeds. Rows: checkpoint sweeps (a fit that stopped earlier contributes its final "
           "state); \"final\" = at convergence or the sweep cap. ELBO gap = final ELBO − ELBO at the sweep (nats); "
           "experts = experts with ≥ 1 expected training point.", "",
           "| data | seeds | sweep | ELBO gap | experts in use | acc | LPD | ECE | CPU s | authors' acc / LPD / ECE (200 sweeps) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, recs in by_set.items():
        seeds = ",".join(str(r["seed"]) for r in recs)
        a = ANCHOR_CAVI[name]
        cap = max(r["sweeps"] for r in recs)
        for sweep in [s for s in CHECKPOINTS if s < cap] + ["final"]:
            pts = [r["points"][-1] if sweep == "final" else _at(r, sweep) for r in recs]
            gap = mean(r["points"][-1]["elbo"] - p["elbo"] for r, p in zip(recs, pts))
            label = f"final ({mean(r['sweeps'] for r in recs):.0f})" if sweep == "final" else str(sweep)
            ref = f"{a[0]:.3f} / {a[1]:.3f} / {a[2]:.3f}" if sweep in (200, "final") else ""
            out.append(f"| {name} | {seeds} | {label} | {gap:.1f} | {mean(p['experts'] for p in pts):.1f} | "
                       f"{mean(p['acc'] for p in pts):.3f} | {mean(p['lpd'] for p in pts):.3f} | "
                       f"{mean(p['ece'] for p in pts):.3f} | {mean(p['cpu'] for p in pts):.1f} | {ref} |")
    out += ["", "Sweeps to within 1 % of the final ELBO and to convergence, per seed:", "",
            "| data | sweeps to 1 % of final ELBO | sweeps (converged) | experts in use at sweep 25 → final |",
            "|---|---|---|---|"]
    for name, recs in by_set.items():
        to1 = ", ".join(str(r["sweeps_to_1pct"]) for r in recs)
        sw = ", ".join(f"{r['sweeps']}{'' if r['converged'] else '*'}" for r in recs)
        ex = ", ".join(f"{_at(r, 25)['experts']}→{r['points'][-1]['experts']}" for r in recs)
        out.append(f"| {name} | {to1} | {sw} | {ex} |")
    out.append("\n(* = stopped at the sweep cap before the ELBO converged.)")
    return "\n".join(out)


def main() -> None:
    run_study(fit_study_parser(__doc__, "benchmarks/out/cmn_convergence.jsonl"), benchmark, report)


if __name__ == "__main__":
    main()
