r"""Batched CAVI restarts on the CMN (issue 4, item 6): cost per restart per sweep.

CAVI-CMN (Heins et al. 2024) fits 32 models in parallel and keeps the best. ``CAVI(model,
num_restarts=R)`` sweeps the R restarts together, every factor update vectorised over them
(``pyro_cavi/cavi/restarts.py``); ``batch_restarts=False`` runs them one after another. This
script fits the CMN of ``models/cmn.py`` both ways for R = 1, 2, 4, 8, 32 on pinwheels (K = 10)
and Statlog Vehicle (K = 20), with the data, splits and sizes of ``benchmarks/cmn_uci.py``, for a
fixed number of sweeps (no early stop), and reports:

* seconds per restart per sweep, CPU (``time.process_time``) and wall, of the sweeps alone
  (the ELBO evaluation included), and the same scaled to 200 sweeps per restart beside the
  authors' "s/model" of ``../shared/anchors/cavi-cmn-reference.md``;
* the initialisation's seconds per restart (drawn one restart after another in both modes);
* the speed-up of batched over sequential at the same R, and over one restart alone;
* the largest relative difference between the two modes' final ELBOs (the restarts start
  from the same initialisations, so they must agree to rounding).

Run::

    python benchmarks/cavi_restarts.py                    # both data sets, R = 1 2 4 8 32
    python benchmarks/cavi_restarts.py --sweeps 5 --restarts 1 4 --datasets pinwheels   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

import cmn  # noqa: E402
from cmn_uci import ANCHOR_CAVI, DATASETS, load  # noqa: E402

from pyro_cavi import CAVI  # noqa: E402

OUT = HERE / "out" / "cavi_restarts.json"


class _Timer:
    """Wraps an engine's ``_sweep`` and ``_elbo`` to add up the CPU and wall seconds spent in them."""

    def __init__(self, engine: CAVI):
        self.cpu = self.wall = 0.0
        for name in ("_sweep", "_elbo"):
            setattr(engine, name, self._timed(getattr(engine, name)))

    def _timed(self, fn):
        def wrapped(*a, **k):
            c, w = time.process_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cpu += time.process_time() - c
                self.wall += time.perf_counter() - w

        return wrapped


def fit(X, y, K: int, R: int, batched: bool, sweeps: int, seed: int) -> dict:
    engine = CAVI(lambda X, y: cmn.cmn(X, y, num_experts=K), seed=seed, num_restarts=R,
                  batch_restarts=batched, init="forgy")
    timer = _Timer(engine)
    c, w = time.process_time(), time.perf_counter()
    result = engine.run(X, y, num_steps=sweeps, tol=0.0, progress=False)
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    done = sum(len(t) for t in result.restart_traces)
    return {"R": R, "batched": batched, "sweeps": done / R, "cpu": cpu, "wall": wall,
            "sweep_cpu": timer.cpu, "sweep_wall": timer.wall, "restart_elbos": result.restart_elbos,
            "cpu_per_restart_sweep": timer.cpu / done, "wall_per_restart_sweep": timer.wall / done,
            "init_cpu_per_restart": (cpu - timer.cpu) / R}


def table(records: list) -> str:
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in records):
        recs = [r for r in records if r["dataset"] == name]
        K = recs[0]["K"]
        one = next(r for r in recs if r["R"] == 1 and not r["batched"])
        anchor = ANCHOR_CAVI.get(name, (None,) * 4)[3]
        lines += [f"**{name}** (N = {recs[0]['N']}, D = {recs[0]['D']}, K = {K}, {recs[0]['sweeps']:.0f} sweeps"
                  f" per restart; the authors' s/model for 200 sweeps: {anchor})", "",
                  "| R | mode | CPU ms / restart / sweep | wall ms / restart / sweep | CPU s / 200 sweeps / restart "
                  "| init CPU s / restart | batched ÷ sequential (CPU) | vs one restart alone (CPU) | max rel. ΔELBO vs sequential |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for R in sorted({r["R"] for r in recs}):
            seq = next((r for r in recs if r["R"] == R and not r["batched"]), None)
            for r in [x for x in recs if x["R"] == R]:
                ratio = speed = diff = ""
                if r["batched"] and seq is not None:
                    ratio = f"{r['cpu_per_restart_sweep'] / seq['cpu_per_restart_sweep']:.2f}"
                    diff = f"{max(abs(a - b) / abs(b) for a, b in zip(r['restart_elbos'], seq['restart_elbos'])):.1e}"
                speed = f"{one['cpu_per_restart_sweep'] / r['cpu_per_restart_sweep']:.2f}×"
                lines.append(
                    f"| {R} | {'batched' if r['batched'] else 'sequential'} | {1e3 * r['cpu_per_restart_sweep']:.1f} "
                    f"| {1e3 * r['wall_per_restart_sweep']:.1f} | {200 * r['cpu_per_restart_sweep']:.2f} "
                    f"| {r['init_cpu_per_restart']:.3f} | {ratio} | {speed} | {diff} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pinwheels", "vehicle"], choices=list(DATASETS))
    parser.add_argument("--restarts", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    parser.add_argument("--sweeps", type=int, default=10, help="sweeps per restart (no early stop)")
    parser.add_argument("--seed", type=int, default=0, help="split seed and initialisation seed")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--report", action="store_true", help="print the table from benchmarks/out/cavi_restarts.json")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(OUT.read_text())["records"]))
        return
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    records = []
    load_start = os.getloadavg()
    for name in args.datasets:
        Xtr, ytr, _, _ = load(name, args.seed, dtype)
        K = DATASETS[name][1]
        for batched in (False, True):  # warm-up: first calls (imports, caches) are not timed
            fit(Xtr, ytr, K, 2, batched, 1, args.seed)
        for R in args.restarts:
            for batched in (False, True):
                rec = fit(Xtr, ytr, K, R, batched, args.sweeps, args.seed)
                rec.update(dataset=name, K=K, N=Xtr.shape[0], D=Xtr.shape[1])
                records.append(rec)
                print(f"{name:10s} R={R:2d} {'batched   ' if batched else 'sequential'} "
                      f"{1e3 * rec['cpu_per_restart_sweep']:8.1f} CPU ms / restart / sweep "
                      f"({1e3 * rec['wall_per_restart_sweep']:.1f} wall), load {os.getloadavg()[0]:.1f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    meta = {"command": " ".join(["python", "benchmarks/cavi_restarts.py"] + sys.argv[1:]), "commit": commit,
            "dtype": args.dtype, "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "load_start": load_start, "load_end": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(json.dumps(meta))
    print(table(records))


if __name__ == "__main__":
    main()
