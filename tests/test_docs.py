"""The documentation site: `mkdocs build --strict` succeeds, the API reference documents every
public name of the package, the tutorial notebooks are pages with their figures, and the
code on the front page runs."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import imex_deq
import imex_deq.data
import imex_deq.experiments
import imex_deq.nn

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = (imex_deq, imex_deq.nn, imex_deq.data, imex_deq.experiments)
API_PAGES = ("core", "nn", "data", "experiments")


def public_names(module) -> list[str]:
    """What `from module import X` offers: the re-exports in its `__init__.py`."""
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with `mkdocs build --strict` into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--clean",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return out


def test_mkdocs_build_strict_succeeds(site):
    for page in (
        "index.html",
        "method/index.html",
        "tutorials/index.html",
        "results/index.html",
        "performance/index.html",
        "faq/index.html",
    ):
        assert (site / page).is_file(), page
    for page in API_PAGES:
        assert (site / "api" / page / "index.html").is_file(), page


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_api_reference_documents_every_public_name(site, module):
    html = "".join((site / "api" / page / "index.html").read_text() for page in API_PAGES)
    missing = [
        name for name in public_names(module) if f'id="{module.__name__}.{name}"' not in html
    ]
    assert not missing, (
        f"not in the API reference: {missing}; add `::: {module.__name__}.NAME` to the "
        "matching page in docs/api/"
    )


def test_tutorial_notebooks_are_pages_with_their_figures(site):
    """mkdocs-jupyter renders each notebooks/*.ipynb (outputs stored, not re-executed)."""
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for notebook in notebooks:
        html = (site / "notebooks" / notebook.stem / "index.html").read_text()
        assert 'class="jupyter-wrapper"' in html, notebook.name
        assert "data:image/png;base64," in html, f"{notebook.name}: no figure on its page"


def test_method_page_has_rendered_math(site):
    html = (site / "method" / "index.html").read_text()
    assert html.count('class="arithmatex"') >= 10


def test_front_page_code_runs():
    """The Python blocks of docs/index.md, run in order in one namespace."""
    text = (ROOT / "docs" / "index.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/index.md", "exec"), namespace)  # noqa: S102
    assert bool(namespace["sol"].result == imex_deq.RESULTS.successful)
    assert namespace["z_star"].shape == (8, 32)


def test_readme_optimistix_example_runs():
    """The README block that runs imex-deq solvers through optimistix directly."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "optx." in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    sol = namespace["sol"]  # the root find
    assert bool(sol.result == imex_deq.RESULTS.successful)
    y = sol.value
    assert float(abs(y + 0.1 * y**3 - namespace["jnp"].array([1.0, 2.0, 3.0])).max()) < 1e-5
