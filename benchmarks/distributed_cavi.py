"""Data-parallel CAVI with torch.distributed: speed-up with 1 and 2 processes, and a projection.

Each rank holds N / R rows of a Bayesian linear regression with a local Gaussian offset
per row, computes the expected sufficient statistics of its shard (the gradients of the
expected log joint with respect to the global factors' mean parameters) and all-reduces
them. We measure, per sweep, the CPU time of each rank, the time and size of the
all-reduces, and bare all-reduces of a small and an 8 MiB message, then project R ranks as

    T(R) = a + b · N / R + calls · allreduce(R, bytes per call),

with the fixed cost a per sweep (Python, tracing-free bookkeeping, the global factors'
updates) and the cost b per row fitted to the 1- and 2-process CPU times, and an
all-reduce costing hops · latency + 2 (R - 1) / R · bytes / bandwidth, where a ring has
2 (R - 1) hops and a tree (recursive doubling) 2 log2 R. The latency and bandwidth are those
measured here between two processes on one machine (gloo over loopback): a lower bound on
what a network adds.

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
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(sweeps):
            cavi.step(X, y)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    # the all-reduce alone (no waiting for a slower rank): 50 calls of the mean message size
    msg = torch.zeros(max(1, int(ar.bytes / max(ar.calls, 1) / 8)), dtype=torch.float64)
    tdist.barrier()
    start = time.perf_counter()
    for _ in range(50):
        tdist.all_reduce(msg)
    bare = (time.perf_counter() - start) / 50
    big = torch.zeros(2**20, dtype=torch.float64)  # 8 MiB: the link's bandwidth
    tdist.barrier()
    start = time.perf_counter()
    for _ in range(5):
        tdist.all_reduce(big)
    big_s = (time.perf_counter() - start) / 5
    torch.save({"bare": bare, "big": big_s, "total": total / sweeps, "cpu": cpu / sweeps, "allreduce": ar.seconds / sweeps, "bytes": ar.bytes / sweeps,
                "calls": ar.calls / sweeps, "elbo": cavi.elbo_trace[-1]}, os.path.join(out, f"r{world}_{rank}.pt"))
    tdist.destroy_process_group()


def main(n, d, sweeps):
    results = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.spawn(worker, args=(world, n, d, sweeps, os.path.join(tmp, f"init{world}"), tmp), nprocs=world, join=True)
            parts = [torch.load(os.path.join(tmp, f"r{world}_{r}.pt")) for r in range(world)]
            results[world] = {k: max(p[k] for p in parts) if k != "elbo" else parts[0][k] for k in parts[0]}
    load_after = os.getloadavg()
    report(results, n, d, sweeps, load_before, load_after)


def report(results, n, d, sweeps, load_before, load_after):
    one, two = results[1], results[2]
    calls = two["calls"]
    # a 2-process all-reduce is 2 hops: latency per hop = (small message call) / 2;
    # bandwidth from an 8 MiB all-reduce, which moves 2 (R-1)/R = 1 message's bytes per rank
    latency = two["bare"] / 2
    bandwidth = 8 * 2**20 / max(two["big"] - two["bare"], 1e-9)
    # per-rank compute (CPU seconds; a rank blocked in an all-reduce uses little CPU): a + b * rows,
    # from the runs on N and N / 2 rows per rank
    c1, c2 = one["cpu"], two["cpu"]
    b = max((c1 - c2) / (n / 2), 0.0)
    a = max(c1 - b * n, 0.0)
    print(f"N = {n}, D = {d}, {sweeps} timed sweeps, torch threads 1 per process, gloo over loopback, "
          f"{os.cpu_count()} cores")
    print(f"load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    print("| processes | wall s / sweep (slowest rank) | CPU s / sweep (busiest rank) | of which all-reduce (wall) "
          "| all-reduce MiB / sweep | calls / sweep | ELBO |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for world, r in results.items():
        print(f"| {world} | {r['total']:.4f} | {r['cpu']:.4f} | {r['allreduce']:.4f} | {r['bytes'] / 2**20:.3f} "
              f"| {r['calls']:.0f} | {r['elbo']:.4f} |")
    print(f"\nspeed-up with 2 processes: wall {one['total'] / two['total']:.2f}x, "
          f"CPU per rank {one['cpu'] / two['cpu']:.2f}x")
    print(f"bare all-reduce between 2 processes: {two['bare'] * 1e3:.3f} ms per call "
          f"(in the sweeps, waiting included: {two['allreduce'] / max(calls, 1) * 1e3:.3f} ms); "
          f"8 MiB all-reduce {two['big'] * 1e3:.1f} ms, i.e. {bandwidth / 2**20:.0f} MiB/s")
    print(f"per-rank compute per sweep: a = {a * 1e3:.1f} ms fixed + b = {b * 1e9:.0f} ns per row")
    print("\nprojection  T(R) = a + b·N/R + calls·(hops·latency + 2(R-1)/R · bytes per call / bandwidth), "
          "ring hops 2(R-1), tree hops 2 log2 R")
    print("| N | R | compute s / sweep | all-reduce s / sweep (ring / tree) | projected s / sweep (ring / tree) "
          "| projected speed-up (ring / tree) |")
    print("|---:|---:|---:|---:|---:|---:|")
    import math

    for rows in (n, 100 * n):
        t1 = a + b * rows
        for R in (1, 2, 8, 64):
            compute = a + b * rows / R
            per_call = 2 * (R - 1) / R * two["bytes"] / calls / bandwidth if R > 1 else 0.0
            ring = calls * (2 * (R - 1) * latency + per_call)
            tree = calls * (2 * math.log2(R) * latency + per_call)
            print(f"| {rows:,} | {R} | {compute:.4f} | {ring:.4f} / {tree:.4f} | {compute + ring:.4f} / {compute + tree:.4f} "
                  f"| {t1 / (compute + ring):.1f}x / {t1 / (compute + tree):.1f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400_000)
    parser.add_argument("--d", type=int, default=50)
    parser.add_argument("--sweeps", type=int, default=5)
    a = parser.parse_args()
    main(a.n, a.d, a.sweeps)
