r"""CAVI-CMN reproduction (issue 4): conditional mixture networks on pinwheels and six UCI sets.

For each data set and split seed: standardised features, stratified split with the authors'
train sizes (test = the remaining rows), K = 20 experts (pinwheels: K = 10), and up to five fits of
the model in ``models/cmn.py``:

* **CAVI-CMN**: ``pyro_cavi.CAVI`` run until the relative ELBO change drops below ``--tol``
  (at most ``--max-sweeps`` sweeps); posterior predictive by ``cmn.predict_proba`` (Monte Carlo
  over the posterior); the same fit is also scored with the authors' deterministic predictive
  ``cmn.predict_proba_bound`` (row "CAVI-CMN (paper predictive)");
* **MLE**: the same architecture as a deterministic mixture, full-batch Adam (``cmn_baselines``);
* **MLE+ES**: the same with early stopping on a stratified 20 % validation split of the train set;
* **BBVI**: Pyro SVI on ``cmn`` with ``z`` enumerated and an AutoNormal guide (``cmn_baselines``);
* **NUTS** (only when named in ``--methods``): Pyro's NUTS on ``cmn`` with ``z`` enumerated, one
  chain of ``--nuts-warmup`` + ``--nuts-samples`` iterations (default 200 + 200, tree depth at
  most 10), predictive from the draws of Γ, A, γ, B through ``cmn.predict_proba``
  (``cmn_baselines.fit_nuts``). Measured on 2 shared cores: 8-13 minutes per fit on pinwheels
  and sonar (510-940 leapfrog steps per iteration, near the cap of 1,023, about 2 ms each; 53-233×
  CAVI-CMN's CPU time per seed); on the larger sets ``--nuts-probe N`` only times the first N warm-up
  iterations and extrapolates to 400 (banknote 9 minutes, breast cancer 11, rice 19, vehicle 30,
  waveform 70; at most 21-139 minutes at the depth cap), records in
  ``benchmarks/out/cmn_nuts_probe.jsonl``. One chain: per-parameter r-hat / ESS are not
  meaningful (experts switch labels); the predictive is label-invariant.

Reported per method: test accuracy, mean test log predictive density (nats), ECE (20 bins), wall
and CPU seconds of the fit; for CAVI also sweeps to convergence and seconds per 200 sweeps; for
BBVI the wall seconds until its moving-average ELBO is within 1 % of its final value. Raw records go
to ``benchmarks/out/cmn_runs.jsonl`` (one JSON line per data set, seed and method); ``--report``
turns them into the markdown tables of ``benchmarks/results/cmn.md``; ``--scaling`` times CAVI
sweeps (and SVI steps) against input dimension and number of experts and draws a PNG.

Run::

    python benchmarks/cmn_uci.py --quick     # pinwheels + sonar, seed 0, a few minutes (own record file)
    python benchmarks/cmn_uci.py --datasets banknote rice --seeds 0 1
    python benchmarks/cmn_uci.py --report                     # tables from all records so far
    python benchmarks/cmn_uci.py --scaling
    python benchmarks/cmn_uci.py --datasets pinwheels sonar --seeds 0 --methods NUTS
    python benchmarks/cmn_uci.py --nuts-probe 10 --datasets breast_cancer vehicle banknote rice waveform
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

import cmn  # noqa: E402
from cmn_baselines import bbvi_predict_proba, fit_bbvi, fit_mle, fit_nuts, nuts_predict_proba  # noqa: E402
from cmn_metrics import accuracy, expected_calibration_error, log_predictive_density  # noqa: E402

from pyro_cavi import CAVI  # noqa: E402

DATA = HERE.parent.parent / "shared" / "data" / "uci"
RUNS = HERE / "out" / "cmn_runs.jsonl"
NUTS_PROBES = HERE / "out" / "cmn_nuts_probe.jsonl"
RESULTS = HERE / "results"

# data set -> (train size, number of experts); pinwheels: 200 train / 1000 test as in the anchors
DATASETS: Dict[str, Tuple[int, int]] = {
    "pinwheels": (200, 10),
    "sonar": (128, 20),
    "breast_cancer": (400, 20),
    "vehicle": (640, 20),
    "banknote": (1024, 20),
    "rice": (2560, 20),
    "waveform": (3840, 20),
}

# ../shared/anchors/cavi-cmn-reference.md: the authors' code on this kind of machine
ANCHOR_CAVI = {  # acc, LPD, ECE, s/model, 1 model s
    "pinwheels": (0.696, -1.069, 0.092, 1.9, None),
    "sonar": (0.780, -1.288, 0.169, 8.3, 7.6),
    "breast_cancer": (0.970, -0.081, 0.031, 4.4, 4.6),
    "vehicle": (0.793, -0.472, 0.068, 9.8, 7.3),
    "banknote": (0.991, -0.033, 0.024, 2.5, 1.9),
    "rice": (0.930, -0.189, 0.023, 10.1, 7.2),
    "waveform": (0.860, -0.334, 0.024, 46.8, 38.6),
}
ANCHOR_MLE = {  # acc, LPD, ECE (their pinwheels MLE used K = 20)
    "pinwheels": (0.695, -107.7, 0.300),
    "sonar": (0.855, -1.439, 0.141),
    "breast_cancer": (0.961, -0.536, 0.039),
    "vehicle": (0.768, -7.36, 0.226),
    "banknote": (0.999, -0.010, 0.002),
    "rice": (0.895, -7.26, 0.087),
    "waveform": (0.794, -31.7, 0.200),
}
METHODS = ("CAVI-CMN", "MLE", "MLE+ES", "BBVI", "NUTS")


def load(name: str, seed: int, dtype: torch.dtype):
    """Standardised, stratified train/test split of one data set."""
    from sklearn.model_selection import train_test_split

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    num_train, _ = DATASETS[name]
    if name == "pinwheels":
        X, y = cmn.pinwheels(240, seed=seed)  # 1,200 points, 200 train / 1,000 test
        X, y = X.numpy().astype(np.float64), y.numpy()
    elif name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
    else:
        import pandas as pd

        frame = pd.read_csv(DATA / f"{name}.csv")
        X, y = frame.drop(columns="label").to_numpy(np.float64), frame["label"].to_numpy()
    Xtr, Xte, ytr, yte = train_test_split(X, y, train_size=num_train, stratify=y, random_state=seed)
    mean, std = Xtr.mean(0), Xtr.std(0)
    std[std == 0] = 1.0
    as_t = lambda a: torch.as_tensor((a - mean) / std, dtype=dtype)  # noqa: E731
    return as_t(Xtr), torch.as_tensor(ytr).long(), as_t(Xte), torch.as_tensor(yte).long()


def _scores(probs: torch.Tensor, y: torch.Tensor) -> dict:
    probs = probs.double()
    probs = probs / probs.sum(-1, keepdim=True)
    return {"acc": accuracy(probs, y), "lpd": log_predictive_density(probs, y),
            "ece": expected_calibration_error(probs, y, 20)}


class _Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed_sweeps(engine: CAVI, X, y, max_sweeps: int, tol: float) -> Iterator[Tuple[int, float, bool]]:
    """Sweep ``engine`` one ``step`` at a time with the stopping rule of ``CAVI.run``
    (|ΔELBO| ≤ tol·max(1, |ELBO|), tol at least 8 float eps), yielding ``(sweep, CPU seconds of
    the steps so far, converged)`` after each sweep; what the caller does between sweeps is not
    timed."""
    tol = max(tol, 8 * torch.finfo(X.dtype).eps)
    cpu, prev = 0.0, None
    for sweep in range(1, max_sweeps + 1):
        start = time.process_time()
        elbo = -engine.step(X, y)
        cpu += time.process_time() - start
        converged = prev is not None and abs(elbo - prev) <= tol * max(1.0, abs(elbo))
        yield sweep, cpu, converged
        if converged:
            return
        prev = elbo


def first_sweep_reaching(trace: List[float], target: float) -> Optional[int]:
    """1-based sweep at which an ELBO trace first reaches ``target`` (None if never)."""
    return next((i + 1 for i, e in enumerate(trace) if e >= target), None)


def fit_study_parser(doc: str, records: str) -> argparse.ArgumentParser:
    """The command line shared by the per-fit CMN studies (``cmn_convergence.py``,
    ``cmn_overrelax.py``): data sets, split seeds, sweep cap, tolerance, predictive draws, and
    ``--report`` to print the tables from ``records``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["pinwheels"], choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-sweeps", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-5, help="relative ELBO change at which the fit stops")
    parser.add_argument("--num-samples", type=int, default=200, help="posterior draws for the predictive")
    parser.add_argument("--report", action="store_true", help=f"print the tables from {records}")
    return parser


def run_study(parser: argparse.ArgumentParser, benchmark, report) -> None:
    """Parse the command line; print ``report()`` for ``--report``, else run ``benchmark(args)``."""
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    benchmark(args)


def run_cavi(Xtr, ytr, Xte, yte, K, seed, args) -> dict:
    """One CAVI-CMN fit (``--restarts R``: R initialisations swept together, best ELBO kept).

    With R > 1 the record also carries ``restarts_mean``: the metrics of every restart's own
    predictive, averaged over the R restarts (what the authors report: the mean over their
    8-32 restarts), beside the best-ELBO restart's metrics (the record's own), and
    ``restarts_ensemble``: the metrics of the restarts' averaged predictive (the equal-weight
    mixture of their posteriors, ``cmn.predict_proba(..., ensemble=True)``, here from the same
    draws as the per-restart metrics)."""
    R = args.restarts
    with _Clock() as clock:  # the model file's own fitting recipe (its initialisation included)
        engine = cmn.fit_cavi(Xtr, ytr, num_experts=K, num_steps=args.max_sweeps, tol=args.tol, seed=seed,
                              prior_scale=args.prior_scale, joint_experts=args.joint_experts, num_restarts=R,
                              structured_hidden=args.structured_hidden, init=args.init)
    trace = engine.elbo_trace
    fits = engine.restart_fits() if R > 1 else [engine]
    traces = [fit.elbo_trace for fit in fits]
    converged = [len(t) < args.max_sweeps or abs(t[-1] - t[-2]) <= args.tol * max(1.0, abs(t[-1])) for t in traces]
    restart_sweeps = sum(len(t) for t in traces)  # sweeps summed over restarts: the work done
    final = trace[-1]
    # sweeps to within 1 % of the final ELBO (time scaled by sweeps: every sweep costs about the same)
    near = first_sweep_reaching(trace, final - 0.01 * abs(final))
    rec = _scores(cmn.predict_proba(engine, Xte, num_samples=args.num_samples), yte)
    # the authors' deterministic predictive from the same fit (reported as its own row)
    rec["paper_predictive"] = _scores(cmn.predict_proba_bound(engine, Xte), yte)
    rec.update(wall=clock.wall, cpu=clock.cpu, sweeps=len(trace), converged=all(converged), elbo=final,
               restarts=R, restart_sweeps=restart_sweeps, restarts_converged=sum(converged),
               wall_per_200=clock.wall / restart_sweeps * 200, cpu_per_200=clock.cpu / restart_sweeps * 200,
               wall_to_1pct=clock.wall * near / restart_sweeps)
    if R > 1:
        probs = [cmn.predict_proba(fit, Xte, num_samples=args.num_samples) for fit in fits]
        per = [_scores(p, yte) for p in probs]
        rec["restarts_mean"] = {k: statistics.fmean(p[k] for p in per) for k in per[0]}
        rec["restarts_ensemble"] = _scores(torch.stack(probs).mean(0), yte)
        rec["restart_elbos"] = [t[-1] for t in traces]
    return rec


def run_mle(Xtr, ytr, Xte, yte, K, seed, args, early_stopping: bool) -> dict:
    from sklearn.model_selection import train_test_split

    with _Clock() as clock:
        if early_stopping:
            idx = np.arange(len(ytr))
            fit_idx, val_idx = train_test_split(idx, test_size=0.2, stratify=ytr.numpy(), random_state=seed)
            model = fit_mle(Xtr[fit_idx], ytr[fit_idx], K, num_classes=int(ytr.max()) + 1, num_steps=args.mle_steps,
                            X_val=Xtr[val_idx], y_val=ytr[val_idx], seed=seed)
        else:
            model = fit_mle(Xtr, ytr, K, num_steps=args.mle_steps, seed=seed)
    rec = _scores(model.predict_proba(Xte), yte)
    # LPD from the log-probabilities: the unregularised fit puts probabilities below float32's
    # smallest number on some test labels, whose exp() would read as 0 and the LPD as -inf
    with torch.no_grad():
        rec["lpd"] = float(model.log_proba(Xte).double().gather(-1, yte.unsqueeze(-1)).mean())
    rec.update(wall=clock.wall, cpu=clock.cpu, steps=model.steps_run)
    return rec


def run_bbvi(Xtr, ytr, Xte, yte, K, seed, args) -> dict:
    with _Clock() as clock:
        fit = fit_bbvi(Xtr, ytr, K, num_steps=args.bbvi_steps, lr=args.bbvi_lr, seed=seed, prior_scale=args.prior_scale)
    rec = _scores(bbvi_predict_proba(fit, Xtr, ytr, Xte, num_samples=args.num_samples), yte)
    rec.update(wall=clock.wall, cpu=clock.cpu, steps=args.bbvi_steps, elbo=float(np.mean(fit.elbo_trace[-100:])),
               wall_to_1pct=fit.time_to_final_elbo(0.01))
    return rec


def run_nuts(Xtr, ytr, Xte, yte, K, seed, args) -> dict:
    """One NUTS chain (``--nuts-warmup`` + ``--nuts-samples`` iterations) on ``cmn`` with ``z``
    enumerated; the predictive pushes every post-warm-up draw of Γ, A, γ, B through
    ``cmn.predict_proba`` (one x1 per draw). Also records the leapfrog steps (potential and
    gradient evaluations), divergences and adapted step size."""
    W, S = args.nuts_warmup, args.nuts_samples
    with _Clock() as clock:
        fit = fit_nuts(Xtr, ytr, K, num_warmup=W, num_samples=S, seed=seed, max_tree_depth=args.nuts_max_tree_depth,
                       prior_scale=args.prior_scale)
    rec = _scores(nuts_predict_proba(fit, Xte), yte) if S else {}
    rec.update(wall=clock.wall, cpu=clock.cpu, warmup=W, samples=S, max_tree_depth=args.nuts_max_tree_depth,
               grads=fit.num_grads, grads_warmup=fit.num_grads_warmup, divergences=fit.divergences,
               step_size=fit.step_size, wall_warmup=fit.wall_warmup,
               ms_per_grad=1e3 * clock.wall / fit.num_grads, wall_per_iter=clock.wall / (W + S),
               latent_dims=sum(v[0].numel() for v in fit.samples.values()))
    return rec


def _start_records(args, path: pathlib.Path) -> Tuple[torch.dtype, str]:
    """One thread, the run's default dtype, the record file's folder; returns the dtype and the
    commit the records are stamped with."""
    import subprocess

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    path.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    return dtype, commit


def nuts_probe(args) -> None:
    """Cost of NUTS where a full fit is out of reach: ``--nuts-probe N`` warm-up iterations (and
    one draw) per data set and seed, timed; records to ``benchmarks/out/cmn_nuts_probe.jsonl``
    with the wall seconds per iteration and the time extrapolated to ``--nuts-warmup`` +
    ``--nuts-samples`` iterations at that rate."""
    import os

    dtype, commit = _start_records(args, NUTS_PROBES)
    for name in args.datasets:
        K = DATASETS[name][1]
        for seed in args.seeds:
            Xtr, ytr, _, _ = load(name, seed, dtype)
            with _Clock() as clock:
                fit = fit_nuts(Xtr, ytr, K, num_warmup=args.nuts_probe, num_samples=1, seed=seed,
                               max_tree_depth=args.nuts_max_tree_depth, prior_scale=args.prior_scale)
            iters = args.nuts_probe + 1
            rec = dict(dataset=name, seed=seed, K=K, n_train=len(ytr), dtype=args.dtype, commit=commit, iters=iters,
                       wall=clock.wall, cpu=clock.cpu, grads=fit.num_grads, step_size=fit.step_size,
                       max_tree_depth=args.nuts_max_tree_depth, wall_per_iter=clock.wall / iters,
                       grads_per_iter=fit.num_grads / iters, ms_per_grad=1e3 * clock.wall / fit.num_grads,
                       target_iters=args.nuts_warmup + args.nuts_samples,
                       extrapolated_wall=clock.wall / iters * (args.nuts_warmup + args.nuts_samples),
                       latent_dims=sum(v[0].numel() for v in fit.samples.values()), load=os.getloadavg()[0])
            print(json.dumps(rec), flush=True)
            with open(NUTS_PROBES, "a") as f:
                f.write(json.dumps(rec) + "\n")


def benchmark(args, runs: pathlib.Path = RUNS) -> None:
    dtype, commit = _start_records(args, runs)
    for name in args.datasets:
        K = DATASETS[name][1]
        for seed in args.seeds:
            Xtr, ytr, Xte, yte = load(name, seed, dtype)
            for method in args.methods:
                if method == "CAVI-CMN":
                    rec = run_cavi(Xtr, ytr, Xte, yte, K, seed, args)
                elif method == "BBVI":
                    rec = run_bbvi(Xtr, ytr, Xte, yte, K, seed, args)
                elif method == "NUTS":
                    rec = run_nuts(Xtr, ytr, Xte, yte, K, seed, args)
                else:
                    rec = run_mle(Xtr, ytr, Xte, yte, K, seed, args, early_stopping=method == "MLE+ES")
                label = method if args.prior_scale is None or method.startswith("MLE") else f"{method} (prior scale {args.prior_scale:g})"
                if args.joint_experts and method == "CAVI-CMN":
                    label = f"{label} (joint Normal-Gamma experts)"
                if args.restarts > 1 and method == "CAVI-CMN":
                    label = f"{label} ({args.restarts} restarts, best ELBO)"
                if args.structured_hidden and method == "CAVI-CMN":
                    label = f"{label} (structured hidden layer)"
                if args.init == "authors" and method == "CAVI-CMN":
                    label = f"{label} (authors' initialisation)"
                rec.update(dataset=name, seed=seed, method=label, commit=commit, K=K, dtype=args.dtype, prior_scale=args.prior_scale,
                           structured_hidden=bool(args.structured_hidden and method == "CAVI-CMN"),
                           n_train=len(ytr), n_test=len(yte), max_sweeps=args.max_sweeps, tol=args.tol)
                mean = rec.pop("restarts_mean", None)
                ensemble = rec.pop("restarts_ensemble", None)
                recs = [rec]
                if "paper_predictive" in rec:  # the same fit, scored with the authors' predictive
                    paper = rec.pop("paper_predictive")
                    rec2 = {**rec, **paper}
                    rec2["method"] = label + " (paper predictive)"
                    recs.append(rec2)
                if mean is not None:  # every restart's own metrics, averaged (as the authors report)
                    recs.append({**rec, **mean, "method": label.replace("best ELBO", "mean over restarts")})
                if ensemble is not None:  # the restarts' predictives averaged: one ensemble prediction
                    recs.append({**rec, **ensemble, "method": label.replace("best ELBO", "ensemble")})
                for r in recs:
                    print(json.dumps(r), flush=True)
                    with open(runs, "a") as f:
                        f.write(json.dumps(r) + "\n")


def _mean(recs: List[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in recs)


def report(path: pathlib.Path = RUNS) -> str:
    """Markdown tables (means over split seeds) from the JSON records; the latest record wins for a
    repeated (data set, seed, method)."""
    latest: Dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[(r["dataset"], r["seed"], r["method"])] = r
    out = []
    out.append("| data (K) | method | seeds | acc | LPD | ECE | wall s | CPU s | authors' acc | authors' LPD | authors' ECE |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    labels = list(dict.fromkeys([m for m in METHODS] + sorted({m for (_, _, m) in latest})))
    for name in DATASETS:
        for method in labels:
            recs = [r for (d, s, m), r in sorted(latest.items()) if d == name and m == method]
            if not recs:
                continue
            ref = {"CAVI-CMN": ANCHOR_CAVI, "MLE": ANCHOR_MLE}.get(method.split(" (")[0], {}).get(name)
            refs = f"{ref[0]:.3f} | {ref[1]:.3f} | {ref[2]:.3f}" if ref else "– | – | –"
            seeds = ",".join(str(r["seed"]) for r in recs)
            row = {k: _mean(recs, k) for k in ("acc", "lpd", "ece", "wall", "cpu")}
            summary[(name, method)] = (row, recs)
            out.append(f"| {name} ({recs[0]['K']}) | {method} | {seeds} | {row['acc']:.3f} | {row['lpd']:.3f} | "
                       f"{row['ece']:.3f} | {row['wall']:.1f} | {row['cpu']:.1f} | {refs} |")
    out.append("")
    out.append("CAVI sweeps and time (means over seeds; authors' s/model = 200 sweeps / restarts batched, "
               "1 model = 200 sweeps of one restart):")
    out.append("")
    out.append("| data | sweeps (converged / seeds) | wall s / 200 sweeps | CPU s / 200 sweeps | authors' s/model | "
               "authors' 1 model s | CAVI wall to converge | CAVI wall to 1 % of final ELBO | BBVI wall to 1 % of final ELBO | "
               "BBVI / CAVI (converge), wall | same, CPU | BBVI / CAVI, each to 1 % of its final ELBO, CPU | LPD CAVI − BBVI |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in DATASETS:
        if (name, "CAVI-CMN") not in summary:
            continue
        _, recs = summary[(name, "CAVI-CMN")]
        a = ANCHOR_CAVI[name]
        conv = sum(r["converged"] for r in recs)
        cells = [f"{_mean(recs, 'sweeps'):.0f} ({conv}/{len(recs)})", f"{_mean(recs, 'wall_per_200'):.1f}",
                 f"{_mean(recs, 'cpu_per_200'):.1f}", f"{a[3]}", f"{a[4] if a[4] else '–'}",
                 f"{_mean(recs, 'wall'):.1f}", f"{_mean(recs, 'wall_to_1pct'):.1f}"]
        if (name, "BBVI") in summary:
            _, brecs = summary[(name, "BBVI")]
            seeds = {r["seed"] for r in brecs} & {r["seed"] for r in recs}
            c = [r for r in recs if r["seed"] in seeds]
            b = [r for r in brecs if r["seed"] in seeds]
            # CPU seconds to 1 % of BBVI's final ELBO, pro rata of its wall-clock fraction
            b_cpu = statistics.fmean(r["cpu"] * r["wall_to_1pct"] / r["wall"] for r in b)
            c_cpu = statistics.fmean(r["cpu"] * r["wall_to_1pct"] / r["wall"] for r in c)
            cells += [f"{_mean(b, 'wall_to_1pct'):.1f}", f"{_mean(b, 'wall_to_1pct') / _mean(c, 'wall'):.1f}×",
                      f"{b_cpu / _mean(c, 'cpu'):.1f}×", f"{b_cpu / c_cpu:.1f}×",
                      f"{_mean(c, 'lpd') - _mean(b, 'lpd'):+.3f}"]
        else:
            cells += ["–", "–", "–", "–", "–"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    variants = [m for m in labels if m.startswith("CAVI-CMN (") and "predictive" not in m and "prior scale" not in m
                and "restarts" not in m]
    if any((name, v) in summary for name in DATASETS for v in variants):
        out.append("")
        out.append("CAVI-CMN variants against the mean-field CAVI-CMN rows, on the seeds both have (means; "
                   "Δ = variant − mean-field; ELBO higher = seeds where the variant's final ELBO is higher):")
        out.append("")
        out.append("| data | variant | seeds | acc | Δ acc | LPD | Δ LPD | ECE | Δ ECE | sweeps (converged) | "
                   "CPU s / 200 sweeps | mean-field CPU s / 200 sweeps | final ELBO | mean-field final ELBO | ELBO higher |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in DATASETS:
            for v in variants:
                if (name, v) not in summary or (name, "CAVI-CMN") not in summary:
                    continue
                base = {r["seed"]: r for r in summary[(name, "CAVI-CMN")][1]}
                recs = [r for r in summary[(name, v)][1] if r["seed"] in base]
                if not recs:
                    continue
                b = [base[r["seed"]] for r in recs]
                d = {k: _mean(recs, k) - _mean(b, k) for k in ("acc", "lpd", "ece")}
                higher = sum(r["elbo"] > q["elbo"] for r, q in zip(recs, b))
                conv = sum(r["converged"] for r in recs)
                out.append(f"| {name} | {v[len('CAVI-CMN '):]} | {','.join(str(r['seed']) for r in recs)} | "
                           f"{_mean(recs, 'acc'):.3f} | {d['acc']:+.3f} | {_mean(recs, 'lpd'):.3f} | {d['lpd']:+.3f} | "
                           f"{_mean(recs, 'ece'):.3f} | {d['ece']:+.3f} | {_mean(recs, 'sweeps'):.0f} ({conv}/{len(recs)}) | "
                           f"{_mean(recs, 'cpu_per_200'):.1f} | {_mean(b, 'cpu_per_200'):.1f} | {_mean(recs, 'elbo'):.1f} | "
                           f"{_mean(b, 'elbo'):.1f} | {higher}/{len(recs)} |")
    out += ["", _restarts_table(summary), "", _seed_spread_table(summary), "", _nuts_table(summary), "", _nuts_probe_table()]
    return "\n".join(out)


def _nuts_table(summary: dict) -> str:
    """The NUTS fits beside CAVI-CMN and BBVI on the same split seeds, then their cost: leapfrog
    steps (gradient evaluations) per iteration in warm-up and in sampling, divergent draws,
    adapted step size, time."""
    rows = ["| data | seeds | acc: NUTS / CAVI-CMN / BBVI | LPD: NUTS / CAVI-CMN / BBVI | ECE: NUTS / CAVI-CMN / BBVI | "
            "wall s: NUTS / CAVI-CMN / BBVI |", "|---|---|---|---|---|---|"]
    cost = ["| data | seeds | continuous latents | warm-up + draws | leapfrog steps / iteration, warm-up / sampling | "
            "divergent draws | step size | ms / gradient | wall s | CPU s | wall s / iteration |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in DATASETS:
        if (name, "NUTS") not in summary:
            continue
        recs = summary[(name, "NUTS")][1]
        seeds = [r["seed"] for r in recs]
        other = {m: [r for r in summary.get((name, m), (None, []))[1] if r["seed"] in seeds] for m in ("CAVI-CMN", "BBVI")}
        cells = []
        for key, fmt in (("acc", "{:.3f}"), ("lpd", "{:.3f}"), ("ece", "{:.3f}"), ("wall", "{:.0f}")):
            vals = [_mean(recs, key)] + [_mean(o, key) if len(o) == len(recs) else None for o in other.values()]
            cells.append(" / ".join("–" if v is None else fmt.format(v) for v in vals))
        rows.append(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
        dims = next((r["latent_dims"] for r in recs if "latent_dims" in r), None)
        warm = statistics.fmean(r["grads_warmup"] / r["warmup"] for r in recs)
        samp = statistics.fmean((r["grads"] - r["grads_warmup"]) / r["samples"] for r in recs)
        div = "; ".join(f"{r['divergences']}/{r['samples']}" for r in recs)
        cost.append(f"| {name} | {','.join(map(str, seeds))} | {dims or '–'} | {recs[0]['warmup']} + {recs[0]['samples']} | "
                    f"{warm:.0f} / {samp:.0f} (cap {2 ** recs[0]['max_tree_depth'] - 1}) | {div} | "
                    f"{_mean(recs, 'step_size'):.3f} | {_mean(recs, 'ms_per_grad'):.2f} | {_mean(recs, 'wall'):.0f} | "
                    f"{_mean(recs, 'cpu'):.0f} | {_mean(recs, 'wall_per_iter'):.2f} |")
    return "\n".join(rows + [""] + cost) if len(rows) > 2 else ""


def _nuts_probe_table(path: pathlib.Path = NUTS_PROBES) -> str:
    """``--nuts-probe`` records: the first iterations of warm-up timed, extrapolated."""
    if not path.exists():
        return ""
    latest = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[(r["dataset"], r["seed"], r["iters"])] = r
    rows = ["| data | N train | K | continuous latents | seed | iterations timed | leapfrog steps / iteration | ms / gradient | "
            "wall s / iteration | CPU s / iteration | extrapolated wall for warm-up + draws | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in DATASETS:
        for (d, seed, iters), r in sorted(latest.items()):
            if d != name:
                continue
            rows.append(f"| {name} | {r['n_train']} | {r['K']} | {r.get('latent_dims', '–')} | {seed} | {iters} | "
                        f"{r['grads_per_iter']:.0f} | {r['ms_per_grad']:.2f} | {r['wall_per_iter']:.2f} | "
                        f"{r['cpu'] / iters:.2f} | {r['extrapolated_wall'] / 60:.0f} min for {r['target_iters']} | {r['load']:.1f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _seed_spread_table(summary: dict, method: str = "CAVI-CMN") -> str:
    """Accuracy of ``method`` per split seed, its range and the standard error of its mean
    (sample s.d. / sqrt(number of seeds)): how far the seed mean can move from split noise."""
    rows = ["| data | accuracy per seed | range | s.e. of the mean | authors' |", "|---|---|---|---|---|"]
    for name in DATASETS:
        if (name, method) not in summary:
            continue
        recs = summary[(name, method)][1]
        accs = [r["acc"] for r in recs]
        se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
        per = ", ".join(f"{r['seed']}: {r['acc']:.3f}" for r in recs)
        rows.append(f"| {name} | {per} | {max(accs) - min(accs):.3f} | {se:.3f} | {ANCHOR_CAVI[name][0]:.3f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def _restarts_table(summary: dict) -> str:
    """Batched restarts (``--restarts R``): the best-ELBO restart, the mean over restarts and
    the restarts' ensemble (where recorded) beside the authors' figures (theirs: the mean over
    their 8-32 restarts), and the CPU seconds per restart for 200 sweeps beside their s/model."""
    rows = ["| data | R | seeds | restarts converged | sweeps per restart | CPU s / 200 sweeps / restart | authors' s/model | "
            "acc: best ELBO / mean over restarts / ensemble / authors' | LPD: best / mean / ensemble / authors' "
            "| ECE: best / mean / ensemble / authors' |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, method), (best, recs) in summary.items():
        if "restarts, best ELBO)" not in method:
            continue
        mean, _ = summary.get((name, method.replace("best ELBO", "mean over restarts")), (None, None))
        if mean is None:
            continue
        ens, _ = summary.get((name, method.replace("best ELBO", "ensemble")), (None, None))
        a, R = ANCHOR_CAVI[name], recs[0]["restarts"]
        conv = sum(r["restarts_converged"] for r in recs)

        def trio(k: str) -> str:
            authors = a[("acc", "lpd", "ece").index(k)]
            return f"{best[k]:.3f} / {mean[k]:.3f} / " + (f"{ens[k]:.3f}" if ens else "–") + f" / {authors:.3f}"

        cells = [name, str(R), ",".join(str(r["seed"]) for r in recs), f"{conv}/{R * len(recs)}",
                 f"{statistics.fmean(r['restart_sweeps'] / R for r in recs):.0f}", f"{_mean(recs, 'cpu_per_200'):.2f}", f"{a[3]}",
                 trio("acc"), trio("lpd"), trio("ece")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) if len(rows) > 2 else ""


def scaling(args) -> None:
    """Seconds per CAVI sweep (and per SVI step) against input dimension D and number of experts K."""
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    N, L = 1000, 3
    g = torch.Generator().manual_seed(0)

    def per_sweep(D, K):
        X = torch.randn(N, D, generator=g)
        y = (X[:, : min(D, 2)].sum(-1) > 0).long() + (X[:, 0] > 1).long()
        engine = CAVI(functools.partial(cmn.cmn, num_experts=K, num_classes=L), seed=0)
        engine.run(X, y, num_steps=2, tol=0.0, progress=False)  # tracing and first sweeps off the clock
        start = time.process_time()
        engine.run(X, y, num_steps=args.scaling_sweeps, tol=0.0, progress=False)
        cavi = (time.process_time() - start) / args.scaling_sweeps
        fit_bbvi(X, y, K, num_steps=2)
        start = time.process_time()
        fit_bbvi(X, y, K, num_steps=20)
        svi = (time.process_time() - start) / 20
        print(f"D={D} K={K}: CAVI {cavi:.3f} CPU s/sweep, SVI {svi:.4f} CPU s/step", flush=True)
        return cavi, svi

    dims, experts = [2, 8, 32, 64], [5, 10, 20, 40]
    data = {"N": N, "L": L, "dtype": args.dtype, "dims": dims, "by_d": [per_sweep(D, 20) for D in dims],
            "experts": experts, "by_k": [per_sweep(16, K) for K in experts]}
    with open(HERE / "out" / "cmn_scaling.json", "w") as f:
        json.dump(data, f)
    plot_scaling(data)


def plot_scaling(data: dict) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, xs, ys, label in ((axes[0], data["dims"], data["by_d"], "input dimension D (K = 20)"),
                              (axes[1], data["experts"], data["by_k"], "number of experts K (D = 16)")):
        ax.plot(xs, [200 * c for c, _ in ys], "o-", label="CAVI: 200 sweeps")
        ax.plot(xs, [200 * s for _, s in ys], "s--", label="SVI: 200 steps")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xticks(xs)
        ax.set_xlabel(label)
        ax.set_ylabel("CPU seconds")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"CMN cost, N = {data['N']}, L = {data['L']}, {data['dtype']}, 1 thread", fontsize=10)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "cmn_scaling.png", dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["pinwheels", "sonar", "breast_cancer"], choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "NUTS"], choices=list(METHODS),
                        help="NUTS is run only when named")
    parser.add_argument("--max-sweeps", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-5, help="relative ELBO change at which CAVI stops")
    parser.add_argument("--mle-steps", type=int, default=5000)
    parser.add_argument("--bbvi-steps", type=int, default=3000)
    parser.add_argument("--bbvi-lr", type=float, default=0.02)
    parser.add_argument("--nuts-warmup", type=int, default=200, help="NUTS warm-up iterations (one chain)")
    parser.add_argument("--nuts-samples", type=int, default=200, help="NUTS draws kept after warm-up (the predictive's draws)")
    parser.add_argument("--nuts-max-tree-depth", type=int, default=10, help="NUTS tree depth cap (Pyro's default 10)")
    parser.add_argument("--nuts-probe", type=int, default=0,
                        help="only time this many NUTS warm-up iterations per data set and seed, extrapolate to "
                             "--nuts-warmup + --nuts-samples (records to benchmarks/out/cmn_nuts_probe.jsonl)")
    parser.add_argument("--num-samples", type=int, default=200, help="posterior draws for predictive probabilities")
    parser.add_argument("--prior-scale", type=float, default=None,
                        help="the earlier zero-mean CMN with this scale on every Gaussian weight (default: the paper's priors)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float32 as the authors")
    parser.add_argument("--joint-experts", action="store_true",
                        help="CAVI-CMN with one Normal-Gamma factor per expert row (joint=[('A', 'prec')])")
    parser.add_argument("--restarts", type=int, default=1,
                        help="CAVI-CMN restarts swept together (vectorised); the best ELBO is kept, the mean over restarts reported too")
    parser.add_argument("--structured-hidden", action="store_true",
                        help="CAVI-CMN with one factor q(z_n) q(x1_n | z_n) per datum (joint=[('z', 'x1')])")
    parser.add_argument("--init", default="forgy", choices=["forgy", "authors"],
                        help="CAVI-CMN initialisation (cmn.fit_cavi(init=...)): random experts seeded from data "
                             "points, or the authors' start (gating and output tight at the prior mean, E-step first)")
    parser.add_argument("--quick", action="store_true", help="pinwheels and sonar, seed 0, fewer steps")
    parser.add_argument("--report", action="store_true", help="print the tables from benchmarks/out/cmn_runs.jsonl")
    parser.add_argument("--scaling", action="store_true", help="time CAVI sweeps against D and K, write the PNG")
    parser.add_argument("--scaling-sweeps", type=int, default=5)
    parser.add_argument("--replot", action="store_true", help="redraw the scaling PNG from benchmarks/out/cmn_scaling.json")
    args = parser.parse_args()
    if args.report:
        print(report())
        return
    if args.replot:
        plot_scaling({"N": 1000, "L": 3, "dtype": args.dtype, **json.loads((HERE / "out" / "cmn_scaling.json").read_text())})
        return
    if args.scaling:
        scaling(args)
        return
    if args.nuts_probe:
        nuts_probe(args)
        return
    runs = RUNS
    if args.quick:  # a separate record file, so that quick settings never mix with the full runs
        args.datasets, args.seeds = ["pinwheels", "sonar"], [0]
        args.max_sweeps, args.mle_steps, args.bbvi_steps = 200, 2000, 1000
        runs = RUNS.with_name("cmn_runs_quick.jsonl")
    benchmark(args, runs)
    print()
    print(report(runs))


if __name__ == "__main__":
    main()
