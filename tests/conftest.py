import pytest
import torch

import pyro
import pyro.distributions as dist

# tiny linear-algebra calls are slowed a thousandfold by OpenMP threads competing for 2 busy cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    old = torch.get_default_dtype()
    yield
    torch.set_default_dtype(old)


def fit(engine, *args, num_steps=200, tol=1e-12, **kwargs):
    """Run CAVI sweeps, asserting that -ELBO never increases, and return the loss trace."""
    losses = []
    for _ in range(num_steps):
        losses.append(engine.step(*args, **kwargs))
        if len(losses) > 1:
            prev, cur = losses[-2], losses[-1]
            assert cur <= prev + 1e-9 * max(1.0, abs(prev)), f"-ELBO increased: {prev} -> {cur}"
            if abs(prev - cur) <= tol * max(1.0, abs(cur)):
                break
    return losses


def gaussian_mixture(num_components: int):
    """A 1-D mixture of ``num_components`` unit-variance Gaussians (the tests' small mixture)."""

    def mixture(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(num_components, dtype=y.dtype)))
        with pyro.plate("components", num_components):
            loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", len(y)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("y", dist.Normal(loc[z], 1.0), obs=y)

    return mixture


three_component_mixture = gaussian_mixture(3)
