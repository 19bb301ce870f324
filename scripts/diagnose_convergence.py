"""Why a trained DEQ's solves do (not) converge: at initialisation and at the last checkpoint.

For each run folder (one `train` / `reproduce` run: summary.json or a checkpoint with its
log) and each of the first `--images` test images, solve once with the run's own solver
and budget, then measure at the state the solve returned:

- NFE and whether the solve met the tolerance;
- the relative residual ‖f(z) − z‖ / ‖z‖;
- the power-iteration estimate of the spectral radius of ∂f/∂z (`--power-steps` JVPs).

`--max-steps N` adds a row per run: the trained model solved with a cap of N steps instead
of its own (whether its solves are slow or stuck).

A spectral radius above 1 means plain fixed-point iteration diverges there; Anderson can
still converge (it is a quasi-Newton method), which the NFE column shows.

    .venv/bin/python scripts/diagnose_convergence.py \\
        docs/results/mnist-conv-10ep/mnist-conv/runs/skip-anderson-s{0,1,2}
"""

import argparse
import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from imex_deq import RESULTS
from imex_deq.data import load_dataset
from imex_deq.experiments import TrainConfig, load_trained
from imex_deq.experiments._training import build_model


def solved_cell(model, image):
    """`(z, f, info)` for one image: the state its solve returned and f(·, x), both on the
    flattened state (one vector), and the solve's `DEQInfo`."""
    x = model.embed(image)
    z, info = model.layer(x, inference=True)
    flat_z, unflatten = ravel_pytree(z)

    def f(flat_state):
        return ravel_pytree(model.layer.f(unflatten(flat_state), x))[0]

    return flat_z, f, info


def power_norms(f, z, start, length: int):
    """`(length,)`: ‖J v_k‖ for k = 0..length − 1, J = ∂f/∂z at z, v_0 = start / ‖start‖ and
    v_{k+1} = J v_k / ‖J v_k‖ (power iteration; the last entry is the radius estimate)."""

    def step(v, _):
        jv = jax.jvp(f, (z,), (v,))[1]
        norm = jnp.linalg.norm(jv)
        return jv / norm, norm

    return jax.lax.scan(step, start / jnp.linalg.norm(start), None, length=length)[1]


@eqx.filter_jit
def solve_and_measure(model, image, power_steps: int):
    """(nfe, converged, relative residual, spectral-radius estimate) of one image's solve."""
    flat_z, f, info = solved_cell(model, image)
    residual = jnp.linalg.norm(f(flat_z) - flat_z) / jnp.linalg.norm(flat_z)
    start = jax.random.normal(jax.random.PRNGKey(0), flat_z.shape, flat_z.dtype)
    radius = power_norms(f, flat_z, start, power_steps)[-1]
    converged = (info.result == RESULTS.successful).astype(jnp.float32)
    return jnp.stack([info.nfe.astype(jnp.float32), converged, residual, radius])


def run_config(run: Path) -> TrainConfig:
    """The `TrainConfig` a finished run folder was trained with (its summary.json)."""
    summary = run / "summary.json"
    if not summary.is_file():
        raise SystemExit(f"{summary}: no summary.json (diagnose finished runs)")
    stored = json.loads(summary.read_text())["config"]
    return TrainConfig(**{**stored, "out_dir": str(run), "resume": False, "progress": False})


def with_max_steps(model, max_steps: int):
    """`model` with its DEQ layer's step cap replaced."""
    return eqx.tree_at(
        lambda m: m.layer, model, dataclasses.replace(model.layer, max_steps=max_steps)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with summary.json)")
    parser.add_argument("--images", type=int, default=8, help="test images per run")
    parser.add_argument(
        "--power-steps", type=int, default=25, help="JVPs of power iteration (at least 1)"
    )
    parser.add_argument(
        "--max-steps", type=int, help="also solve the trained model with this step cap"
    )
    args = parser.parse_args(argv)
    if args.power_steps < 1:
        parser.error(f"--power-steps must be at least 1, got {args.power_steps}")
    print(
        "| run | model | NFE | converged % | relative residual | spectral radius of ∂f/∂z |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    datasets = {}
    for run in args.runs:
        config = run_config(run)
        if config.dataset not in datasets:
            datasets[config.dataset] = load_dataset(config.dataset, limit_test=args.images)
        data = datasets[config.dataset]
        images = jnp.asarray(data.x_test[: args.images])
        trained = load_trained(config, data)[1]
        models = [("initial", build_model(config, data)), ("trained", trained)]
        if args.max_steps:
            models.append(
                (f"trained, {args.max_steps} steps", with_max_steps(trained, args.max_steps))
            )
        for label, model in models:
            rows = np.array([solve_and_measure(model, im, args.power_steps) for im in images])
            nfe, converged, residual, radius = rows.mean(0)
            print(
                f"| {run.name} | {label} | {nfe:.1f} | {100 * converged:.0f} | "
                f"{residual:.3g} | {radius:.2f} ({rows[:, 3].min():.2f}–{rows[:, 3].max():.2f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
