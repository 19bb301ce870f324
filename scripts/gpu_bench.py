"""Per-batch training and prediction time of the multiscale CIFAR-10 models (Pal et al.'s
CIFAR table), for every variant: Vanilla / Skip / Skip Reg. DEQ, each with the continuous
solver (SteadyStateODE, Tsit5) and the discrete one (Anderson), and the Neural ODE baseline.

Models: `imex_deq.experiments.cifar_small()` and `cifar_large()` through
`imex_deq.experiments.build_conv_model`, trained by `experiments.Trainer` (one jitted step:
predictor + solve + cross-entropy + skip loss + implicit adjoint + Adam). Data: random
32x32x3 images and labels, batch 128 (random data exercises the same kernels; NFE on it is
not the NFE on CIFAR-10).

For each model it compiles ahead of time (several models at once, in threads: XLA
compilation releases the GIL), then times, after one warm-up call:

- train step: `Trainer.step` (forward solve, loss, backward, optimizer update);
- backward: train step minus `Trainer.forward_loss` (the forward pass with the loss), i.e.
  the adjoint solve plus the gradient and the update;
- predict: `Trainer.predict` (forward solve and head, no loss);

each the median of `--steps` calls, seconds per batch, on freshly initialised weights.
Compilation is reported apart.

The run keeps to `--budget-s` seconds of wall clock: models are queued in priority order
(each variant on every size before the next variant); no new compilation starts after 60%
of the budget, and a compiled model whose timing (estimated from the costliest model timed
so far) would overrun the budget is skipped. Skipped rows are marked in the table, which is
rewritten after every model, so a run cut short by a time limit still leaves its results.

Usage:
    python scripts/gpu_bench.py [--configs small,large] [--steps 3] [--budget-s 360]
    python scripts/gpu_bench.py --tiny     # CPU smoke run: tiny model, batch 4, 2 rows

Prints progress with timestamps to stderr and the markdown table to stdout; writes the
table to $OUT/gpu_table.md when OUT is set (and to --table when given).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from imex_deq import experiments, nn
from imex_deq.experiments import (
    ADJOINTS,
    SOLVERS,
    TrainConfig,
    Trainer,
    build_conv_model,
    make_adjoint,
    make_solver,
    with_model_precision,
)

VARIANTS = (
    # (row label, model variant, solver kind), in table order = run (priority) order
    ("Vanilla DEQ (continuous)", "vanilla", "continuous"),
    ("Vanilla DEQ (discrete)", "vanilla", "discrete"),
    ("Skip DEQ (continuous)", "skip", "continuous"),
    ("Skip DEQ (discrete)", "skip", "discrete"),
    ("Skip Reg. DEQ (continuous)", "skip-reg", "continuous"),
    ("Skip Reg. DEQ (discrete)", "skip-reg", "discrete"),
    ("Neural ODE", "neural-ode", "continuous"),
)
TINY_VARIANTS = "0,3"
"""--tiny runs these rows (both solvers, the Skip predictor) to keep a CPU smoke run short
(each model compiles for tens of seconds on two CPU cores); `--tiny --variants all` runs all."""


def tiny_config() -> nn.MultiscaleConfig:
    """Two branches of 4 and 8 channels on 8x8x3 images: a small graph for CPU smoke runs."""
    return nn.MultiscaleConfig(channels=(4, 8), image_size=(8, 8), in_channels=3)


CONFIGS = {
    "small": ("CIFAR-small", experiments.cifar_small),
    "large": ("CIFAR-large", experiments.cifar_large),
    "tiny": ("tiny", tiny_config),
}
COST_PRIOR = {"small": 1.0, "large": 2.5, "tiny": 0.2}
"""Relative cost of timing one model of each size, for estimating an unseen size from a
seen one (only used to skip models that would overrun the budget)."""


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.perf_counter() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


@dataclasses.dataclass
class Row:
    config: str
    label: str
    params: int | None = None
    step_s: float | None = None
    backward_s: float | None = None
    predict_s: float | None = None
    forward_s: float | None = None
    nfe: float | None = None
    backward_nfe: float | None = None
    compile_s: float | None = None
    total_s: float | None = None
    note: str = ""


@dataclasses.dataclass
class Job:
    """One model: what to build, then its arguments and compiled functions."""

    config_key: str
    label: str
    variant: str
    kind: str
    row: Row
    args: dict | None = None
    compiled: dict | None = None


def build(args, job: Job) -> None:
    """Model, optimizer state, batch and trainer of one job (no compilation)."""
    config = CONFIGS[job.config_key][1]()
    solver_name = "continuous" if job.kind == "continuous" else args.discrete_solver
    train_config = TrainConfig(
        model=job.variant,
        solver=solver_name,
        architecture="conv",
        batch_size=args.batch_size,
        rtol=args.rtol,
        max_steps=args.max_steps,
        backward=args.backward,
        precision=args.precision,
    )
    model = build_conv_model(
        job.variant,
        make_solver(solver_name, args.rtol),
        config=config,
        key=jax.random.PRNGKey(args.seed),
        adjoint=make_adjoint(args.backward, args.rtol),
        max_steps=args.max_steps,
    )
    model = with_model_precision(model, args.precision)
    trainer = Trainer(train_config, optax.adam(1e-3))
    opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(args.seed)
    h, w = config.image_size
    x = jnp.asarray(rng.standard_normal((args.batch_size, h, w, config.in_channels)), jnp.float32)
    y = jnp.asarray(rng.integers(0, config.num_classes, args.batch_size), jnp.int32)
    key = jax.random.PRNGKey(args.seed)
    job.row.params = nn.count_parameters(model)
    job.args = {
        "step": (trainer, model, opt_state, x, y, key),
        "forward": (trainer, model, x, y, key),
        "predict": (trainer, model, x),
    }


FUNCTIONS = {"step": Trainer.step, "forward": Trainer.forward_loss, "predict": Trainer.predict}


def compile_job(job: Job) -> Job:
    """Ahead-of-time compile the job's train step, forward and predict (thread-safe: the
    XLA compilation releases the GIL, so several jobs compile at once)."""
    start = time.perf_counter()
    job.compiled = {name: FUNCTIONS[name].lower(*job.args[name]).compile() for name in FUNCTIONS}
    job.row.compile_s = time.perf_counter() - start
    return job


def time_job(args, job: Job) -> None:
    """Warm up once, then the median of --steps calls of each compiled function."""
    start = time.perf_counter()
    run, a = job.compiled, job.args
    for name in FUNCTIONS:
        jax.block_until_ready(run[name](*a[name]))
    _, _, metrics = run["step"](*a["step"])
    row = job.row
    row.nfe = float(metrics["nfe"])
    row.backward_nfe = float(metrics["backward_nfe"])
    steps = [timed(run["step"], *a["step"]) for _ in range(args.steps)]
    forwards = [timed(run["forward"], *a["forward"]) for _ in range(args.steps)]
    predicts = [timed(run["predict"], *a["predict"]) for _ in range(args.steps)]
    row.step_s = statistics.median(steps)
    row.forward_s = statistics.median(forwards)
    row.backward_s = max(row.step_s - row.forward_s, 0.0)
    row.predict_s = statistics.median(predicts)
    row.total_s = time.perf_counter() - start


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0 or value >= 10**-digits:
        return f"{value:.{digits}f}"
    return f"{value:.2e}"


def table(rows: list[Row], args) -> str:
    device = jax.devices()[0]
    lines = [
        f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"python {platform.python_version()}. Batch {args.batch_size} random "
        f"{'8x8x3' if args.tiny else '32x32x3'} images; median of {args.steps} timed calls per "
        f"entry, freshly initialised weights. Solvers: continuous = SteadyStateODE (Tsit5), "
        f"discrete = {args.discrete_solver}; rtol {args.rtol}, max_steps {args.max_steps}; "
        f"backward = implicit adjoint ({args.backward}); f computed in {args.precision}"
        + (
            f", matmul precision {args.matmul_precision}"
            if args.matmul_precision
            else ", JAX's default matmul precision (may use TF32 on recent NVIDIA GPUs)"
        )
        + ". Train step = forward solve + loss + backward + Adam; Backward = train step − "
        "forward (with loss); Predict = forward solve + head. NFE = mean evaluations of f per "
        "sample (forward; backward = the adjoint's VJPs). Compile = ahead-of-time compilation "
        f"of the three functions, wall-clock, with up to {args.compile_workers} models "
        "compiling at once.",
        "",
    ]
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    for config in dict.fromkeys(r.config for r in rows):
        group = sorted((r for r in rows if r.config == config), key=lambda r: order[r.label])
        lines += [
            f"### {config}",
            "",
            (
                "| Model | Params | Train step (s/batch) | Backward (s/batch) | "
                "Predict (s/batch) | NFE fwd | NFE bwd | Compile (s) | Note |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in group:
            params = "—" if r.params is None else f"{r.params / 1e6:.3f}M"
            lines.append(
                f"| {r.label} | {params} | {_fmt(r.step_s)} | {_fmt(r.backward_s)} | "
                f"{_fmt(r.predict_s)} | {_fmt(r.nfe, 1)} | {_fmt(r.backward_nfe, 1)} | "
                f"{_fmt(r.compile_s, 1)} | {r.note} |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: tiny 2-branch model on 8x8 images, batch 4, 1 timed call, "
        f"rows {TINY_VARIANTS} unless --variants is given",
    )
    p.add_argument("--configs", default="small,large", help="comma-separated: small, large, tiny")
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated row indices (default all): "
        + "; ".join(f"{i}={v[0]}" for i, v in enumerate(VARIANTS)),
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed calls per entry")
    p.add_argument("--rtol", type=float, default=5e-3)
    p.add_argument(
        "--max-steps",
        type=int,
        default=30,
        help="solver step cap (ODE steps for the continuous solver)",
    )
    p.add_argument(
        "--discrete-solver",
        default="anderson",
        choices=tuple(name for name in SOLVERS if name != "continuous"),
    )
    p.add_argument(
        "--backward",
        default="gmres",
        choices=tuple(name for name, spec in ADJOINTS.items() if spec.implicit),
        help="an implicit adjoint (its linear solver)",
    )
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--matmul-precision",
        default=None,
        help="set jax_default_matmul_precision (e.g. highest); default: JAX's",
    )
    p.add_argument(
        "--compile-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="models compiled concurrently (threads)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the whole run (from start-up; default 360, 1200 with "
        "--tiny, whose CPU compilation is slow): compilation "
        "stops starting new models at 60%% of it, and a model whose estimated "
        "timing cost would overrun it is skipped",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.configs, args.batch_size, args.steps = "tiny", 4, 1
        args.max_steps = min(args.max_steps, 10)
        if args.variants is None:
            args.variants = TINY_VARIANTS
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.tiny else 360.0
    if args.variants in (None, "all"):
        args.variants = ",".join(str(i) for i in range(len(VARIANTS)))
    return args


def write_table(rows: list[Row], args, *, final: bool) -> str:
    """The table so far, to $OUT/gpu_table.md and --table (after every model, so that a
    run killed by a time limit still leaves its results)."""
    text = table(rows, args)
    out = os.environ.get("OUT")
    targets = [Path(out) / "gpu_table.md"] if out else []
    if args.table:
        targets.append(Path(args.table))
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + ("\n" if final else "\n(incomplete: run in progress)\n"))
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    chosen = [int(i) for i in args.variants.split(",")]
    log(f"devices: {jax.devices()}; configs {configs}; rows {chosen}; budget {args.budget_s:.0f} s")

    # Priority order: each variant on every size before the next variant.
    jobs = [
        Job(
            key,
            VARIANTS[i][0],
            VARIANTS[i][1],
            VARIANTS[i][2],
            Row(CONFIGS[key][0], VARIANTS[i][0]),
        )
        for i in chosen
        for key in configs
    ]
    rows = [job.row for job in jobs] + [
        Row(CONFIGS[key][0], VARIANTS[i][0], note="not run (--variants)")
        for i in range(len(VARIANTS))
        if i not in chosen
        for key in configs
    ]
    for job in jobs:
        build(args, job)
    log(f"built {len(jobs)} models; compiling with {args.compile_workers} workers")

    compile_deadline = 0.6 * args.budget_s
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_workers)
    futures = {pool.submit(compile_job, job): job for job in jobs}
    for future in concurrent.futures.as_completed(futures):
        job = futures[future]
        name = f"{job.row.config} / {job.label}"
        try:
            future.result()
            log(f"compiled {name}: {job.row.compile_s:.1f} s")
        except Exception as error:  # noqa: BLE001 - report it and go on with the others
            log(f"FAILED to compile {name}: {type(error).__name__}: {error}")
            job.row.note = f"failed: {type(error).__name__}"
        if elapsed() > compile_deadline:
            cancelled = [f for f in futures if f.cancel()]
            if cancelled:
                log(f"compile deadline ({compile_deadline:.0f} s): {len(cancelled)} not started")
    pool.shutdown(wait=True)
    for future, job in futures.items():
        if future.cancelled():
            job.row.note = "skipped (budget: not compiled)"

    cost: dict[str, float] = {}
    for job in jobs:
        if job.compiled is None:
            continue
        name = f"{job.row.config} / {job.label}"
        estimate = cost.get(job.config_key)
        if estimate is None and cost:
            seen, value = max(cost.items(), key=lambda kv: kv[1])
            estimate = value * COST_PRIOR[job.config_key] / COST_PRIOR[seen]
        remaining = args.budget_s - elapsed()
        if estimate is not None and estimate > remaining:
            log(f"SKIP {name}: timing estimated {estimate:.0f} s > {remaining:.0f} s left")
            job.row.note = f"skipped (budget; timing est. {estimate:.0f} s)"
            job.compiled = None
            continue
        try:
            time_job(args, job)
        except Exception as error:  # noqa: BLE001 - report it and go on with the others
            log(f"FAILED {name}: {type(error).__name__}: {error}")
            job.row.note = f"failed: {type(error).__name__}"
            job.compiled = None
            continue
        cost[job.config_key] = max(cost.get(job.config_key, 0.0), job.row.total_s)
        memory = ""
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
        if "peak_bytes_in_use" in stats:
            memory = f", peak memory so far {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
        r = job.row
        log(
            f"timed {name}: step {r.step_s:.4f} s, backward {r.backward_s:.4f} s, predict "
            f"{r.predict_s:.4f} s, NFE {r.nfe:.1f}/{r.backward_nfe:.1f}, timing took "
            f"{r.total_s:.1f} s{memory}"
        )
        job.compiled = None  # free the executable
        write_table(rows, args, final=False)
    text = write_table(rows, args, final=True)
    print(text, flush=True)
    log("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
