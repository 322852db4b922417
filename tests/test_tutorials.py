"""Every notebook in tutorials/ runs top to bottom (and the README's quickstart runs)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # one thread: tiny kernels are slowed a thousandfold by OpenMP threads on 2 busy cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def test_readme_quickstart_runs():
    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.converged and result.num_steps < 50
    assert scope["samples"]["y"].shape == (1000, 500)
