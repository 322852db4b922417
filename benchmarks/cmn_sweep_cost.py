"""
CPU milliseconds per CAVI sweep of one CMN restart (mean-field, float32, Forgy start, split
seed 0), and the ELBO after the timed sweeps, on the UCI sets of ``cmn_uci.py``. Meant for
comparing two commits of the engine back to back: run it from two checkouts in alternation, so
both see the same load, and compare the ratios; the ELBOs show the two fits are the same.

    python benchmarks/cmn_sweep_cost.py --datasets rice waveform --sweeps 40
"""

import argparse
import os
import pathlib
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from cmn_uci import DATASETS, load  # noqa: E402
from models.cmn import cmn  # noqa: E402
from pyro_cavi import CAVI  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--warmup", type=int, default=3, help="untimed sweeps first (tracing, caches)")
    parser.add_argument("--sweeps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    for name in args.datasets:
        Xtr, ytr, _, _ = load(name, 0, torch.float32)
        K = DATASETS[name][1]
        cavi = CAVI(lambda X, y: cmn(X, y, num_experts=K), seed=0)
        for _ in range(args.warmup):
            cavi.step(Xtr, ytr)
        start = time.process_time()
        for _ in range(args.sweeps):
            cavi.step(Xtr, ytr)
        ms = 1e3 * (time.process_time() - start) / args.sweeps
        print(f"{commit} {name:14s} {ms:7.2f} CPU ms / sweep  ELBO after {args.warmup + args.sweeps} sweeps "
              f"{cavi.elbo_trace[-1]:.4f}  load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
