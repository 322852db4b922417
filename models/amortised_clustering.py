"""Amortised clustering of McNamara, Loper & Regier (NeurIPS 2024), section 5.

    S ~ N(0, 100²)                                   shift
    Z_k ~ N(μ_k + S, 0.5²),  μ = (-20, -10, 0, 10, 20)   centres, k = 1..5
    x_i ~ (1/5) Σ_k N(Z_k, 0.1²),  i = 1..1000           points (component labels summed out)

The likelihood is invariant to permuting the centres, so the ELBO has one local
optimum per labelling; only the prior's ordering μ_k + S picks the right one.
The observed data set is drawn at S = 100.

Run ``python models/amortised_clustering.py`` to simulate the observed data set.
"""

import torch

import pyro
import pyro.distributions as dist

PRIOR_CENTRES = torch.tensor([-20.0, -10.0, 0.0, 10.0, 20.0])
SHIFT_SD, CENTRE_SD, POINT_SD = 100.0, 0.5, 0.1
TRUE_SHIFT = 100.0


def model(x=None, num_points: int = 1000):
    shift = pyro.sample("shift", dist.Normal(0.0, SHIFT_SD))
    centres = pyro.sample(
        "centres", dist.Normal(PRIOR_CENTRES + shift.unsqueeze(-1), CENTRE_SD).to_event(1)
    )
    weights = dist.Categorical(logits=torch.zeros(len(PRIOR_CENTRES)))
    with pyro.plate("points", num_points):
        return pyro.sample("x", dist.MixtureSameFamily(weights, dist.Normal(centres, POINT_SD)), obs=x)


def observed_data(seed: int = 0, num_points: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A data set drawn at S = 100: (centres, points)."""
    pyro.set_rng_seed(seed)
    conditioned = pyro.poutine.condition(model, data={"shift": torch.tensor(TRUE_SHIFT)})
    trace = pyro.poutine.trace(conditioned).get_trace(None, num_points)
    return trace.nodes["centres"]["value"], trace.nodes["x"]["value"]


if __name__ == "__main__":
    centres, x = observed_data()
    print("true centres:", [round(c, 2) for c in centres.tolist()])
    print("points: n =", x.numel(), " min", round(x.min().item(), 2), " max", round(x.max().item(), 2))
