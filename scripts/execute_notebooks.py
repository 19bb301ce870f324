"""Execute the tutorial notebooks and store them with their outputs.

    .venv/bin/python scripts/execute_notebooks.py              # every notebooks/*.py
    .venv/bin/python scripts/execute_notebooks.py notebooks/03_continuous_vs_neural_ode.py
    .venv/bin/python scripts/execute_notebooks.py --out /tmp/executed

Each notebook is read from its jupytext source (`notebooks/NAME.py`, percent format), run
top to bottom in a fresh IPython kernel and written, outputs and figures included, to
`NAME.ipynb` next to its source (or into `--out`). The kernel is started with this
interpreter (`sys.executable`) through a kernelspec made for the run in a temporary
folder, so it sees the same installed packages as this script, and a `python3` kernel
registered elsewhere on the machine (another virtual environment, another Python) is never
picked up. The kernel inherits this process's environment (PYTHONPATH included) and runs
in a scratch folder, so files a notebook writes do not land in the repository.

A notebook that raises stops at the failing cell and the error is printed. Written in place
(no `--out`), the stored notebook is then left as it was; with `--out` the partly executed
notebook is written anyway, to be read. The exit status is 1 if any notebook failed.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jupytext
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "imex-deq-notebooks"
# What the stored notebooks declare: the ordinary Python kernel a reader's Jupyter offers.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def read_source(source: Path):
    """The notebook defined by a jupytext percent-format file, with stable cell ids (so
    re-executing it changes outputs only) and the stored notebooks' kernelspec."""
    nb = jupytext.read(source, fmt="py:percent")
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index:02d}"
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb


def merge_streams(nb) -> None:
    """Join consecutive prints to the same stream into one output, as Jupyter shows them."""
    for cell in nb.cells:
        merged = []
        for output in cell.get("outputs", []):
            previous = merged[-1] if merged else None
            if (
                previous is not None
                and output.output_type == previous.output_type == "stream"
                and output.name == previous.name
            ):
                previous.text += output.text
            else:
                merged.append(output)
        if cell.cell_type == "code":
            cell.outputs = merged


def execute(source: Path, target: Path, workdir: Path, cell_timeout: int) -> bool:
    """Run `source` in a fresh kernel and write it to `target`; True if no cell raised."""
    spec = workdir / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "imex-deq notebooks", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
    nb = read_source(source)
    client = NotebookClient(
        nb,
        km=KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs),
        timeout=cell_timeout,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on the first error
    except CellExecutionError as error:
        print(
            f"{source.name} FAILED after {time.perf_counter() - start:.1f} s:\n{error}", flush=True
        )
        ok = False
    else:
        print(f"executed {source.name} in {time.perf_counter() - start:.1f} s", flush=True)
        ok = True
    merge_streams(nb)
    if ok or target.parent != source.parent:
        jupytext.write(nb, target, fmt="ipynb")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="default: notebooks/*.py")
    parser.add_argument("--out", type=Path, help="folder for the executed .ipynb files")
    parser.add_argument("--workdir", type=Path, help="the kernels' working folder")
    parser.add_argument("--cell-timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    sources = args.sources or sorted(NOTEBOOK_DIR.glob("[0-9]*.py"))
    failed = []
    with tempfile.TemporaryDirectory(prefix="imex-deq-notebooks-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        for source in sources:
            source = source.resolve()
            folder = args.out.resolve() if args.out else source.parent
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{source.stem}.ipynb"
            if not execute(source, target, workdir, args.cell_timeout):
                failed.append(source.name)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
