"""Stochastic CAVI on data that never sit in memory at once: the data-loader pattern.

The model is ordinary Pyro with a subsampled plate, ``pyro.plate("data", n, subsample=idx)``:
the plate has the size of the whole data set, and the minibatch (its row indices ``idx`` and
rows ``X``, ``y``) is handed in by the caller. Pyro scales the minibatch's log densities by
``n / len(idx)``, so ``CAVI.step`` takes one step of stochastic variational inference
(Hoffman et al. 2013): the local factors are fitted to the minibatch and the global factors
take a natural-gradient step of size ``(t + tau) ** -kappa``. Called with every row
(``idx=None``) the same model is fitted by ordinary full-batch CAVI.

The data come from a loader that holds one shard at a time, so memory stays
O(shard size · D) however many rows there are:

* :class:`ShardDir` reads ``.pt`` shards written to a directory (e.g. by a preprocessing job);
* :class:`SeededShards` regenerates shard ``c`` from a seeded RNG whenever it is asked for
  (a synthetic data set of any size that is the same rows on every pass).

Run:  python models/stochastic_data_loader.py          # 200,000 rows in 20 shards on disk
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable, Iterator, Optional, Tuple

import torch

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- loaders
class SeededShards:
    """``n`` rows in shards of ``shard_size``; shard ``c`` is ``make(generator, rows)`` with a
    generator seeded by ``(seed, c)``, so every pass sees the same data."""

    def __init__(self, n: int, shard_size: int, make: Callable[[torch.Generator, int], Tuple[Tensor, ...]], seed: int = 0):
        if n % shard_size:
            raise ValueError(f"n = {n} is not a multiple of shard_size = {shard_size}")
        self.n, self.shard_size, self.make, self.seed = n, shard_size, make, seed

    def __len__(self) -> int:
        return self.n // self.shard_size

    def shard(self, c: int) -> Tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        return self.make(g, self.shard_size)


class ShardDir:
    """Shards saved with ``torch.save`` as ``shard_00000.pt``, ... in ``path``; one is read at a time."""

    def __init__(self, path: str):
        self.path = path
        self.files = sorted(f for f in os.listdir(path) if f.startswith("shard_") and f.endswith(".pt"))
        if not self.files:
            raise ValueError(f"no shard_*.pt files in {path!r}")
        first = self.shard(0)
        self.shard_size = first[0].shape[0]
        self.n = self.shard_size * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def shard(self, c: int) -> Tuple[Tensor, ...]:
        return torch.load(os.path.join(self.path, self.files[c]))

    @staticmethod
    def write(path: str, shards: SeededShards) -> "ShardDir":
        """Write every shard of ``shards`` to ``path`` (one shard in memory at a time)."""
        os.makedirs(path, exist_ok=True)
        for c in range(len(shards)):
            torch.save(shards.shard(c), os.path.join(path, f"shard_{c:05d}.pt"))
        return ShardDir(path)


def minibatches(data, batch: int, generator: torch.Generator, passes: float = 1.0) -> Iterator[Tuple[Tensor, ...]]:
    """Yield ``(idx, *rows)`` minibatches of ``batch`` rows for ``passes`` passes: shards in a
    random order, each shuffled and cut into ``shard_size // batch`` minibatches. ``idx`` are
    the rows' indices in the whole data set (``pyro.plate(..., subsample=idx)``)."""
    if data.shard_size % batch:
        raise ValueError(f"shard_size = {data.shard_size} is not a multiple of batch = {batch}")
    total = int(round(passes * data.n / batch))
    done = 0
    while done < total:
        for c in torch.randperm(len(data), generator=generator).tolist():
            rows = data.shard(c)
            order = torch.randperm(data.shard_size, generator=generator)
            for start in range(0, data.shard_size, batch):
                if done == total:
                    return
                pick = order[start:start + batch]
                yield (c * data.shard_size + pick,) + tuple(t[pick] for t in rows)
                done += 1


# ----------------------------------------------------------------------------- models
def linear_regression(idx: Optional[Tensor], X: Tensor, y: Tensor, n: int):
    """y ~ N(X w, 1/tau), w ~ N(0, I), tau ~ Gamma(1, 1); ``idx`` rows of ``n`` (None: all)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(1.0, dtype=X.dtype), 1.0))
    with pyro.plate("data", n, subsample=idx):
        pyro.sample("y", dist.Normal(X @ w, tau.rsqrt()), obs=y)


def logistic_regression(idx: Optional[Tensor], X: Tensor, y: Tensor, n: int):
    """y ~ Bernoulli(sigmoid(X w)), w ~ N(0, I) (Pólya-Gamma augmented by CAVI)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", n, subsample=idx):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def gaussian_mixture(idx: Optional[Tensor], Y: Tensor, n: int, K: int = 5):
    """K unit-variance Gaussian components; the responsibilities are local to the minibatch."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(K, dtype=Y.dtype)))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(Y.shape[1], dtype=Y.dtype), 10.0).to_event(1))
    with pyro.plate("data", n, subsample=idx):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], 1.0).to_event(1), obs=Y)


def main(n: int, shard_size: int, batch: int, passes: float, d: int) -> None:
    torch.set_num_threads(1)
    w_true = torch.linspace(-1, 1, d, dtype=torch.float64)

    def make(g: torch.Generator, rows: int):
        X = torch.randn(rows, d, generator=g, dtype=torch.float64)
        return X, X @ w_true + 0.5 * torch.randn(rows, generator=g, dtype=torch.float64)

    with tempfile.TemporaryDirectory() as tmp:
        data = ShardDir.write(tmp, SeededShards(n, shard_size, make, seed=0))
        print(f"wrote {len(data)} shards of {data.shard_size} rows to {tmp}")
        cavi = CAVI(linear_regression, seed=0, step_size=(1.0, 0.7))
        start = time.perf_counter()
        for step, (idx, X, y) in enumerate(minibatches(data, batch, torch.Generator().manual_seed(1), passes), 1):
            loss = cavi.step(idx, X, y, data.n)
            if step % 200 == 0:
                print(f"step {step:5d}  minibatch estimate of -ELBO {loss:14.2f}")
    q = cavi.posterior
    print(f"{step} steps ({passes} passes) in {time.perf_counter() - start:.1f} s")
    print("E[w] - w_true:", (q["w"].mean - w_true).abs().max().item(), " E[1/tau]:", float(1 / q["tau"].mean), "(true 0.25)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--passes", type=float, default=1.0)
    parser.add_argument("--d", type=int, default=10)
    a = parser.parse_args()
    main(a.n, a.shard_size, a.batch, a.passes, a.d)
