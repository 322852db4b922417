r"""Cost of one CAVI sweep against the number of data points (issue 3, "Benchmarks").

Bayesian linear regression (the problem of :mod:`handwritten_cavi`, ``D = 50`` by
default) for ``N`` from 10³ to 10⁶, float64, one thread. Each ``N`` runs in a fresh
subprocess, which reports

* the first ``CAVI.step`` (model tracing and conjugacy analysis included),
* the median CPU time of the later sweeps,
* the peak resident memory added while fitting, over the memory held before the fit
  (data included there): Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, so
  torch's allocations are counted, which ``tracemalloc`` does not see,

and the script fits ``log(time) = a + b log N`` and ``memory = a + b N`` (N ≥ 10⁵) to show
both are linear in ``N``.
Run::

    python benchmarks/cavi_scaling.py                 # N = 10³ ... 10⁶, about 2 minutes
    python benchmarks/cavi_scaling.py --quick         # N = 10³ ... 10⁵
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one BLAS thread (set before importing numpy)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(num_data: int, dim: int, num_sweeps: int) -> dict:
    """One N in this process: fit with CAVI, time each sweep, measure memory."""
    import torch

    from handwritten_cavi import regression_data, regression_model
    from pyro_cavi import CAVI

    torch.set_num_threads(1)
    X, y = regression_data(num_data, dim)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    before = _status_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    cavi = CAVI(regression_model, seed=0)
    times = []
    for _ in range(num_sweeps):
        t0 = time.process_time()
        cavi.step(X, y)
        times.append(time.process_time() - t0)
    peak = _status_kib("VmHWM")
    return dict(N=num_data, D=dim, first=times[0], per_sweep=statistics.median(times[1:]),
                elbo=cavi.elbo_trace[-1], data_mib=X.numel() * 8 / 2**20,
                extra_mib=(peak - before) / 1024, exact_peak=exact_peak)


def fit_slope(ns, ts) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array([r["N"] for r in rows], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2), dpi=90)
    per = np.array([r["per_sweep"] for r in rows])
    axes[0].loglog(ns, per * 1e3, "o-", label="one sweep")
    axes[0].loglog(ns, np.array([r["first"] for r in rows]) * 1e3, "s--", label="first step (with tracing)")
    axes[0].loglog(ns, per[-1] * 1e3 * ns / ns[-1], ":", color="grey", label="∝ N")
    axes[0].set_xlabel("N")
    axes[0].set_ylabel("CPU ms")
    axes[0].legend(fontsize=7)
    axes[1].loglog(ns, [r["extra_mib"] for r in rows], "o-", label="peak extra while fitting")
    axes[1].loglog(ns, [r["data_mib"] for r in rows], ":", color="grey", label="X itself (N·D·8 bytes)")
    axes[1].set_xlabel("N")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"CAVI, linear regression, D = {rows[0]['D']}, float64, one thread", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N up to 10⁵")
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--sweeps", type=int, default=6, help="sweeps per N (the first is reported apart)")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--plot-dir", default=str(RESULTS), help="where the PNG goes ('' for none)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.dim, args.sweeps)))
        return
    sizes = args.sizes or ([1_000, 3_000, 10_000, 30_000, 100_000]
                           + ([] if args.quick else [300_000, 1_000_000]))
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim),
                              "--sweeps", str(args.sweeps)], capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  N = {n:,}: {rows[-1]['per_sweep'] * 1e3:.1f} ms per sweep", file=sys.stderr, flush=True)
    if not all(r["exact_peak"] for r in rows):
        print("(could not reset the peak-RSS counter: memory column is the process's lifetime peak)")
    print(f"\nCAVI sweep cost, linear regression, D = {args.dim}, float64, torch.set_num_threads(1), "
          f"CPU seconds (median of {args.sweeps - 1} sweeps after the first)\n")
    print("| N | first step (with tracing) | one sweep | sweep / N | X (N·D·8 bytes) | peak extra memory while fitting | extra / size of X |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']:,} | {r['first'] * 1e3:.1f} ms | {r['per_sweep'] * 1e3:.1f} ms | "
              f"{r['per_sweep'] / r['N'] * 1e9:.0f} ns | {r['data_mib']:.1f} MiB | {r['extra_mib']:.1f} MiB | "
              f"{r['extra_mib'] / r['data_mib']:.2f} |")
    big = [r for r in rows if r["N"] >= 100_000]
    if len(big) >= 2:
        ns = np.array([r["N"] for r in big], dtype=float)
        slope, offset = np.polyfit(ns, [r["extra_mib"] for r in big], 1)
        per_row = slope * 2**20 / (8 * args.dim)
        print(f"\nN ≥ 10⁵: fitted exponent of time per sweep vs N "
              f"{fit_slope(ns, [r['per_sweep'] for r in big]):.2f}; peak extra memory ≈ {offset:.0f} MiB + "
              f"{per_row:.2f} × (N·D·8 bytes), i.e. O(N·D)")
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        path = Path(args.plot_dir) / "cavi_scaling.png"
        plot(rows, path)
        print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
