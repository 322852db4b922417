"""Time of one stochastic CAVI step: the cost of re-tracing each minibatch.

Every step of stochastic CAVI sees a new minibatch, so the model is traced again. This
script measures the CPU time per step on three models (Bayesian linear regression,
logistic regression with Pólya-Gamma augmentation, a Gaussian mixture with local
responsibilities), with the minibatches given by ``subsample=idx`` from data in memory, so
that only the engine is timed, for

* ``full analysis``: this tree with ``cavi.reuse_structure = False`` (prior trace, symbolic
  trace and conjugacy analysis of every minibatch);
* ``cached structure``: this tree as it is (the symbolic trace only, checked against the
  cached analysis);
* optionally ``baseline``: another checkout of pyro_cavi (``--baseline DIR``, e.g. the
  commit before this change extracted with ``git archive``).

The variants run in separate processes, interleaved over ``--rounds`` rounds, so a change
in the machine's load hits all of them alike; the table gives the median over rounds.

    python benchmarks/stochastic_step_time.py
    git archive 7dd3f9b | tar -x -C /tmp/base && python benchmarks/stochastic_step_time.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(model_name: str, batch: int, steps: int, reuse: bool) -> dict:
    import torch

    import pyro
    import pyro.distributions as dist

    from pyro_cavi import CAVI

    torch.set_num_threads(1)
    f64 = torch.float64
    n, d, k = 100_000, 20, 5
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=f64)
    w0 = torch.randn(d, generator=g, dtype=f64)
    y = X @ w0 + 0.5 * torch.randn(n, generator=g, dtype=f64)
    yb = torch.bernoulli(torch.sigmoid(X @ w0), generator=g)
    centres = 3 * torch.randn(k, d, generator=g, dtype=f64)
    Y = centres[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=f64)

    def linear(idx):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=f64), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=f64), 1.0))
        with pyro.plate("data", n, subsample=idx):
            pyro.sample("y", dist.Normal(X[idx] @ w, tau.rsqrt()), obs=y[idx])

    def logistic(idx):
        w = pyro.sample("w", dist.Normal(torch.zeros(d, dtype=f64), 1.0).to_event(1))
        with pyro.plate("data", n, subsample=idx):
            pyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=yb[idx])

    def mixture(idx):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(k, dtype=f64)))
        with pyro.plate("comp", k):
            locs = pyro.sample("locs", dist.Normal(torch.zeros(d, dtype=f64), 10.0).to_event(1))
        with pyro.plate("data", n, subsample=idx):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=Y[idx])

    model = {"linear": linear, "logistic": logistic, "mixture": mixture}[model_name]
    batches = [torch.randperm(n, generator=g)[:batch] for _ in range(steps + 1)]
    cavi = CAVI(model, seed=0)
    if hasattr(cavi, "reuse_structure"):
        cavi.reuse_structure = reuse
    cavi.step(batches[0])  # the first trace and initialisation: not timed
    cpu, wall = time.process_time(), time.perf_counter()
    for idx in batches[1:]:
        loss = cavi.step(idx)
    return {"cpu": (time.process_time() - cpu) / steps, "wall": (time.perf_counter() - wall) / steps, "loss": loss}


def run_variant(path: str, model: str, batch: int, steps: int, reuse: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", model, str(batch), str(steps), str(int(reuse))],
        env=env, check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(batches, steps: int, rounds: int, baseline: str | None) -> None:
    variants = [("full analysis", ROOT, False), ("cached structure", ROOT, True)]
    if baseline:
        variants.insert(0, ("baseline", baseline, False))
    load = os.getloadavg()
    results = {}
    for r in range(rounds):
        for model in ("linear", "logistic", "mixture"):
            for batch in batches:
                for name, path, reuse in variants:
                    results.setdefault((model, batch, name), []).append(run_variant(path, model, batch, steps, reuse))
    after = os.getloadavg()
    print(f"{steps} timed steps per run, median of {rounds} interleaved rounds; N = 100,000 in memory, D = 20, "
          f"mixture K = 5; torch threads 1; load average before {load[0]:.2f}, after {after[0]:.2f}\n")
    names = [v[0] for v in variants]
    print("| model | B | " + " | ".join(f"{n} ms CPU / step" for n in names) + " | speed-up (CPU) |")
    print("|---|---:|" + "---:|" * (len(names) + 1))
    for model in ("linear", "logistic", "mixture"):
        for batch in batches:
            med = [statistics.median(x["cpu"] for x in results[(model, batch, n)]) * 1e3 for n in names]
            print(f"| {model} | {batch} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {med[0] / med[-1]:.2f}x |")
    # the variants of this tree fit the same minibatches: their last losses agree
    for model in ("linear", "logistic", "mixture"):
        for batch in batches:
            a = results[(model, batch, "full analysis")][0]["loss"]
            b = results[(model, batch, "cached structure")][0]["loss"]
            assert abs(a - b) <= 1e-9 * abs(a), (model, batch, a, b)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        m, b, s, reuse = sys.argv[2:6]
        print(json.dumps(worker(m, int(b), int(s), bool(int(reuse)))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="path of another pyro_cavi checkout to time as well")
    a = parser.parse_args()
    main(a.batch, a.steps, a.rounds, a.baseline)
