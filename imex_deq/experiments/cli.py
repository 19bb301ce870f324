"""The `imex-deq` command line: `train` one model, or `reproduce` a paper table."""

import argparse
import dataclasses
import json
import sys

from .._regularisers import JACOBIAN_NORMS
from ..data import DataError
from ._checkpoint import CheckpointError
from ._compile_cache import (
    default_compile_cache_dir,
    enable_compile_cache,
    enable_default_compile_cache,
)
from ._config import ARCHITECTURES, LR_SCHEDULES, PRECISIONS, TrainConfig
from ._hugepages import restart_with_huge_pages
from ._registry import ADJOINTS, ODE_SOLVERS, SOLVERS, VARIANTS
from ._reproduce import EXPERIMENTS, reproduce
from ._training import NonFiniteError, train


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    add = parser.add_argument
    add("--dataset", default=d.dataset, help="digits | fashion-mnist | mnist=PATH | cifar10=PATH")
    add("--batch-size", type=int, default=d.batch_size)
    add("--learning-rate", type=float, default=d.learning_rate)
    add(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d.lr_schedule,
        help="constant, or cosine annealing to 0 over all epochs",
    )
    add(
        "--skip-weight",
        type=float,
        default=d.skip_weight,
        help="λ_skip (paper 0.01; default 1: measured fewer NFE at equal accuracy)",
    )
    add(
        "--jac-prob",
        type=float,
        default=d.jac_prob,
        help="probability that a step is Jacobian-regularised (Bai et al. 2021: 0.02-0.05 "
        "with a larger --jac-weight; 1: every step, the paper's)",
    )
    add(
        "--jac-on-demand",
        type=float,
        metavar="SHARE",
        default=None,
        help="Jacobian-regularise only the steps where fewer than SHARE of the batch's "
        "solves converged (needs --jac-weight or a +jac row)",
    )
    add(
        "--jac-norm",
        choices=sorted(JACOBIAN_NORMS),
        default=d.jac_norm,
        help="the Jacobian term: frobenius (Bai et al. 2021, ‖∂f/∂z‖_F² / d) or spectral "
        "(the squared spectral radius, by power iteration)",
    )
    add("--augment", action="store_true", help="random crop (padding 4) and horizontal flip")
    add("--pretrain-steps", type=int, default=d.pretrain_steps)
    add("--pretrain-depth", type=int, default=d.pretrain_depth)
    add("--rtol", type=float, default=d.rtol, help="relative residual to stop at")
    add(
        "--ode-solver",
        choices=tuple(ODE_SOLVERS),
        default=d.ode_solver,
        help="the continuous DEQ's ODE solver (solver 'continuous' only)",
    )
    add(
        "--ode-rtol",
        type=float,
        default=None,
        help="the continuous DEQ's step-size control, relative (default: 5 x --rtol for "
        "Tsit5, tightened by the solver itself where a solve stalls)",
    )
    add(
        "--ode-atol",
        type=float,
        default=None,
        help="its absolute part (default: --rtol / 2 for Tsit5)",
    )
    add("--max-steps", type=int, default=d.max_steps)
    add(
        "--backward",
        choices=tuple(ADJOINTS),
        default=d.backward,
        help=", ".join(f"{name}: {spec.label}" for name, spec in ADJOINTS.items()),
    )
    add("--limit-train", type=int, default=None, help="use only the first N training images")
    add("--limit-test", type=int, default=None, help="use only the first N test images")
    add("--evals-per-epoch", type=int, default=d.evals_per_epoch)
    add("--no-progress", action="store_true", help="hide the progress bar")
    add(
        "--data-parallel",
        action="store_true",
        help="split each batch over all devices (parameters replicated)",
    )
    add(
        "--distributed",
        action="store_true",
        help="join a multi-host run first (jax.distributed.initialize; set "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); implies --data-parallel",
    )
    add(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="keep compiled programs in DIR across runs (the command's default: "
        f"{default_compile_cache_dir()})",
    )
    add("--no-compile-cache", action="store_true", help="compile afresh and keep nothing")
    add(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="dtype the DEQ's f computes in (parameters and state stay float32)",
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser (unknown options are an error, as argparse does)."""
    top = argparse.ArgumentParser(prog="imex-deq", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)

    run = commands.add_parser("train", help="train one model")
    run.add_argument("--model", choices=tuple(VARIANTS), default="skip-reg")
    run.add_argument("--solver", choices=tuple(SOLVERS), default="continuous")
    run.add_argument("--architecture", choices=ARCHITECTURES, default="dense")
    run.add_argument("--epochs", type=int, default=3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--jac-weight", type=float, default=0.0, help="λ_jac (paper 1.0)")
    run.add_argument("--out", default=None, help="folder for log, checkpoint and summary")
    run.add_argument("--checkpoint-every", type=int, default=TrainConfig().checkpoint_every)
    run.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    _add_training_options(run)

    rep = commands.add_parser("reproduce", help="reproduce a table of the paper")
    rep.add_argument("experiment", choices=tuple(EXPERIMENTS))
    rep.add_argument("--seeds", type=int, default=2)
    rep.add_argument("--epochs", type=int, default=3)
    rep.add_argument(
        "--solvers",
        default="continuous,anderson",
        help="comma-separated solver kinds, one table column each (first gets the neural ODE)",
    )
    rep.add_argument("--no-jac", action="store_true", help="skip the Jacobian-regularised rows")
    rep.add_argument(
        "--models",
        default=",".join(VARIANTS),
        help="comma-separated variants to train (default: all); a row label such as "
        "skip+jac trains that row alone",
    )
    rep.add_argument("--out", default="results")
    rep.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted runs from their last checkpoint (runs that finished with "
        "the same settings are reused either way)",
    )
    rep.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: the table and plots of the finished runs, and how far each "
        "unfinished one got",
    )
    _add_training_options(rep)
    return top


def _base_config(args: argparse.Namespace, **extra) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        skip_weight=args.skip_weight,
        jac_prob=args.jac_prob,
        jac_on_demand=args.jac_on_demand,
        jac_norm=args.jac_norm,
        augment=args.augment,
        pretrain_steps=args.pretrain_steps,
        pretrain_depth=args.pretrain_depth,
        rtol=args.rtol,
        ode_solver=args.ode_solver,
        ode_rtol=args.ode_rtol,
        ode_atol=args.ode_atol,
        max_steps=args.max_steps,
        backward=args.backward,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        evals_per_epoch=args.evals_per_epoch,
        progress=not args.no_progress,
        data_parallel=args.data_parallel,
        distributed=args.distributed,
        precision=args.precision,
        **extra,
    )


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        config = _base_config(
            args,
            model=args.model,
            solver=args.solver,
            architecture=args.architecture,
            epochs=args.epochs,
            seed=args.seed,
            jac_weight=args.jac_weight,
            out_dir=args.out,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
        summary = train(config)
        shown = {k: v for k, v in summary.items() if k not in ("history", "config")}
        print(json.dumps(shown, indent=1))
        return
    solvers = tuple(s.strip() for s in args.solvers.split(",") if s.strip())
    bad = [s for s in solvers if s not in SOLVERS]
    if not solvers or bad:
        raise ValueError(f"--solvers: unknown {bad or solvers}; choose from {', '.join(SOLVERS)}.")
    for name in ("seeds", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    reproduce(
        args.experiment,
        dataset=args.dataset,
        seeds=args.seeds,
        epochs=args.epochs,
        solvers=solvers,
        out_dir=args.out,
        with_jac=not args.no_jac,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        report_only=args.report_only,
        # Each run's own folder replaces out_dir; it is set here so resume validates.
        base=dataclasses.replace(
            # jac_weight is set per row; 1 here lets --jac-on-demand pass validation.
            _base_config(args, jac_weight=float(args.jac_on_demand is not None)),
            dataset=args.dataset,
            out_dir=args.out,
            resume=args.resume,
        ),
    )


def _set_up_compile_cache(args: argparse.Namespace, as_command: bool) -> None:
    """`--compile-cache DIR` turns the persistent cache on; run as the command it is on by
    default, in its default folder; `--no-compile-cache` keeps it off."""
    if args.no_compile_cache:
        if args.compile_cache is not None:
            raise ValueError("--compile-cache and --no-compile-cache contradict each other.")
        return
    if args.compile_cache is not None:
        enable_compile_cache(args.compile_cache)
    elif as_command:
        enable_default_compile_cache()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `imex-deq`; returns the exit status. Run as the command (no `argv`),
    it first restarts itself once with transparent huge pages for XLA's buffers where
    that helps (`_hugepages`; `IMEX_DEQ_HUGEPAGES=0` opts out), and keeps compiled
    programs in the persistent cache unless told `--no-compile-cache`."""
    if argv is None:
        restart_with_huge_pages(["-m", "imex_deq.experiments.cli", *sys.argv[1:]])
    args = parser().parse_args(argv)
    try:
        _set_up_compile_cache(args, as_command=argv is None)
        _run(args)
    except (ValueError, DataError, CheckpointError) as error:
        print(f"imex-deq: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:  # a run that diverged: not a usage error
        print(f"imex-deq: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
