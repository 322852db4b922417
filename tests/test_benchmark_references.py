"""The CAVI benchmarks' hand-written references agree with the engine, and their SVI ELBO
estimator with Pyro's own log densities (small instances of benchmarks/cavi_vs_svi.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal, init_to_value
from pyro.poutine.util import site_is_subsample

from pyro_cavi.cavi import CAVI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cavi_vs_svi  # noqa: E402
from handwritten_cavi import (  # noqa: E402
    MixtureCAVI,
    RegressionCAVI,
    log_evidence_regression,
    make_mixture_model,
    mixture_data,
    regression_data,
    regression_model,
)


def engine_trace(model, args, seed, num_sweeps, **kwargs):
    cavi = CAVI(model, seed=seed, **kwargs)
    return np.array([-cavi.step(*args) for _ in range(num_sweeps)])


def test_regression_reference_matches_engine_sweep_by_sweep():
    X, y = regression_data(num_data=300, dim=6, seed=1)
    hand = RegressionCAVI(X, y)
    hand_trace = np.array([hand.step() for _ in range(6)])
    engine = engine_trace(regression_model, (torch.as_tensor(X), torch.as_tensor(y)), 0, 6)
    np.testing.assert_allclose(engine, hand_trace, rtol=1e-8, atol=0)
    # the mean-field optimum is a lower bound on the exact evidence, and close to it here
    log_evidence = log_evidence_regression(X, y)
    assert hand_trace[-1] <= log_evidence + 1e-6
    assert log_evidence - hand_trace[-1] < 0.05


def test_regression_diagonal_reference_is_below_full():
    X, y = regression_data(num_data=300, dim=6, seed=1)
    full = RegressionCAVI(X, y).run(200, 1e-14)[-1]
    diagonal = RegressionCAVI(X, y, diagonal=True).run(200, 1e-14)[-1]
    assert diagonal < full - 1e-3


@pytest.mark.parametrize("seed", [0, 3])
def test_mixture_reference_matches_engine_sweep_by_sweep(seed):
    x = mixture_data(num_components=3, num_data=400, seed=2)
    hand = MixtureCAVI(x, 3).init_forgy(seed)
    hand_trace = np.array([hand.step() for _ in range(8)])
    engine = engine_trace(make_mixture_model(3), (torch.as_tensor(x),), seed, 8, init="forgy")
    np.testing.assert_allclose(engine, hand_trace, rtol=1e-8, atol=0)
    assert np.all(np.diff(hand_trace) >= -1e-9 * np.abs(hand_trace[1:]))


def _guide_draw(problem, guide_cls):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    init = {k: v.clone() for k, v in problem.init_values.items()}
    guide = guide_cls(problem.guide_model, init_loc_fn=init_to_value(values=init))
    guide(*problem.args32)
    trace = poutine.trace(guide).get_trace(*problem.args32)
    values = {name: site["value"].detach().double() for name, site in trace.nodes.items()
              if site["type"] == "sample" and not site_is_subsample(site) and not site["infer"].get("is_auxiliary")}
    return guide, values


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_svi_log_joint_matches_pyro(guide_cls):
    # regression: log p(y, w, tau) from sufficient statistics vs the Pyro model's log density
    problem = cavi_vs_svi.regression_problem(num_data=200, dim=4)
    _, values = _guide_draw(problem, guide_cls)
    expected = poutine.trace(poutine.condition(problem.model, values)).get_trace(*problem.args64).log_prob_sum()
    mine = problem.log_joint({k: v.unsqueeze(0) for k, v in values.items()}, 1)[0]
    assert float(mine) == pytest.approx(float(expected), rel=1e-10)

    # mixture: z marginalised, vs TraceEnum_ELBO's enumeration of the Pyro model
    problem = cavi_vs_svi.mixture_problem(num_components=3, num_data=150)
    x = problem.args32[0]
    problem.init_values = {"locs": x[:3].clone(), "weights": torch.full((3,), 1 / 3)}
    _, values = _guide_draw(problem, guide_cls)
    conditioned = poutine.condition(config_enumerate(problem.model), values)
    expected = -TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda *a: None, *problem.args64)
    mine = problem.log_joint({k: v.unsqueeze(0) for k, v in values.items()}, 1)[0]
    assert float(mine) == pytest.approx(expected, rel=1e-10)


def test_svi_elbo_estimate_matches_pyro_trace_elbo():
    problem = cavi_vs_svi.mixture_problem(num_components=3, num_data=150)
    x = problem.args32[0]
    problem.init_values = {"locs": x[:3].clone(), "weights": torch.full((3,), 1 / 3)}
    guide, _ = _guide_draw(problem, AutoNormal)
    pyro.set_rng_seed(1)
    mean, se = cavi_vs_svi.estimate_elbo(problem, guide, 4096)
    pyro.set_rng_seed(2)
    loss = TraceEnum_ELBO(max_plate_nesting=1)
    draws = np.array([-loss.loss(problem.svi_model, guide, *problem.args32) for _ in range(400)])
    pyro_se = draws.std() / np.sqrt(len(draws))
    assert abs(mean - draws.mean()) < 4 * np.hypot(se, pyro_se)
