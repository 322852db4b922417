"""Data-parallel CAVI with torch.distributed (gloo, 2 processes on this machine)."""

import os
import pathlib
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import pyro
import pyro.distributions as dist

from pyro_cavi import CAVI


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(400, generator=g, dtype=torch.float64)
    return X, y


def model(X, y):
    """Regression with a Gamma noise precision and a local Gaussian offset per datum."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=X.dtype), 1.0).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(2.0, dtype=X.dtype), 1.0))
    with pyro.plate("data", X.shape[0]):
        u = pyro.sample("u", dist.Normal(torch.tensor(0.0, dtype=X.dtype), 0.3))
        pyro.sample("y", dist.Normal(X @ w + u, tau.rsqrt()), obs=y)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        X, y = _data()
        shard = slice(rank * 200, (rank + 1) * 200)
        cavi = CAVI(model, seed=0, shard_plate="data")
        losses = [cavi.step(X[shard], y[shard]) for _ in range(15)]
        q = cavi.posterior
        torch.save({"losses": losses, "w": q["w"].mean, "w_cov": q["w"].covariance_matrix,
                    "tau": q["tau"].concentration / q["tau"].rate, "u": q["u"].mean},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.mark.skipif(not tdist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_equal_one_process():
    X, y = _data()
    single = CAVI(model, seed=0, shard_plate="data")  # one process holding every shard
    losses = [single.step(X, y) for _ in range(15)]
    q = single.posterior
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(pathlib.Path(tmp) / "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        parts = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for part in parts:
        assert torch.allclose(torch.tensor(part["losses"]), torch.tensor(losses), rtol=1e-10)
        assert torch.allclose(part["w"], q["w"].mean, rtol=1e-10)
        assert torch.allclose(part["w_cov"], q["w"].covariance_matrix, rtol=1e-9)
        assert torch.allclose(part["tau"], q["tau"].mean, rtol=1e-10)
    assert torch.allclose(torch.cat([parts[0]["u"], parts[1]["u"]]), q["u"].mean, rtol=1e-9, atol=1e-12)


def test_one_process_with_a_shard_plate_is_ordinary_cavi():
    """Without an initialised process group nothing is reduced: the same fixed point as plain CAVI."""
    X, y = _data()
    a, b = CAVI(model, seed=0, shard_plate="data"), CAVI(model, seed=0)
    ra = a.run(X, y, tol=1e-13, progress=False)
    rb = b.run(X, y, tol=1e-13, progress=False)
    assert ra.elbo == pytest.approx(rb.elbo, rel=1e-10)
    assert torch.allclose(a.posterior["w"].mean, b.posterior["w"].mean, rtol=1e-7)
