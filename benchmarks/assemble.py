"""Assemble BENCHMARKS.md from the per-engine results in benchmarks/results/*.md.

    python benchmarks/assemble.py

Each results file holds its own tables, the commands that produced them and the machine;
this script only stitches them together (demoting headings and pointing image links at
benchmarks/results/).
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["cavi", "cavi_scale", "cmn", "miselbo", "nghvi", "forward_kl", "diagnostics"]

HEADER = """# Benchmarks

Every table below was produced on this project's machine, a 2-core x86_64 CPU with no GPU
(torch 2.13 CPU, pyro-ppl 1.9.2, Python 3.11), with the command printed above it. The machine
was shared with other jobs while these ran (load averages of 5 to 8 on 2 cores), so wall-clock
seconds are inflated and noisy; ratios measured in one run, iteration counts and accuracies are
the reliable figures. Each section is kept in `benchmarks/results/<engine>.md` next to its
figures; `python benchmarks/assemble.py` rebuilds this file from them.

"""


def main() -> None:
    names = [n for n in ORDER if (RESULTS / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in names)
    parts = [HEADER, "Contents: " + ", ".join(f"[{n}](#{n})" for n in names) + "\n"]
    for name in names:
        text = (RESULTS / f"{name}.md").read_text()
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
        text = re.sub(r"\]\((?!https?://|benchmarks/)([^)]+\.(?:png|svg|jpg))\)", r"](benchmarks/results/\1)", text)
        parts.append(f'\n<a id="{name}"></a>\n\n' + text.strip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"wrote BENCHMARKS.md from {len(names)} result files: {', '.join(names)}")


if __name__ == "__main__":
    main()
