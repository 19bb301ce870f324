"""Train the same model with each backward strategy and compare what training reached.

MNIST-dense on Fashion-MNIST (no download: the Debian `dataset-fashion-mnist` package), one
seed, the same initial weights and batches for every strategy; per row: test accuracy,
test NFE, backward VJPs per sample (last step), training time, and the step's and
prediction's time per batch (`imex_deq.experiments.train`'s own timing).

Usage: python scripts/train_backward.py [--threads 1] [--epochs 2]
    [--runs vanilla:anderson:gmres,vanilla:anderson:shine,...]
Prints a markdown table; progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import report, runs, threads

DEFAULT_RUNS = ",".join(
    [f"vanilla:anderson:{b}" for b in ("gmres", "gmres-early", "anderson", "shine")]
    + [f"vanilla:anderson:{b}" for b in ("shine-refine", "jfb")]
    + [f"skip-reg:continuous:{b}" for b in ("gmres", "gmres-early", "anderson", "jfb")]
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--skip-weight", type=float, default=1.0)
    p.add_argument("--runs", default=DEFAULT_RUNS, help="model:solver:backward,...")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    threads.configure_threads(args.threads)
    from imex_deq.data import load_dataset
    from imex_deq.experiments import ADJOINTS, train

    data = load_dataset("fashion-mnist")
    rows = []
    for run in args.runs.split(","):
        config = runs.fashion_run_config(run, epochs=args.epochs, skip_weight=args.skip_weight)
        summary = train(config, data)
        rows.append((config.model, config.solver, ADJOINTS[config.backward].label, summary))
        report.log(run, f"{summary['test_accuracy']:.4f}")
    print(f"\n{threads.machine_line(args.threads)}\n")
    print(
        "| model | solver | backward | test acc. % | test NFE | backward VJPs | "
        "train time (s) | step (ms) | predict (ms) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for model, solver, label, s in rows:
        print(
            f"| {model} | {solver} | {label} | {100 * s['test_accuracy']:.2f} | "
            f"{s['test_nfe']:.1f} | {s['backward_nfe']:.1f} | {s['train_time_s']:.1f} | "
            f"{1e3 * s['step_s']:.2f} | {1e3 * s['predict_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
