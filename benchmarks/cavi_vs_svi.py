r"""CAVI vs Pyro SVI: time and steps to the mean-field optimum (issue 3, "Benchmarks").

Two problems (definitions in :mod:`handwritten_cavi`): Bayesian linear regression
(N = 10⁴, D = 50, correlated design, Gamma noise precision) and a K = 5 Gaussian
mixture (N = 10⁴, 2-D). For each:

* the **mean-field optimum** comes from the hand-written closed-form loop
  (NumPy, float64), run to 1e-14 relative change;
* **CAVI** (``pyro_cavi.CAVI``, float64) and the **hand-written loop** are run from the
  same start, one after the other, ``--repeats`` times; their ELBO traces agree sweep
  by sweep; reported: sweeps and CPU time until the ELBO is within 0.1 % and within
  1 nat of the optimum, and until the relative change drops below 1e-8 (the engine's
  ``run`` rule), medians over repeats, and the engine / hand-written time ratio;
* **Pyro SVI** (float32, one particle, ``AutoNormal`` and ``AutoMultivariateNormal``,
  Adam over a grid of learning rates; for the mixture ``TraceEnum_ELBO`` with ``z``
  enumerated): CPU seconds of ``svi.step`` only, until the ELBO is within 0.1 % and
  within 1 nat. The ELBO is estimated outside the clock every ``eval_every`` steps
  (64 particles) and a crossing is confirmed by a fresh 1,024-particle estimate.

The SVI and CAVI ELBOs are bounds on the same ``log p(data)``; for the mixture, SVI's
enumerated ELBO marginalises ``z`` exactly, so it may end above the mean-field
optimum. Run::

    python benchmarks/cavi_vs_svi.py            # about 6 CPU minutes (longer wall time on busy cores)
    python benchmarks/cavi_vs_svi.py --quick    # about 2 minutes
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one BLAS thread for the NumPy reference too (set before importing numpy)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value
from pyro.poutine.util import site_is_subsample

from handwritten_cavi import (
    MixtureCAVI,
    RegressionCAVI,
    log_evidence_regression,
    make_mixture_model,
    mixture_data,
    mixture_optimum,
    regression_data,
    regression_model,
)
from pyro_cavi import CAVI

Tensor = torch.Tensor
LOG_2PI = math.log(2 * math.pi)
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One benchmark problem: data, the Pyro model, its optimum and an ELBO estimator."""

    name: str
    model: Callable
    args64: Tuple[Tensor, ...]
    args32: Tuple[Tensor, ...]
    optimum: float
    log_joint: Callable[[Dict[str, Tensor], int], Tensor]  # float64 log p(data, latents) per particle
    svi_model: Callable
    guide_model: Callable
    svi_loss: Callable[[], pyro.infer.ELBO]
    init_values: Dict[str, Tensor]
    handwritten: Callable[[int], object]  # seed -> hand-written fit at the engine's start
    upper_bound: Optional[float] = None  # exact log p(data) when known
    num_components: int = 0  # mixture only
    notes: List[str] = field(default_factory=list)

    @property
    def thresholds(self) -> Dict[str, float]:
        return {"0.1%": self.optimum - 1e-3 * abs(self.optimum), "1 nat": self.optimum - 1.0}


def regression_problem(num_data: int = 10_000, dim: int = 50) -> Problem:
    X, y = regression_data(num_data, dim)
    N, D = X.shape
    fit = RegressionCAVI(X, y)
    optimum = fit.run(1000, 1e-14)[-1]
    diagonal = RegressionCAVI(X, y, diagonal=True).run(1000, 1e-14)[-1]
    log_evidence = log_evidence_regression(X, y)
    XtX, Xty, yty = (torch.as_tensor(a) for a in (X.T @ X, X.T @ y, np.array(y @ y)))
    prior_w, prior_tau = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0), dist.Gamma(
        torch.tensor(1.0, dtype=torch.float64), 1.0)

    def log_joint(latents, m):
        w = latents["w"].reshape(m, D).double()
        tau = latents["tau"].reshape(m).double()
        sq_resid = yty - 2 * w @ Xty + ((w @ XtX) * w).sum(-1)
        lik = 0.5 * N * (tau.log() - LOG_2PI) - 0.5 * tau * sq_resid
        return lik + prior_w.log_prob(w).sum(-1) + prior_tau.log_prob(tau)

    X64, y64 = torch.as_tensor(X), torch.as_tensor(y)
    return Problem(
        name="regression",
        model=regression_model,
        args64=(X64, y64),
        args32=(X64.float(), y64.float()),
        optimum=optimum,
        log_joint=log_joint,
        svi_model=regression_model,
        guide_model=regression_model,
        svi_loss=Trace_ELBO,
        # the engine's start: q(w) = N(0, I), q(tau) = Gamma(1, 1) (mean 1)
        init_values={"w": torch.zeros(D), "tau": torch.tensor(1.0)},
        handwritten=lambda seed: RegressionCAVI(X, y),
        upper_bound=log_evidence,
        notes=[f"exact log p(y) = {log_evidence:.6f} (quadrature), mean-field optimum {optimum:.6f}",
               f"best fully factorised q(w) (AutoNormal's family, Gamma q(tau)): {diagonal:.6f}, "
               f"{optimum - diagonal:.3f} nats below the optimum"],
    )


def mixture_problem(num_components: int = 5, num_data: int = 10_000) -> Problem:
    x = mixture_data(num_components, num_data)
    N, D = x.shape
    optimum, finals = mixture_optimum(x, num_components)
    x64 = torch.as_tensor(x)
    xx = (x64 * x64).sum(-1)
    prior_w = dist.Dirichlet(torch.ones(num_components, dtype=torch.float64))
    prior_locs = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0)
    model = make_mixture_model(num_components)
    svi_model = config_enumerate(model)

    def log_joint(latents, m):
        w = latents["weights"].reshape(m, num_components).double()
        w = w / w.sum(-1, keepdim=True)
        locs = latents["locs"].reshape(m, num_components, D).double()
        sq = xx[None, :, None] - 2 * torch.einsum("nd,mkd->mnk", x64, locs) + (locs * locs).sum(-1)[:, None, :]
        lik = torch.logsumexp(w.log()[:, None, :] - 0.5 * sq - 0.5 * D * LOG_2PI, -1).sum(-1)
        return lik + prior_w.log_prob(w) + prior_locs.log_prob(locs).sum((-1, -2))

    reached = sum(abs(f - optimum) < 1e-3 for f in finals)
    return Problem(
        name="mixture",
        model=model,
        args64=(x64,),
        args32=(x64.float(),),
        optimum=optimum,
        log_joint=log_joint,
        svi_model=svi_model,
        guide_model=poutine.block(svi_model, hide=["z"]),
        svi_loss=lambda: TraceEnum_ELBO(max_plate_nesting=1),
        init_values={},  # set once the engine's successful seed is known
        handwritten=lambda seed: MixtureCAVI(x, num_components).init_forgy(seed),
        num_components=num_components,
        notes=[f"mean-field optimum {optimum:.6f}; {reached} of {len(finals)} hand-written starts "
               f"(k-means++ and Forgy seeds 0-{len(finals) // 2 - 1}) reach it"],
    )


# ---------------------------------------------------------------------------- CAVI timing
def first_crossing(rows: List[Tuple[int, float, float]], threshold: float) -> Optional[Tuple[int, float]]:
    """(sweep, seconds) of the first row whose ELBO is at least ``threshold``."""
    for sweep, seconds, elbo in rows:
        if elbo >= threshold:
            return sweep, seconds
    return None


def converged_at(rows, tol: float = 1e-8) -> Optional[Tuple[int, float]]:
    for (_, _, prev), (sweep, seconds, elbo) in zip(rows, rows[1:]):
        if abs(elbo - prev) <= tol * max(1.0, abs(elbo)):
            return sweep, seconds
    return None


def time_engine(problem: Problem, seed: int, max_sweeps: int, tol: float = 1e-8, **options):
    """Sweeps of a fresh ``CAVI`` (tracing included in the first); rows (sweep, CPU s, ELBO)."""
    pyro.clear_param_store()
    rows = []
    start = time.process_time()
    cavi = CAVI(problem.model, seed=seed, **options)
    for i in range(max_sweeps):
        elbo = -cavi.step(*problem.args64)
        rows.append((i + 1, time.process_time() - start, elbo))
        if len(rows) > 1 and abs(elbo - rows[-2][2]) <= tol * max(1.0, abs(elbo)):
            break
    return rows, cavi


def time_handwritten(problem: Problem, seed: int, max_sweeps: int, tol: float = 1e-8):
    """Same for the hand-written loop (its set-up, e.g. ``XᵀX``, included in the first sweep)."""
    rows = []
    start = time.process_time()
    fit = problem.handwritten(seed)
    for i in range(max_sweeps):
        elbo = fit.step()
        rows.append((i + 1, time.process_time() - start, elbo))
        if len(rows) > 1 and abs(elbo - rows[-2][2]) <= tol * max(1.0, abs(elbo)):
            break
    return rows


@dataclass
class CaviTiming:
    seed: int
    engine: List[list]
    hand: List[list]
    final_elbo: float

    def summary(self, problem: Problem) -> Dict[str, Dict[str, Optional[Tuple[int, float]]]]:
        out = {}
        for label, runs in (("engine", self.engine), ("hand", self.hand)):
            marks = {}
            for key, thr in problem.thresholds.items():
                hits = [first_crossing(r, thr) for r in runs]
                marks[key] = None if None in hits else (hits[0][0], statistics.median(h[1] for h in hits))
            conv = [converged_at(r) for r in runs]
            marks["1e-8"] = None if None in conv else (conv[0][0], statistics.median(c[1] for c in conv))
            marks["first sweep"] = (1, statistics.median(r[0][1] for r in runs))
            per_sweep = [(r[-1][1] - r[0][1]) / (len(r) - 1) for r in runs if len(r) > 1]
            marks["per sweep"] = (0, statistics.median(per_sweep)) if per_sweep else None
            out[label] = marks
        return out


def cavi_timing(problem: Problem, seed: int, repeats: int, max_sweeps: int, **options) -> CaviTiming:
    time_engine(problem, seed, 2, **options)  # untimed warm-up: the process's first trace is slower
    engine, hand = [], []
    for _ in range(repeats):
        rows, cavi = time_engine(problem, seed, max_sweeps, **options)
        engine.append(rows)
        hand.append(time_handwritten(problem, seed, max_sweeps))
    e, h = engine[0], hand[0]
    n = min(len(e), len(h))
    gap = max(abs(a[2] - b[2]) / abs(b[2]) for a, b in zip(e[:n], h[:n]))
    if gap > 1e-8 or len(e) != len(h):
        print(f"WARNING {problem.name}: engine and hand-written ELBO traces differ "
              f"(max relative {gap:.2e}, sweeps {len(e)} vs {len(h)})")
    return CaviTiming(seed, engine, hand, e[-1][2])


def mixture_engine_seeds(problem: Problem, num_seeds: int, repeats: int, quick: bool):
    """Two questions for the mixture, whose CAVI optimum depends on the start.

    1. The engine with its default initialisation: run seeds 0, 1, ... once each; report
       what each reaches, and the cost of restarting in seed order until a run gets within
       0.1% / 1 nat (failed runs count in full, to convergence).
    2. The same start for everyone: the first Forgy seed whose hand-written run reaches the
       optimum; the engine with ``init="forgy"`` on that seed is timed against the
       hand-written loop (identical ELBO traces), and SVI starts from the same K points.
    """
    time_engine(problem, 0, 1)  # untimed warm-up: the process's first trace is slower
    scan = []
    for seed in range(num_seeds):
        rows, _ = time_engine(problem, seed, 3000)
        scan.append((seed, rows))
        if quick and rows[-1][2] >= problem.optimum - 1.0:
            break
    print("\n| engine seed (default init) | final ELBO − optimum | sweeps to 1e-8 | CPU to 1e-8 | to 1 nat |")
    print("|---|---|---|---|---|")
    for seed, rows in scan:
        print(f"| {seed} | {rows[-1][2] - problem.optimum:+.4f} | {len(rows)} | {fmt_seconds(rows[-1][1])} | "
              f"{fmt_mark(first_crossing(rows, problem.thresholds['1 nat']))} |")
    reached = sum(first_crossing(rows, problem.thresholds["1 nat"]) is not None for _, rows in scan)
    print(f"\n- {reached} of {len(scan)} engine seeds (default init) reach the optimum")
    paths: Dict[str, Dict[str, Optional[float]]] = {"engine default init, seed 0": {},
                                                    "engine default init, seeds 0, 1, ... until one gets there": {}}
    for key, thr in problem.thresholds.items():
        hit = first_crossing(scan[0][1], thr)
        paths["engine default init, seed 0"][key] = hit[1] if hit else None
        spent = 0.0
        for seed, rows in scan:
            hit = first_crossing(rows, thr)
            if hit is not None:
                paths["engine default init, seeds 0, 1, ... until one gets there"][key] = spent + hit[1]
                break
            spent += rows[-1][1]
    kpp = []
    for _ in range(repeats):
        start = time.process_time()
        fit = MixtureCAVI(problem.args64[0].numpy(), problem.num_components).init_kmeans_pp(0)
        rows = []
        for i in range(3000):
            rows.append((i + 1, time.process_time() - start, fit.step()))
            if len(rows) > 1 and abs(rows[-1][2] - rows[-2][2]) <= 1e-8 * abs(rows[-1][2]):
                break
        kpp.append(rows)
    hit = first_crossing(kpp[0], problem.thresholds["1 nat"])
    med = statistics.median(first_crossing(r, problem.thresholds["1 nat"])[1] for r in kpp) if hit else None
    print(f"- hand-written loop from k-means++ seeds (seed 0): "
          f"{fmt_mark((hit[0], med)) if hit else 'does not reach 1 nat'}; 1e-8 after {len(kpp[0])} sweeps "
          f"(median of {repeats})")
    seed = next((s for s in range(100) if problem.handwritten(s).run(3000, 1e-8)[-1] >= problem.optimum - 1.0), 0)
    print(f"- same start for all: Forgy seed {seed} (the first whose hand-written run reaches the optimum); "
          f"engine with init='forgy'")
    timing = cavi_timing(problem, seed, repeats, 3000, init="forgy")
    x32 = problem.args32[0]
    k = problem.num_components
    points = torch.as_tensor(MixtureCAVI(problem.args64[0].numpy(), k).forgy_points(seed))
    problem.init_values = {"locs": x32[points].clone(), "weights": torch.full((k,), 1.0 / k)}
    return timing, paths


# ---------------------------------------------------------------------------- SVI
def estimate_elbo(problem: Problem, guide, num_particles: int, chunk: int = 128) -> Tuple[float, float]:
    """Monte Carlo ELBO of ``guide`` (mean and standard error): guide draws vectorised under a
    particle plate; ``log p`` in float64 from :attr:`Problem.log_joint`."""
    values = []
    with torch.no_grad():
        for start in range(0, num_particles, chunk):
            m = min(chunk, num_particles - start)
            with pyro.plate("_particles", m, dim=-2):
                tr = poutine.trace(guide).get_trace(*problem.args32)
            log_q = torch.zeros(m, dtype=torch.float64)
            latents = {}
            for name, site in tr.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                    continue
                lp = site["fn"].log_prob(site["value"])
                log_q = log_q + lp.movedim(-2, 0).reshape(m, -1).sum(-1).double()
                if not site["infer"].get("is_auxiliary"):
                    latents[name] = site["value"]
            values.append(problem.log_joint(latents, m) - log_q)
    v = torch.cat(values)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


@dataclass
class OptimSpec:
    lr: float
    final_lr: Optional[float] = None  # exponential decay from lr to final_lr over max_steps

    def make(self, max_steps: int):
        if self.final_lr is None:
            return pyro.optim.Adam({"lr": self.lr})
        decay = (self.final_lr / self.lr) ** (1.0 / max_steps)
        return pyro.optim.ClippedAdam({"lr": self.lr, "lrd": decay, "clip_norm": 1e30})

    def __str__(self):
        return f"{self.lr:g}" if self.final_lr is None else f"{self.lr:g} → {self.final_lr:g} (exp. decay)"


GUIDES = {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal}


def run_svi(problem: Problem, guide_name: str, optim: OptimSpec, max_steps: int, max_seconds: float,
            eval_every: int, screen_particles: int = 64, confirm_particles: int = 1024) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    init = {k: v.clone() for k, v in problem.init_values.items()}  # Adam updates init tensors in place
    guide = GUIDES[guide_name](problem.guide_model, init_loc_fn=init_to_value(values=init))
    svi = SVI(problem.svi_model, guide, optim.make(max_steps), problem.svi_loss())
    crossings: Dict[str, Optional[tuple]] = {k: None for k in problem.thresholds}
    trace, clock, step, status = [], 0.0, 0, "cap"
    while step < max_steps:
        t0 = time.process_time()
        loss = svi.step(*problem.args32)
        clock += time.process_time() - t0
        step += 1
        if not math.isfinite(loss):
            status = "diverged (non-finite loss)"
            break
        if step % eval_every and step != max_steps and clock < max_seconds:
            continue
        est, se = estimate_elbo(problem, guide, screen_particles)
        trace.append((step, clock, est))
        if problem.upper_bound is not None and est > problem.upper_bound + 5 * se + 1.0:
            status = f"breakdown (estimate {est:.1f} above log p = {problem.upper_bound:.1f})"
            break
        for key, thr in problem.thresholds.items():
            if crossings[key] is None and est >= thr:
                big, big_se = estimate_elbo(problem, guide, confirm_particles)
                if big >= thr:
                    crossings[key] = (step, clock, big, big_se)
        if all(crossings.values()):
            status = "reached"
            break
        if clock >= max_seconds:
            status = "time cap"
            break
    final, final_se = (float("nan"), float("nan")) if status.startswith(("diverged", "breakdown")) else \
        estimate_elbo(problem, guide, confirm_particles)
    return dict(guide=guide_name, optim=str(optim), crossings=crossings, steps=step, seconds=clock,
                final=final, final_se=final_se, status=status, trace=trace)


def warm_up(problem: Problem) -> None:
    """The first SVI steps in a process are slow (lazy initialisation): take them untimed."""
    for name in GUIDES:
        pyro.clear_param_store()
        init = {k: v.clone() for k, v in problem.init_values.items()}
        guide = GUIDES[name](problem.guide_model, init_loc_fn=init_to_value(values=init))
        svi = SVI(problem.svi_model, guide, pyro.optim.Adam({"lr": 1e-3}), problem.svi_loss())
        for _ in range(20):
            svi.step(*problem.args32)
        estimate_elbo(problem, guide, 64)


# ---------------------------------------------------------------------------- reporting
def fmt_mark(mark: Optional[Tuple[int, float]], steps_word: str = "sweeps") -> str:
    if mark is None:
        return "not reached"
    n, s = mark
    return f"{n:,} {steps_word} / {fmt_seconds(s)}"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def cavi_table(problem: Problem, timing: CaviTiming, label: str) -> str:
    s = timing.summary(problem)
    lines = [f"| {problem.name} {label} | to 0.1% | to 1 nat | to 1e-8 rel. change | first sweep | per later sweep |",
             "|---|---|---|---|---|---|"]
    for who, name in (("engine", "pyro_cavi.CAVI"), ("hand", "hand-written NumPy")):
        m = s[who]
        per = fmt_seconds(m["per sweep"][1]) if m["per sweep"] else "–"
        lines.append(f"| {name} | {fmt_mark(m['0.1%'])} | {fmt_mark(m['1 nat'])} | {fmt_mark(m['1e-8'])} | "
                     f"{fmt_seconds(m['first sweep'][1])} | {per} |")
    ratio = []
    for key in ("0.1%", "1 nat", "1e-8", "per sweep"):
        e, h = s["engine"][key], s["hand"][key]
        ratio.append(f"{e[1] / h[1]:.1f}×" if e and h else "–")
    lines.append(f"| engine / hand-written time | {ratio[0]} | {ratio[1]} | {ratio[2]} | "
                 f"{s['engine']['first sweep'][1] / s['hand']['first sweep'][1]:.1f}× | {ratio[3]} |")
    return "\n".join(lines)


def svi_table(problem: Problem, results: List[dict]) -> str:
    lines = ["| guide | lr | within 0.1% | within 1 nat | steps run / CPU s | final ELBO − optimum | status |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = []
        for key in problem.thresholds:
            c = r["crossings"][key]
            cells.append("not reached" if c is None else f"{c[0]:,} steps / {fmt_seconds(c[1])}")
        gap = "–" if math.isnan(r["final"]) else f"{r['final'] - problem.optimum:+.2f} ± {r['final_se']:.2f}"
        lines.append(f"| {r['guide']} | {r['optim']} | {cells[0]} | {cells[1]} | {r['steps']:,} / {r['seconds']:.1f} | "
                     f"{gap} | {r['status']} |")
    return "\n".join(lines)


def speedups(problem: Problem, timing: CaviTiming, results: List[dict]) -> str:
    s = timing.summary(problem)
    lines = ["| target | best SVI setting | SVI CPU s | CAVI engine | speed-up | hand-written | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for key in problem.thresholds:
        hits = [(r["crossings"][key][1], r) for r in results if r["crossings"][key] is not None]
        e, h = s["engine"][key], s["hand"][key]
        if not hits or e is None:
            lines.append(f"| {key} | none reached | – | {fmt_mark(e)} | – | {fmt_mark(h)} | – |")
            continue
        t, r = min(hits, key=lambda p: p[0])
        lines.append(f"| {key} | {r['guide']}, lr {r['optim']} | {t:.2f} s | {fmt_seconds(e[1])} | "
                     f"{t / e[1]:,.0f}× | {fmt_seconds(h[1])} | {t / h[1]:,.0f}× |")
    return "\n".join(lines)


def restart_speedup(problem: Problem, label: str, path: Dict[str, Optional[float]], results: List[dict]) -> str:
    lines = [f"| target | best SVI CPU s | CAVI: {label} | speed-up |", "|---|---|---|---|"]
    for key in problem.thresholds:
        hits = [r["crossings"][key][1] for r in results if r["crossings"][key] is not None]
        svi = f"{min(hits):.2f} s" if hits else "none reached"
        c = path.get(key)
        cavi = fmt_seconds(c) if c is not None else "not reached"
        ratio = f"{min(hits) / c:,.1f}×" if hits and c is not None else "–"
        lines.append(f"| {key} | {svi} | {cavi} | {ratio} |")
    return "\n".join(lines)


def plot(problem: Problem, timing: CaviTiming, results: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for rows, label, style in ((timing.engine[0], "CAVI (pyro_cavi)", "o-"), (timing.hand[0], "hand-written CAVI", "s--")):
        ax.plot([r[1] for r in rows], [problem.optimum - r[2] for r in rows], style, ms=3, label=label)
    for r in results:
        if r["trace"]:
            ax.plot([t[1] for t in r["trace"]], [problem.optimum - t[2] for t in r["trace"]], lw=1,
                    label=f"SVI {r['guide'].replace('Auto', '')} lr {r['optim']}")
    for key, thr in problem.thresholds.items():
        ax.axhline(problem.optimum - thr, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -10.0))
    ax.set_xlabel("CPU seconds (SVI: svi.step only)")
    ax.set_ylabel("optimum − ELBO (nats)")
    ax.set_title(f"{problem.name}: mean-field optimum {problem.optimum:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one SVI setting per problem, short caps (about 2 minutes)")
    p.add_argument("--max-steps", type=int, default=20_000, help="cap on SVI steps per setting")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap on svi.step CPU seconds per setting")
    p.add_argument("--repeats", type=int, default=5, help="CAVI timing repeats (medians reported)")
    p.add_argument("--problems", nargs="+", default=["regression", "mixture"], choices=["regression", "mixture"])
    p.add_argument("--engine-seeds", type=int, default=10, help="mixture: CAVI seeds tried")
    p.add_argument("--plot-dir", default=str(RESULTS), help="where the PNGs go ('' for none)")
    args = p.parse_args(argv)
    if args.quick:
        args.max_steps, args.max_seconds, args.repeats = min(args.max_steps, 3000), min(args.max_seconds, 10.0), 1
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, numpy {np.__version__}, one thread; "
          f"SVI: float32, 1 particle, CPU seconds of svi.step; CAVI: float64")

    grids = {
        "regression": [("AutoNormal", OptimSpec(0.003)), ("AutoNormal", OptimSpec(0.01)),
                       ("AutoMultivariateNormal", OptimSpec(0.003)), ("AutoMultivariateNormal", OptimSpec(0.01)),
                       ("AutoMultivariateNormal", OptimSpec(0.01, 1e-4))],
        "mixture": [("AutoNormal", OptimSpec(0.01)), ("AutoNormal", OptimSpec(0.03)),
                    ("AutoMultivariateNormal", OptimSpec(0.01)), ("AutoMultivariateNormal", OptimSpec(0.03))],
    }
    if args.quick:
        grids = {"regression": [("AutoMultivariateNormal", OptimSpec(0.01, 1e-4))],
                 "mixture": [("AutoNormal", OptimSpec(0.03))]}
    eval_every = {"regression": 100, "mixture": 25}

    for name in args.problems:
        t_start = time.perf_counter()
        problem = regression_problem() if name == "regression" else mixture_problem()
        print(f"\n## {name}\n")
        for note in problem.notes:
            print(f"- {note}")
        paths = {}
        if name == "regression":
            timing = cavi_timing(problem, 0, args.repeats, 200)
        else:
            timing, paths = mixture_engine_seeds(problem, args.engine_seeds, args.repeats, args.quick)
        print()
        print(cavi_table(problem, timing, f"(seed {timing.seed}{'' if name == 'regression' else ', forgy'}, "
                                          f"medians of {args.repeats})"))
        warm_up(problem)
        results = []
        for guide_name, optim in grids[name]:
            r = run_svi(problem, guide_name, optim, args.max_steps, args.max_seconds, eval_every[name])
            results.append(r)
            print(f"  SVI {guide_name} lr {optim}: {r['status']} after {r['steps']} steps, {r['seconds']:.1f} s; "
                  f"crossings {[(k, v[:2] if v else None) for k, v in r['crossings'].items()]}", flush=True)
        print()
        print(svi_table(problem, results))
        print()
        print(speedups(problem, timing, results))
        for label, path in paths.items():
            print()
            print(restart_speedup(problem, label, path, results))
        if args.plot_dir:
            Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
            path = Path(args.plot_dir) / f"cavi_vs_svi_{name}.png"
            plot(problem, timing, results, path)
            print(f"\nfigure: {path}")
        print(f"\n({name}: {time.perf_counter() - t_start:.0f} s wall)")


if __name__ == "__main__":
    main()
