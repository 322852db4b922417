"""
Cost of one NG-HVI optimiser step against the dimension M of the global parameters (p = 3).

Times the damped natural gradient alone and the whole optimiser step (natural gradient +
clipping + momentum + ADADELTA) against the SG-HVI step (ADADELTA only), on random parameters
and gradients of an AutoLowRankMultivariateNormal guide.  Then times whole ``SVI.step`` calls
(hybrid ELBO + optimiser) of NG-HVI and SG-HVI on the mixed models of models/mixed.py, in
alternating blocks so that both see the same machine load.  Times are CPU seconds of this
process (``time.process_time``, one thread), which time spent waiting for a core on a shared
machine does not inflate.

    python benchmarks/nghvi_scaling.py [--dims 10 100 1000 10000] [--rank 3] [--repeats 20]
"""

import argparse
import pathlib
import sys
import time

import torch
from torch.distributions.transforms import SoftplusTransform

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from models.mixed import deep_mixed_model, linear_random_intercept, simulate_deep_mixed, simulate_linear_random_intercept  # noqa: E402
from pyro_cavi.nghvi import (  # noqa: E402
    GaussianConditional,
    HybridELBO,
    HybridGuide,
    NaturalGradientAdadelta,
    NGHVIOptim,
    SGHVIOptim,
)
from pyro_cavi.nghvi.natural_gradient import paper_natural_gradient  # noqa: E402


def _params(M, p, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(M, generator=g).requires_grad_()
    W = (torch.randn(M, p, generator=g) / p**0.5).requires_grad_()
    u = torch.full((M,), -2.0).requires_grad_()
    for x in (loc, W, u):
        x.grad = torch.randn(x.shape, generator=g) * 10
    return loc, W, u


def _time(fn, repeats):
    fn()  # warm up
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats * 1e3


def svi_step_cost(name, blocks=20, block_size=25, order=("NG-HVI", "SG-HVI")):
    """Median ms per SVI.step for NG-HVI and SG-HVI, alternating blocks of steps.  Of two SVI
    objects built in one process the one built first runs about 0.6-1 ms per step slower (seen
    with two identical SG-HVI or NG-HVI runs, not explained), so :func:`main` measures both
    construction orders and averages."""
    import pyro
    from pyro.infer import SVI
    from pyro.infer.autoguide import init_to_feasible, init_to_value

    if name == "lmm":
        model, (train, _) = linear_random_intercept, simulate_linear_random_intercept(num_groups=1000)
        init = init_to_feasible
    else:
        model, (train, _, _) = deep_mixed_model, simulate_deep_mixed(num_groups=1000)
        init = init_to_value(values={"W1": torch.randn(5, 6) * 0.5, "W2": torch.randn(5, 6) * 0.5}, fallback=init_to_feasible)
    args = (train["X"], train["group"], train["num_groups"], train["y"])
    svis = {}
    pyro.clear_param_store()
    for method in order:
        optim = NGHVIOptim() if method == "NG-HVI" else SGHVIOptim()
        guide = HybridGuide(model, GaussianConditional("alpha"), rank=3, init_loc_fn=init, name=method)
        svis[method] = SVI(model, guide, optim, HybridELBO(guide.conditional))
        svis[method].step(*args)
    times = {m: [] for m in svis}
    for _ in range(blocks):
        for method, svi in svis.items():
            t0 = time.process_time()
            for _ in range(block_size):
                svi.step(*args)
            times[method].append((time.process_time() - t0) / block_size * 1e3)
    dim = svis["NG-HVI"].guide.global_guide.latent_dim
    return dim, {m: sorted(t)[len(t) // 2] for m, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=["lmm", "deep"], choices=["lmm", "deep"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = SoftplusTransform()
    rows = []
    for M in args.dims:
        loc, W, u = _params(M, args.rank)
        # the natural gradient in the paper's coordinates (mu, B lower triangular, d), on the
        # arrays the optimiser uses: NumPy float64 for M (p + 1) <= 20000, torch otherwise
        s = transform(u.detach())
        B, free = s[:, None] * W.detach(), torch.ones(M, args.rank, dtype=torch.bool).tril()
        inputs = (loc.grad, B, W.grad, s, u.grad, free)
        if M * (args.rank + 1) <= 20000:
            inputs = tuple(x.numpy().astype(bool if x.dtype == torch.bool else "float64") for x in inputs)
        cg = []

        def ng():
            cg.append(paper_natural_gradient(*inputs).cg_iterations)

        t_ng = _time(ng, args.repeats)
        init = [x.detach().clone() for x in (loc, W, u)]
        ng_opt = NaturalGradientAdadelta([loc, W, u], transform)
        t_ng_step = _time(ng_opt.step, args.repeats)
        with torch.no_grad():
            loc.copy_(init[0]), W.copy_(init[1]), u.copy_(init[2])
        sg_opt = NaturalGradientAdadelta([loc, W, u], transform, natural_gradient=False, momentum=0.0, clip_norm=None)
        t_sg_step = _time(sg_opt.step, args.repeats)
        with torch.no_grad():
            loc.copy_(init[0]), W.copy_(init[1]), u.copy_(init[2])
        rows.append((M, t_ng, t_ng_step, t_sg_step, sum(cg) / len(cg)))
    print("| dim theta M | natural gradient (ms) | NG-HVI step (ms) | SG-HVI step (ms) | CG iterations | ms / M x 1000 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for M, t_ng, t_step, t_sg, it in rows:
        print(f"| {M} | {t_ng:.3f} | {t_step:.3f} | {t_sg:.3f} | {it:.1f} | {t_ng / M * 1000:.3f} |")
    print(
        "\nWhole SVI.step (hybrid ELBO + optimiser), 1000 groups, CPU ms, median over 20 alternating blocks of 25 steps, "
        "for each order in which the two SVI objects are built, and the mean of the two orders:\n"
    )
    print("| model | dim theta | built first | NG-HVI ms / step | SG-HVI ms / step | natural-gradient overhead |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        means = {"NG-HVI": 0.0, "SG-HVI": 0.0}
        for order in (("NG-HVI", "SG-HVI"), ("SG-HVI", "NG-HVI")):
            dim, t = svi_step_cost(name, order=order)
            for k in means:
                means[k] += t[k] / 2
            print(f"| {name} | {dim} | {order[0]} | {t['NG-HVI']:.2f} | {t['SG-HVI']:.2f} | {100 * (t['NG-HVI'] / t['SG-HVI'] - 1):.0f}% |")
        overhead = 100 * (means["NG-HVI"] / means["SG-HVI"] - 1)
        print(f"| {name} | {dim} | mean of both | {means['NG-HVI']:.2f} | {means['SG-HVI']:.2f} | **{overhead:.0f}%** |")


if __name__ == "__main__":
    main()
