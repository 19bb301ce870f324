"""Backward strategies against the exact implicit gradient, on the models we train.

For each problem, one batch, each backward strategy of `imex_deq.experiments.ADJOINTS`
that is not plain backprop: the backward VJPs per sample, the cosine and the relative
error of the whole parameter gradient (cross-entropy loss) against the exact implicit
gradient (`EarlyExitGMRES` at relative residual 1e-6), and the time of a training
gradient (forward + backward, median of --repeats calls after compile).

Problems:
- `mnist-dense`: the paper's MNIST-dense Vanilla DEQ on Fashion-MNIST, first trained
  --warmup steps (default adjoint), so the Jacobian is a trained one.
- `mnist-conv`: the multiscale conv DEQ (`experiments.mnist_conv()`), --conv-model (Skip
  Reg. by default), weights from --conv-checkpoint (the 10-epoch `reproduce mnist-conv`
  run's) when it exists, else initial.

The forward solve is Anderson (rtol --rtol, at most --max-steps) for every row, and Broyden
for the Broyden SHINE row (against its own exact gradient).

Usage: python scripts/bench_gradients.py [--threads 1] [--batch 64] [--warmup 300]
Prints a markdown table; progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import report, threads, timing

CONV_RUNS = "docs/results/mnist-conv-10ep/mnist-conv/runs"

CONV_CHECKPOINT = "docs/results/mnist-conv-10ep/mnist-conv/runs/vanilla-anderson-s0/checkpoint.eqx"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=300, help="training steps of the dense model")
    p.add_argument("--rtol", type=float, default=1e-2)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--problems", default="mnist-dense,mnist-conv")
    p.add_argument("--conv-model", default="skip-reg", help="vanilla | skip-reg")
    p.add_argument(
        "--conv-checkpoint",
        default=None,
        help=f"default: {CONV_RUNS}/<conv-model>-anderson-s0/checkpoint.eqx",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.conv_checkpoint is None:
        args.conv_checkpoint = f"{CONV_RUNS}/{args.conv_model}-anderson-s0/checkpoint.eqx"
    threads.configure_threads(args.threads)
    import equinox as eqx
    import jax
    import jax.flatten_util
    import jax.numpy as jnp
    import numpy as np

    import imex_deq
    from imex_deq.data import iterate_batches, load_dataset
    from imex_deq.experiments import ADJOINTS, TrainConfig, make_adjoint
    from imex_deq.experiments._checkpoint import load_checkpoint
    from imex_deq.experiments._training import Trainer, build_model, make_optimizer

    data = load_dataset("fashion-mnist")

    def config_for(problem):
        architecture = "dense" if problem == "mnist-dense" else "conv"
        return TrainConfig(
            model="vanilla" if problem == "mnist-dense" else args.conv_model,
            solver="anderson",
            architecture=architecture,
            rtol=args.rtol,
            max_steps=args.max_steps,
            dataset="fashion-mnist",
            batch_size=args.batch,
        )

    def trained_model(problem, config, trainer):
        model = build_model(config, data)
        if problem == "mnist-conv":
            if os.path.exists(args.conv_checkpoint):
                opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
                template = eqx.filter_eval_shape(lambda: (model, opt_state))
                (model, _), meta = load_checkpoint(args.conv_checkpoint, template)
                report.log(f"mnist-conv: weights after {meta['global_step']} training steps")
            else:
                report.log("mnist-conv: no checkpoint, initial weights")
            return model
        opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        batches = iterate_batches(data.x_train, data.y_train, args.batch, seed=0, epoch=0)
        key = jax.random.key(0)
        for step, (x, y) in zip(range(args.warmup), batches):
            model, opt_state, _ = trainer.step(
                model, opt_state, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(key, step)
            )
        report.log(f"mnist-dense: trained {args.warmup} steps")
        return model

    @eqx.filter_jit
    def gradient(trainer, model, x, y):
        (_, metrics), (grads, counter) = eqx.filter_value_and_grad(trainer.loss, has_aux=True)(
            (model, jnp.zeros(())), x, y, jax.random.key(1)
        )
        flat = jax.flatten_util.ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))[0]
        return flat, counter / x.shape[0], metrics["nfe"]

    def with_backward(model, adjoint, solver):
        return eqx.tree_at(lambda m: (m.layer.adjoint, m.layer.solver), model, (adjoint, solver))

    exact_adjoint = imex_deq.ImplicitAdjoint(imex_deq.EarlyExitGMRES(rtol=1e-6, max_steps=80))
    names = [name for name in ADJOINTS if name != "unrolled"]
    rows = []
    for problem in args.problems.split(","):
        config = config_for(problem)
        trainer = Trainer(config, make_optimizer(config, 1000))
        model = trained_model(problem, config, trainer)
        batch = args.batch if problem == "mnist-dense" else args.conv_batch
        x, y = jnp.asarray(data.x_test[:batch]), jnp.asarray(data.y_test[:batch])
        solvers = {
            "Anderson": imex_deq.Anderson(rtol=args.rtol),
            "Broyden": imex_deq.Broyden(rtol=args.rtol),
        }
        exact = {
            label: gradient(trainer, with_backward(model, exact_adjoint, solver), x, y)[0]
            for label, solver in solvers.items()
        }
        cases = [(name, "Anderson") for name in names] + [("shine", "Broyden")]
        for name, solver_label in cases:
            adjoint = make_adjoint(name, args.rtol)
            variant = with_backward(model, adjoint, solvers[solver_label])
            grad, vjps, nfe = gradient(trainer, variant, x, y)

            def call(trainer=trainer, variant=variant, x=x, y=y):
                return jax.block_until_ready(gradient(trainer, variant, x, y))

            seconds = [timing.timed(call)[1] for _ in range(args.repeats)]
            reference = exact[solver_label]
            cosine = float(grad @ reference / (jnp.linalg.norm(grad) * jnp.linalg.norm(reference)))
            error = float(jnp.linalg.norm(grad - reference) / jnp.linalg.norm(reference))
            rows.append(
                (
                    problem,
                    f"{ADJOINTS[name].label} [{solver_label}]",
                    float(nfe),
                    float(vjps),
                    cosine,
                    error,
                    1e3 * float(np.median(seconds)),
                )
            )
            report.log(rows[-1])
    print(f"\n{threads.machine_line(args.threads)}\n")
    print(
        "| problem | backward [forward solver] | forward NFE | backward VJPs | cosine | rel. error | gradient ms |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for problem, label, nfe, vjps, cosine, error, ms in rows:
        print(
            f"| {problem} | {label} | {nfe:.1f} | {vjps:.1f} | {cosine:.4f} | {error:.3f} | {ms:.1f} |"
        )


if __name__ == "__main__":
    main()
