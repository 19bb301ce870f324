"""Training runs named `model:solver:backward`, as the benchmark scripts take them."""

from __future__ import annotations


def fashion_run_config(run: str, **options):
    """The `TrainConfig` of `run` ("skip-reg:anderson:gmres-early") on Fashion-MNIST,
    without a progress bar; `options` set the rest (epochs, skip_weight, out_dir, ...)."""
    from imex_deq.experiments import TrainConfig

    model, solver, backward = run.split(":")
    return TrainConfig(
        model=model,
        solver=solver,
        backward=backward,
        dataset="fashion-mnist",
        progress=False,
        **options,
    )
