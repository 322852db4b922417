"""Circle toy of McNamara, Loper & Regier (NeurIPS 2024), a likelihood-free simulator.

    θ ~ Uniform[0, 2π),  z ~ N(0, 0.5²),  x = (cos(θ + z), sin(θ + z)).

The observation is a deterministic function of (θ, z) (a ``Delta`` site), so the
model has no likelihood in ℝ², yet ForwardKL only needs simulations. The exact
posterior is the wrapped normal p(θ | x) = Σ_k N(atan2(x₂, x₁) - θ + 2πk; 0, 0.5²).

Run ``python models/circle.py`` for a short ForwardKL fit.
"""

import math

import torch

import pyro
import pyro.distributions as dist

NOISE_SD = 0.5


def model(x=None):
    theta = pyro.sample("theta", dist.Uniform(0.0, 2 * math.pi))
    z = pyro.sample("z", dist.Normal(0.0, NOISE_SD))
    point = torch.stack([torch.cos(theta + z), torch.sin(theta + z)], dim=-1)
    return pyro.sample("x", dist.Delta(point, event_dim=1), obs=x)


def exact_log_posterior(theta: torch.Tensor, x: torch.Tensor, num_wraps: int = 4) -> torch.Tensor:
    """log p(θ | x): the wrapped-normal density of atan2(x) - θ (θ is uniform on the circle)."""
    angle = torch.atan2(x[..., 1], x[..., 0])
    wraps = 2 * math.pi * torch.arange(-num_wraps, num_wraps + 1, dtype=theta.dtype)
    diff = (angle - theta).unsqueeze(-1) + wraps
    return torch.logsumexp(dist.Normal(0.0, NOISE_SD).log_prob(diff), dim=-1)


if __name__ == "__main__":
    from pyro_cavi.forward_kl import AmortisedPosterior, ForwardKL, NTKMLP, VonMisesHead

    pyro.set_rng_seed(0)
    guide = AmortisedPosterior(NTKMLP(2, 2, width=256), {"theta": VonMisesHead()})
    fit = ForwardKL(model, guide, pyro.optim.Adam({"lr": 1e-3}), num_simulations=256, marginalise=["z"])
    x_obs = torch.tensor([0.0, 1.0])
    for step in range(1001):
        loss = fit.step(x_obs)
        if step % 250 == 0:
            print(f"step {step:4d}  loss {loss:.3f}")
    q = fit.posterior(x_obs)["theta"]
    print(f"q(θ | x=(0, 1)): loc {q.loc.item() % (2 * math.pi):.3f} (exact mode π/2 = {math.pi / 2:.3f}), "
          f"concentration {q.concentration.item():.2f}")
