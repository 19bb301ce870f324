"""The tutorial notebooks: each `notebooks/NAME.ipynb` holds the same cells as its jupytext
source `notebooks/NAME.py`, is stored executed (outputs and figures included, so GitHub and
the docs site show them), and the source runs top to bottom without an error.

Each notebook is executed by `scripts/execute_notebooks.py` in a child process, in a fresh
IPython kernel started with this interpreter (`sys.executable`, i.e. the project's virtual
environment), so it sees the same installed packages as the tests and a `python3` kernel
registered elsewhere on the machine is never picked up. The child process keeps the
kernel's ZeroMQ plumbing (and its sockets' clean-up warnings) out of the test process.
Every notebook trains tiny models on scikit-learn's bundled digits and takes about a minute
or two on a laptop CPU.

Set IMEX_DEQ_NOTEBOOK_OUTPUTS to a folder to keep the notebooks executed here (with outputs
and figures) there. To refresh the stored notebooks, run `make notebooks`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXECUTE = ROOT / "scripts" / "execute_notebooks.py"
EXPECTED = (
    "01_quickstart",
    "02_skip_deq",
    "03_continuous_vs_neural_ode",
    "04_custom_models",
    "05_failure_modes",
)
CELL_TIMEOUT_S = 600
NOTEBOOK_TIMEOUT_S = 1200


def cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def read_source(name: str):
    return jupytext.read(NOTEBOOK_DIR / f"{name}.py", fmt="py:percent")


def read_stored(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def test_every_tutorial_has_a_source_and_a_stored_notebook():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.py")) == sorted(EXPECTED)
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_notebook_matches_its_source(name):
    """A change to one side only (the .py edited but not re-executed, or the .ipynb edited
    in Jupyter without pairing) would make GitHub and the docs show stale code."""
    assert cells(read_stored(name)) == cells(read_source(name)), (
        f"notebooks/{name}.ipynb differs from notebooks/{name}.py; re-execute it with "
        f"`make notebooks` (or `jupytext --sync notebooks/{name}.ipynb` if you edited the "
        ".ipynb)"
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_notebook_is_executed_with_figures(name):
    nb = read_stored(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{name}.ipynb is not stored from one top-to-bottom run (execution counts {counts}); "
        "run `make notebooks`"
    )
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name}.ipynb is stored with an error output"
    for index, cell in enumerate(code):
        if "plt.show()" in cell.source:
            kinds = [o.get("data", {}).keys() for o in cell.outputs]
            assert any("image/png" in k for k in kinds), f"{name}: code cell {index} has no figure"


def notebook_environment() -> dict[str, str]:
    """The environment a reader's kernel would have. tests/conftest.py turns XLA's CPU
    optimisation off (`--xla_backend_optimization_level=0`) to compile the suite's many tiny
    programs faster; the notebooks run real training loops, which that flag makes several
    times slower, so their kernels do not inherit it."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_backend_optimization_level")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_without_error(name, tmp_path):
    out = tmp_path / "executed"
    result = subprocess.run(
        [
            sys.executable,
            str(EXECUTE),
            str(NOTEBOOK_DIR / f"{name}.py"),
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
            "--cell-timeout",
            str(CELL_TIMEOUT_S),
        ],
        check=False,
        cwd=tmp_path,
        env=notebook_environment(),
        capture_output=True,
        text=True,
        timeout=NOTEBOOK_TIMEOUT_S,
    )
    executed = out / f"{name}.ipynb"
    keep = os.environ.get("IMEX_DEQ_NOTEBOOK_OUTPUTS")
    if keep and executed.exists():
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(executed, Path(keep) / executed.name)
    assert result.returncode == 0, (
        f"{name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    nb = nbformat.read(executed, as_version=4)
    assert cells(nb) == cells(read_source(name))
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "a cell did not run"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
