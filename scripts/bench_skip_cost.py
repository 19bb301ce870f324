"""What the implicit correction costs: each trained DEQ's training step and prediction
against the explicit network's, timed side by side in one run.

MNIST-dense on Fashion-MNIST (no download: the Debian `dataset-fashion-mnist` package),
λ_skip --skip-weight, the library's defaults otherwise. Each run of --runs
(model:solver:backward) is trained for --epochs with `imex_deq.experiments.train` into
--out (a finished run there is reused), then every model's jitted training step and
prediction on one batch of --batch are timed in interleaved rounds (each model once per
round, --rounds rounds, medians), so that load changes hit every row alike. Ratios are
to the explicit network (f applied once to 0).

With --trained DIR,DIR,... the finished runs saved in those folders (any architecture,
e.g. the conv reproduction's run folders) are timed instead; nothing is trained.

Usage: python scripts/bench_skip_cost.py [--threads 1] [--epochs 2] [--rounds 200]
    [--runs explicit:anderson:gmres-early,skip-reg:anderson:gmres-early,...]
    [--trained RUN_DIR,RUN_DIR,...]
Prints a markdown table to stdout, progress to stderr; writes results/bench_skip_cost.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import report, runs, threads, timing

MODELS_AND_SOLVERS = (
    ("explicit", "anderson"),
    ("skip-reg", "anderson"),
    ("skip-reg", "fixed-point"),
    ("skip-reg", "continuous"),
    ("skip-reg", "pseudo-transient"),
    ("vanilla", "anderson"),
    ("vanilla", "continuous"),
    ("vanilla", "pseudo-transient"),
)
DEFAULT_RUNS = ",".join(f"{model}:{solver}:gmres-early" for model, solver in MODELS_AND_SOLVERS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--skip-weight", type=float, default=1.0)
    p.add_argument("--runs", default=DEFAULT_RUNS, help="model:solver:backward,...")
    p.add_argument("--out", default="results/bench_skip_cost", help="where the runs are saved")
    p.add_argument("--trained", default=None, help="finished run folders to time instead")
    return p.parse_args(argv)


def trained_runs(args, data):
    """[(run name, summary, trainer, model)] for every run of --runs, trained or reused."""
    from imex_deq.experiments import load_trained, train

    trained = []
    for run in args.runs.split(","):
        config = runs.fashion_run_config(
            run,
            epochs=args.epochs,
            batch_size=args.batch,
            skip_weight=args.skip_weight,
            out_dir=os.path.join(args.out, run.replace(":", "-")),
            resume=True,
        )
        summary = train(config, data)
        report.log(run, f"test accuracy {summary['test_accuracy']:.4f}")
        trained.append((run, summary, *load_trained(config, data)))
    return trained


def saved_runs(folders: str, data):
    """[(run name, summary, trainer, model)] for the finished runs in `folders`."""
    import json

    from imex_deq.experiments import TrainConfig, load_trained

    loaded = []
    for folder in folders.split(","):
        summary_path = os.path.join(folder, "summary.json")
        if not os.path.isfile(summary_path):
            raise SystemExit(f"--trained: {folder} holds no finished run (no summary.json)")
        with open(summary_path) as handle:
            summary = json.load(handle)
        config = TrainConfig(**{**summary["config"], "out_dir": folder, "progress": False})
        loaded.append(
            (os.path.basename(os.path.normpath(folder)), summary, *load_trained(config, data))
        )
    return loaded


def interleaved_medians(calls: dict, rounds: int) -> dict:
    """Median milliseconds of each zero-argument call, timed once per round in turn."""
    import jax

    times = {name: [] for name in calls}
    for call in calls.values():
        jax.block_until_ready(call())  # compile and warm up
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timing.timed(lambda c=call: jax.block_until_ready(c()))[1])
    return {name: timing.median_ms(t) for name, t in times.items()}


def main(argv=None):
    args = parse_args(argv)
    threads.configure_threads(args.threads)
    started = time.perf_counter()
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from imex_deq.data import load_dataset

    data = load_dataset("fashion-mnist")
    trained = saved_runs(args.trained, data) if args.trained else trained_runs(args, data)
    x, y = jnp.asarray(data.x_train[: args.batch]), jnp.asarray(data.y_train[: args.batch])
    x_test = jnp.asarray(data.x_test[: args.batch])
    key = jax.random.PRNGKey(0)
    calls = {}
    for run, _, trainer, model in trained:
        opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        calls[(run, "step")] = lambda t=trainer, m=model, o=opt_state: t.step(m, o, x, y, key)
        calls[(run, "predict")] = lambda t=trainer, m=model: t.predict(m, x_test)
    medians = interleaved_medians(calls, args.rounds)
    explicit = next((run for run, *_ in trained if run.startswith("explicit")), None)
    rows = []
    for run, summary, trainer, model in trained:
        _, nfe, _ = trainer.predict(model, x_test)
        row = {
            "run": run,
            "test_accuracy": summary["test_accuracy"],
            "test_nfe": summary["test_nfe"],
            "batch_max_nfe": int(jnp.max(nfe)),
            "step_ms": medians[(run, "step")],
            "predict_ms": medians[(run, "predict")],
        }
        if explicit is not None:
            row["step_ratio"] = row["step_ms"] / medians[(explicit, "step")]
            row["predict_ratio"] = row["predict_ms"] / medians[(explicit, "predict")]
        rows.append(row)
    print(f"\n{threads.machine_line(args.threads)}\n")
    trained_as = (
        f"runs from {os.path.dirname(os.path.normpath(args.trained.split(',')[0]))}"
        if args.trained
        else f"MNIST-dense on Fashion-MNIST, {args.epochs} epochs, λ_skip {args.skip_weight:g}"
    )
    print(f"{trained_as}, batch {args.batch}; medians of {args.rounds} interleaved rounds.\n")
    print(
        "| run | test acc. % | test NFE | batch max NFE | step (ms) | "
        "step / explicit | predict (ms) | predict / explicit |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {100 * r['test_accuracy']:.2f} | {r['test_nfe']:.2f} | "
            f"{r['batch_max_nfe']} | {r['step_ms']:.3f} | {r.get('step_ratio', float('nan')):.2f} | "
            f"{r['predict_ms']:.3f} | {r.get('predict_ratio', float('nan')):.2f} |"
        )
    report.write_results(
        "results/bench_skip_cost.json", {"args": vars(args), "rows": rows}, started
    )


if __name__ == "__main__":
    main()
