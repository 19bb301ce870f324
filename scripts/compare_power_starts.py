"""How many power iterations a spectral-radius estimate needs, from a random start and from
the solve's residual f(z*) − z* (the start `spectral_regularisation` uses).

For each run folder and each of the first `--images` test images: solve with the run's own
solver, then take `--steps` power iterations of ∂f/∂z at the returned state from both
starts. Prints, per start and per number of iterations k, the median over the images of
‖J v_k‖ (v_k the unit vector after k iterations) and of its ratio to the last estimate
from a random start.

    .venv/bin/python scripts/compare_power_starts.py \\
        docs/results/mnist-conv-10ep/mnist-conv/runs/vanilla-anderson-jac-s{0,2}
"""

import argparse
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from diagnose_convergence import power_norms, run_config, solved_cell

from imex_deq.data import load_dataset
from imex_deq.experiments import load_trained


@eqx.filter_jit
def power_estimates(model, image, key, steps: int):
    """`(2, steps + 1)`: ‖J v_k‖ for k = 0..steps, from a random start and the residual."""
    flat_z, f, _ = solved_cell(model, image)
    random = jax.random.normal(key, flat_z.shape, flat_z.dtype)
    residual = f(flat_z) - flat_z
    return jnp.stack([power_norms(f, flat_z, start, steps + 1) for start in (random, residual)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with summary.json)")
    parser.add_argument("--images", type=int, default=128, help="test images per run")
    parser.add_argument("--steps", type=int, default=12, help="power iterations")
    args = parser.parse_args(argv)
    shown = sorted({0, 1, 2, 4, 6, args.steps} & set(range(args.steps + 1)))
    print(
        "| run | start | "
        + " | ".join(f"k = {k}" for k in shown)
        + " |\n|---|---|"
        + "---:|" * len(shown)
    )
    for run in args.runs:
        config = run_config(run)
        data = load_dataset(config.dataset, limit_test=args.images)
        model = load_trained(config, data)[1]
        keys = jax.random.split(jax.random.PRNGKey(0), args.images)
        rows = np.array(
            [
                power_estimates(model, jnp.asarray(image), key, args.steps)
                for image, key in zip(data.x_test[: args.images], keys)
            ]
        )  # (images, start, k)
        reference = rows[:, 0, -1]
        for index, start in enumerate(("random", "residual")):
            cells = [
                f"{np.median(rows[:, index, k]):.3f} ({np.median(rows[:, index, k] / reference):.2f})"
                for k in shown
            ]
            print(f"| {run.name} | {start} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
