r"""Ordinary vs adaptive over-relaxed CAVI sweeps (``CAVI(..., overrelax=1.1)``) on the CAVI-CMN fits.

The primary CAVI-CMN fit of ``cmn_uci.py`` / ``cmn_convergence.py`` (one restart, mean-field,
Forgy initialisation, float32, one thread) is run sweep by sweep with the stopping rule of
``CAVI.run`` (|ΔELBO| ≤ ``--tol``·|ELBO|, at most ``--max-sweeps``), once with ordinary sweeps and
once over-relaxed (Salakhutdinov & Roweis 2003, :mod:`pyro_cavi.cavi.overrelax`), from the same
seed. Per fit it records

* sweeps and CPU seconds (``time.process_time``, sweeps only) to within 1 % of the fit's own
  final ELBO, and to convergence; CPU per sweep (the price of the extra ELBO evaluation);
* sweeps and CPU seconds to reach the *ordinary* fit's final ELBO (over-relaxed fits only; a
  common target, since the two fits may end in different optima);
* final ELBO, experts in use (Σ_n q(z_n = k) ≥ 1), the over-relaxed steps kept / refused and
  the largest step kept;
* test accuracy, log predictive density and ECE of ``cmn.predict_proba`` (200 draws, seeded).

Run::

    python benchmarks/cmn_overrelax.py --datasets pinwheels sonar breast_cancer vehicle banknote --seeds 0 1
    python benchmarks/cmn_overrelax.py --datasets rice waveform --seeds 0 1 --max-sweeps 300
    python benchmarks/cmn_overrelax.py --report
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Dict, Optional

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cmn_convergence import experts_in_use  # noqa: E402
from cmn_uci import DATASETS, _scores, cmn, first_sweep_reaching, fit_study_parser, load, run_study, timed_sweeps  # noqa: E402

from pyro_cavi import CAVI  # noqa: E402

RUNS = HERE / "out" / "cmn_overrelax.jsonl"


def fit(Xtr, ytr, Xte, yte, K: int, seed: int, max_sweeps: int, tol: float, overrelax: Optional[float],
        num_samples: int) -> dict:
    engine = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=K), seed=seed, init="forgy", overrelax=overrelax)
    cpu, converged = [], False
    for _, total, converged in timed_sweeps(engine, Xtr, ytr, max_sweeps, tol):
        cpu.append(total)
    trace = list(engine.elbo_trace)
    final = trace[-1]
    near = first_sweep_reaching(trace, final - 0.01 * abs(final))
    torch.manual_seed(seed)
    scores = _scores(cmn.predict_proba(engine, Xte, num_samples=num_samples), yte)
    steps = engine.overrelax_trace
    return {"overrelax": overrelax, "sweeps": len(trace), "converged": converged, "elbo": final,
            "sweeps_to_1pct": near, "cpu_to_1pct": cpu[near - 1], "cpu": cpu[-1], "cpu_per_sweep": cpu[-1] / len(trace),
            "monotone": all(b >= a for a, b in zip(trace, trace[1:])), "trace": trace, "cpu_trace": cpu,
            "kept": sum(1 for a in steps if a > 1), "refused": sum(1 for a in steps if a < 0),
            "max_step": max([a for a in steps if a > 0], default=1.0),
            "experts": experts_in_use(engine), **scores}


def benchmark(args) -> None:
    torch.set_num_threads(1)
    RUNS.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    # untimed warm-up: the process's first-call costs (library caches, allocator) would otherwise
    # fall on the first timed fit, an ordinary one
    name = args.datasets[0]
    Xtr, ytr, Xte, yte = load(name, args.seeds[0], torch.float32)
    fit(Xtr, ytr, Xte, yte, DATASETS[name][1], args.seeds[0], 3, args.tol, None, 2)
    for seed in args.seeds:
        for name in args.datasets:
            K = DATASETS[name][1]
            Xtr, ytr, Xte, yte = load(name, seed, torch.float32)
            recs = [fit(Xtr, ytr, Xte, yte, K, seed, args.max_sweeps, args.tol, o, args.num_samples)
                    for o in (None, args.growth)]
            plain, fast = recs
            hit = first_sweep_reaching(fast["trace"], plain["elbo"])
            fast["sweeps_to_plain_final"] = hit
            fast["cpu_to_plain_final"] = None if hit is None else fast["cpu_trace"][hit - 1]
            for rec in recs:
                rec.update(dataset=name, seed=seed, K=K, growth=args.growth, commit=commit, max_sweeps=args.max_sweeps, tol=args.tol,
                           load=os.getloadavg()[0])
                line = json.dumps(rec)
                print(json.dumps({k: v for k, v in rec.items() if k not in ("trace", "cpu_trace")}), flush=True)
                with open(RUNS, "a") as f:
                    f.write(line + "\n")


def report(path: pathlib.Path = RUNS) -> str:
    runs: Dict[float, Dict[tuple, dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        growth = rec.get("growth", 1.1)  # (the first records, all with growth 1.1, did not name it)
        runs.setdefault(growth, {})[(rec["dataset"], rec["seed"], rec["overrelax"] is not None)] = rec
    return "\n\n".join(_table(growth, latest) for growth, latest in sorted(runs.items()))


def _table(growth: float, latest: Dict[tuple, dict]) -> str:
    mean = statistics.fmean
    out = [f"**Growth factor {growth}** (`--growth {growth}`; the ordinary fits are re-run in the same job). "
           f"Per split seed: ordinary sweeps (plain) vs over-relaxed (OR). \"to 1 %\" = sweeps / CPU s "
           "to within 1 % of the fit's own final ELBO; \"conv.\" = to convergence (* = sweep cap); "
           "\"OR to plain's final\" = sweeps / CPU s for the over-relaxed fit to reach the ordinary fit's final ELBO "
           "(– never); kept/refused = extrapolated steps; acc / LPD of the posterior predictive.", "",
           "| data | seed | to 1 %: plain | OR | conv.: plain | OR | CPU/sweep OR÷plain | final ELBO plain | OR "
           "| OR to plain's final | kept/refused (max α) | experts plain→OR | acc plain / OR | LPD plain / OR | load |",
           "|---|---|---|---|---|---|---:|---:|---:|---|---|---|---|---|---:|"]
    keys = sorted({(d, s) for d, s, _ in latest}, key=lambda k: (list(DATASETS).index(k[0]), k[1]))
    speed1, speedc, common, dl, da, dlpd, drops = [], [], [], [], [], [], []
    for d, s in keys:
        if (d, s, False) not in latest or (d, s, True) not in latest:
            continue
        p, o = latest[(d, s, False)], latest[(d, s, True)]
        conv = lambda r: f"{r['sweeps']}{'' if r['converged'] else '*'} / {r['cpu']:.1f}"
        to_plain = "–" if o["sweeps_to_plain_final"] is None else f"{o['sweeps_to_plain_final']} / {o['cpu_to_plain_final']:.1f}"
        out.append(
            f"| {d} | {s} | {p['sweeps_to_1pct']} / {p['cpu_to_1pct']:.1f} | {o['sweeps_to_1pct']} / {o['cpu_to_1pct']:.1f} "
            f"| {conv(p)} | {conv(o)} | {o['cpu_per_sweep'] / p['cpu_per_sweep']:.2f} | {p['elbo']:.1f} | {o['elbo']:.1f} "
            f"| {to_plain} | {o['kept']}/{o['refused']} ({o['max_step']:.1f}) | {p['experts']}→{o['experts']} "
            f"| {p['acc']:.3f} / {o['acc']:.3f} | {p['lpd']:.3f} / {o['lpd']:.3f} | {o['load']:.1f} |")
        speed1.append(p["cpu_to_1pct"] / o["cpu_to_1pct"])
        speedc.append(p["cpu"] / o["cpu"])
        if o["cpu_to_plain_final"] is not None:
            common.append(p["cpu"] / o["cpu_to_plain_final"])
        for r in (p, o):
            t = r["trace"]
            falls = [(i, a - b) for i, (a, b) in enumerate(zip(t, t[1:])) if b < a]
            drops += [(d, s, r["overrelax"] is not None, len(t) - 2 - i, fall) for i, fall in falls]
        dl.append(o["elbo"] - p["elbo"])
        da.append(o["acc"] - p["acc"])
        dlpd.append(o["lpd"] - p["lpd"])
    if speed1:
        out += ["", f"Over {len(speed1)} fits: CPU speed-up (plain ÷ OR) to 1 % of own final ELBO: median "
                f"{statistics.median(speed1):.2f}, range {min(speed1):.2f}–{max(speed1):.2f}; to convergence: median "
                f"{statistics.median(speedc):.2f}, range {min(speedc):.2f}–{max(speedc):.2f}. Final ELBO OR − plain: "
                f"mean {mean(dl):+.1f} nats (OR higher in {sum(x > 0 for x in dl)} of {len(dl)}); accuracy OR − plain: "
                f"mean {mean(da):+.4f}; LPD OR − plain: mean {mean(dlpd):+.4f}. The over-relaxed fit "
                f"reaches the ordinary fit's final ELBO in {len(common)} of {len(speed1)} fits, at a median "
                f"{statistics.median(common) if common else float('nan'):.2f}× less CPU than the ordinary fit took to its end (convergence or sweep cap). "
                "ELBO decreases between sweeps (float32 evaluation): "
                + ("none" if not drops else "; ".join(
                    f"{d} seed {s} {'OR' if o else 'plain'}: {fall:.4f} nats, {k} sweep(s) before the last" for d, s, o, k, fall in drops))
                + "."]
    return "\n".join(out)


def main() -> None:
    parser = fit_study_parser(__doc__, "benchmarks/out/cmn_overrelax.jsonl")
    parser.add_argument("--growth", type=float, default=1.1, help="overrelax growth factor of the step")
    run_study(parser, benchmark, report)


if __name__ == "__main__":
    main()
