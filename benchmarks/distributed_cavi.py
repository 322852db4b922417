"""Data-parallel CAVI with torch.distributed: speed-up with 1 and 2 processes, and a projection.

Each rank holds N / R rows of a Bayesian linear regression with a local Gaussian offset
per row, computes the expected sufficient statistics of its shard (the gradients of the
expected log joint with respect to the global factors' mean parameters) and all-reduces
them. We measure, per sweep, the compute time of one rank and the time and size of the
all-reduces, then project R = 8 and 64 as  T(R) = compute(N / R) + allreduce(R), with a
ring all-reduce costing 2 (R - 1) / R · bytes / bandwidth plus 2 (R - 1) latencies, using
the bandwidth and latency measured here between two processes on one machine (gloo over
loopback): a lower bound on what a network adds.

    python benchmarks/distributed_cavi.py            # N = 400,000, D = 50
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI


def model(X, y):
    d = X.shape[1]
    w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=X.dtype), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
    with pyro.plate("data", X.shape[0]):
        u = pyro.sample("u", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 0.3))
        pyro.sample("y", dist.Normal(X @ w + u, tau.rsqrt()), obs=y)


def shard(n, d, rank, world, seed=0):
    """Rows [rank N/R, (rank+1) N/R) of one data set (the same data for every world size)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.linspace(-1, 1, d, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    rows = slice(rank * (n // world), (rank + 1) * (n // world))
    return X[rows].clone(), y[rows].clone()


class _TimedAllReduce:
    """Wraps torch.distributed.all_reduce to add up its time and bytes."""

    def __init__(self):
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        self._orig = tdist.all_reduce

    def __enter__(self):
        def timed(t, *a, **k):
            start = time.perf_counter()
            out = self._orig(t, *a, **k)
            self.seconds += time.perf_counter() - start
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return out

        tdist.all_reduce = timed
        return self

    def __exit__(self, *exc):
        tdist.all_reduce = self._orig


def worker(rank, world, n, d, sweeps, init_file, out):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    X, y = shard(n, d, rank, world)
    cavi = CAVI(model, seed=0, shard_plate="data")
    cavi.step(X, y)  # trace + first sweep (not timed)
    tdist.barrier()
    with _TimedAllReduce() as ar:
        start = time.perf_counter()
        for _ in range(sweeps):
            cavi.step(X, y)
        total = time.perf_counter() - start
    torch.save({"total": total / sweeps, "allreduce": ar.seconds / sweeps, "bytes": ar.bytes / sweeps,
                "calls": ar.calls / sweeps, "elbo": cavi.elbo_trace[-1]}, os.path.join(out, f"r{world}_{rank}.pt"))
    tdist.destroy_process_group()


def main(n, d, sweeps):
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.spawn(worker, args=(world, n, d, sweeps, os.path.join(tmp, f"init{world}"), tmp), nprocs=world, join=True)
            parts = [torch.load(os.path.join(tmp, f"r{world}_{r}.pt")) for r in range(world)]
            results[world] = {k: max(p[k] for p in parts) if k != "elbo" else parts[0][k] for k in parts[0]}
    one, two = results[1], results[2]
    compute_per_row = (one["total"] - one["allreduce"]) / n
    # a 2-process all-reduce of the measured size: bytes / (time / 2 latencies) gives a crude link model
    calls = two["calls"]
    latency = two["allreduce"] / max(calls, 1) / 2
    bandwidth = max(two["bytes"] / max(two["allreduce"], 1e-9), 1.0)
    print(f"N = {n}, D = {d}, {sweeps} timed sweeps, torch threads 1 per process, gloo over loopback\n")
    print("| processes | s / sweep (slowest rank) | of which all-reduce | all-reduce MiB / sweep | calls / sweep | ELBO |")
    print("|---:|---:|---:|---:|---:|---:|")
    for world, r in results.items():
        print(f"| {world} | {r['total']:.4f} | {r['allreduce']:.4f} | {r['bytes'] / 2**20:.3f} | {r['calls']:.0f} | {r['elbo']:.4f} |")
    print(f"\nspeed-up with 2 processes: {one['total'] / two['total']:.2f}x")
    print("\nprojection  T(R) = compute(N/R) + 2(R-1) latency·calls + 2(R-1)/R · bytes / bandwidth")
    print("| R | projected s / sweep | projected speed-up |")
    print("|---:|---:|---:|")
    for R in (2, 8, 64):
        t = compute_per_row * n / R + calls * (2 * (R - 1) * latency) + 2 * (R - 1) / R * two["bytes"] / bandwidth
        print(f"| {R} | {t:.4f} | {one['total'] / t:.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400_000)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--sweeps", type=int, default=5)
    a = parser.parse_args()
    main(a.n, a.d, a.sweeps)
