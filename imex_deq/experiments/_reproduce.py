"""`imex-deq reproduce`: every variant × seed, then the paper-style table and plots."""

import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from ..data import load_dataset
from ._checkpoint import read_checkpoint_meta, write_atomically
from ._config import TrainConfig
from ._registry import BASELINES, DEQ_VARIANTS, VARIANTS
from ._training import CHECKPOINT, CONVERGED_WARNING_BELOW, SUMMARY, total_steps, train

EXPERIMENTS = {
    "mnist-dense": "dense",
    "mnist-conv": "conv",
    "cifar10-small": "cifar-small",
    "cifar10-large": "cifar-large",
}
"""Experiment name -> `TrainConfig.architecture`. The CIFAR-10 ones read
`--dataset cifar10=PATH` and train with the paper's augmentation."""

PAPER_MNIST_DENSE = {
    "vanilla": {"test_accuracy": 97.93, "test_nfe": 18.3, "train_min": 5.20, "predict_s": 0.038},
    "vanilla+jac": {"test_accuracy": 98.12, "test_nfe": 5.0, "train_min": 7.32, "predict_s": 0.011},
    "skip": {"test_accuracy": 97.76, "test_nfe": 4.0, "train_min": 1.71, "predict_s": 0.010},
    "skip-reg": {"test_accuracy": 97.97, "test_nfe": 4.0, "train_min": 1.30, "predict_s": 0.010},
}
"""The paper's MNIST-dense continuous-DEQ table (3 seeds); Skip rows with Jacobian
regularisation and the neural ODE are not in it."""

PAPER_CIFAR = {
    ("cifar10-small", "discrete"): {"vanilla": {"test_accuracy": 81.2, "step_s": 0.651}},
    ("cifar10-small", "continuous"): {
        "vanilla": {"test_accuracy": 80.8, "step_s": 0.753, "backward_s": 0.261},
        "neural-ode": {"test_accuracy": 83.5, "step_s": 1.608, "backward_s": 1.240},
    },
    ("cifar10-large", "continuous"): {
        "vanilla": {"test_accuracy": 89.4, "step_s": 1.284},
        "neural-ode": {"test_accuracy": 89.0, "step_s": 5.267},
    },
}
"""The paper's CIFAR-10 figures quoted in the issue (training s/batch on a GPU)."""


def paper_figures(experiment: str, solver: str) -> dict:
    """The paper's figures for one experiment and solver kind, by variant label."""
    if experiment == "mnist-dense":
        return PAPER_MNIST_DENSE
    kind = "continuous" if solver == "continuous" else "discrete"
    return PAPER_CIFAR.get((experiment, kind), {})


COLUMNS = (
    ("test accuracy %", "test_accuracy", 100.0),
    ("test NFE", "test_nfe", 1.0),
    ("test converged %", "test_converged", 100.0),
    ("train time (min)", "train_min", 1.0),
    ("step (s/batch)", "step_s", 1.0),
    ("backward (s/batch)", "backward_s", 1.0),
    ("predict (s/batch)", "predict_s", 1.0),
    ("compile (s)", "compile_time_s", 1.0),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    model: str
    jac: bool
    solver: str

    @property
    def label(self) -> str:
        return self.model + ("+jac" if self.jac else "")


def variants(
    solvers: tuple[str, ...], with_jac: bool, models: tuple[str, ...] = tuple(VARIANTS)
) -> list[Variant]:
    """Vanilla / Skip / Skip Reg. (± Jacobian regularisation) per solver, then the
    baselines once: the neural ODE and the explicit one-pass network f(0, x); only the
    `models` asked for. A model name asks for its rows with and without Jacobian
    regularisation, a row label such as `skip+jac` for that row alone."""
    regularised = {f"{model}+jac" for model in DEQ_VARIANTS}
    unknown = sorted(set(models) - set(VARIANTS) - regularised)
    if unknown or not models:
        raise ValueError(
            f"models: unknown {unknown or list(models)}; choose from "
            f"{', '.join(VARIANTS)} (or a row label such as skip+jac)."
        )
    if not with_jac and regularised & set(models):
        raise ValueError(f"models: {sorted(regularised & set(models))} contradict --no-jac.")
    rows = [
        Variant(model, jac, solver)
        for solver in solvers
        for model in DEQ_VARIANTS
        for jac in ((False, True) if with_jac else (False,))
    ]
    baselines = [Variant(model, False, solvers[0]) for model in BASELINES]
    return [v for v in rows + baselines if v.model in models or v.label in models]


def _stats(runs: list[dict], key: str, scale: float) -> tuple[float, float]:
    values = [run["train_time_s"] / 60 if key == "train_min" else run[key] * scale for run in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(mean: float, std: float, vanilla: float | None, paper: float | None) -> str:
    digits = 4 if abs(mean) < 0.1 else 2
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    notes = []
    if vanilla:
        notes.append(f"{mean / vanilla:.2f}× vanilla")
    if paper is not None:
        notes.append(f"paper {paper}")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def table(results: dict[Variant, list[dict]], solver: str, paper: dict) -> str:
    """Markdown table of one solver kind's rows: mean ± std over seeds, with the ratio to
    the Vanilla DEQ and the paper's value beside each figure."""
    rows = [v for v in results if v.solver == solver]
    vanilla = next((v for v in rows if v.model == "vanilla" and not v.jac), None)
    header = "| model | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for variant in rows:
        cells = []
        for _, key, scale in COLUMNS:
            if any(key not in run and key != "train_min" for run in results[variant]):
                cells.append("—")  # a summary written before the column existed
                continue
            mean, std = _stats(results[variant], key, scale)
            base = None
            measured = key == "train_min" or key in results[vanilla or variant][0]
            if vanilla is not None and variant != vanilla and measured:
                base = _stats(results[vanilla], key, scale)[0]
            cells.append(_cell(mean, std, base, paper.get(variant.label, {}).get(key)))
        lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_history(runs: list[dict], key: str) -> list[float]:
    length = min(len(run["history"]) for run in runs)
    return [statistics.mean(run["history"][i][key] for run in runs) for i in range(length)]


def time_to_accuracy(runs: list[dict], target: float) -> float | None:
    """Training seconds (compile excluded) until the seed-averaged test accuracy first
    reaches `target`, read at the evaluations in the run history; `None` if never."""
    accuracy = _mean_history(runs, "test_accuracy")
    seconds = _mean_history(runs, "train_time_s")
    return next((t for a, t in zip(accuracy, seconds) if a >= target), None)


ACCURACY_SLACK = 0.005
"""How far below Vanilla's final test accuracy counts as "the same accuracy" (0.5 points):
seed-to-seed spread is about that large, so an exact target would turn noise into
"never reached"."""


def _speedups_to_vanilla_accuracy(results, solver) -> list[str]:
    vanilla = results.get(Variant("vanilla", False, solver))
    if not vanilla or not all(run["history"] for run in vanilla):
        return []
    target = _stats(vanilla, "test_accuracy", 1.0)[0] - ACCURACY_SLACK
    vanilla_time = time_to_accuracy(vanilla, target)
    if not vanilla_time:
        return []
    lines = []
    for model in ("skip", "skip-reg"):
        runs = results.get(Variant(model, False, solver))
        if not runs:
            continue
        seconds = time_to_accuracy(runs, target)
        verdict = "never reached" if seconds is None else f"{vanilla_time / seconds:.2f}x faster"
        lines.append(
            f"{model} vs Vanilla training time to {100 * target:.2f}% test accuracy (Vanilla's "
            f"final minus {100 * ACCURACY_SLACK:g} points): {verdict} (paper 4.01x on MNIST dense)"
        )
    return lines


def _prediction_vs_explicit(results, solver) -> list[str]:
    explicit = _explicit_runs(results)
    if not explicit:
        return []
    base = _stats(explicit, "predict_s", 1.0)[0]
    lines = []
    for model in ("vanilla", "skip", "skip-reg"):
        runs = results.get(Variant(model, False, solver))
        if runs and base > 0:
            ratio = _stats(runs, "predict_s", 1.0)[0] / base
            lines.append(f"{model} prediction time vs the explicit network: {ratio:.2f}x")
    return lines


def _explicit_runs(results) -> list[dict] | None:
    return next((r for v, r in results.items() if v.model == "explicit"), None)


def _accuracy_by_seed(runs: list[dict]) -> dict[int, float]:
    """Test accuracy keyed by the run's seed (its position where the summary has no config)."""
    return {
        run.get("config", {}).get("seed", i): run["test_accuracy"] for i, run in enumerate(runs)
    }


def _accuracy_vs_explicit(results, solver) -> list[str]:
    """Each DEQ row's test accuracy minus the explicit network's, paired by seed (both
    start from the same seed), as mean ± standard error over the shared seeds: whether
    "every DEQ at least the explicit network" holds beyond seed noise."""
    explicit = _explicit_runs(results)
    if not explicit:
        return []
    explicit_by_seed = _accuracy_by_seed(explicit)
    lines = []
    for variant, runs in results.items():
        if variant.solver != solver or variant.model in BASELINES:
            continue
        differences = [
            100 * (accuracy - explicit_by_seed[seed])
            for seed, accuracy in _accuracy_by_seed(runs).items()
            if seed in explicit_by_seed
        ]
        if not differences:
            continue
        mean = statistics.mean(differences)
        n = len(differences)
        if n == 1:
            lines.append(
                f"{variant.label} vs the explicit network, test accuracy: {mean:+.2f} points "
                "(one seed)"
            )
            continue
        error = statistics.stdev(differences) / n**0.5
        if mean >= 0:
            verdict = "at least the explicit network's"
        elif mean < -2 * error:
            verdict = "below, by more than 2 standard errors"
        else:
            verdict = "below, within 2 standard errors (not significant)"
        lines.append(
            f"{variant.label} vs the explicit network, test accuracy paired by seed: "
            f"{mean:+.2f} ± {error:.2f} points (mean ± standard error, {n} seeds): {verdict}"
        )
    return lines


def _not_converged(results, solver) -> list[str]:
    """The runs whose final test solves mostly stopped at the cap: their gradients were
    inexact (`NonConvergenceWarning`), so their rows mix two regimes."""
    failed = [
        f"{run.get('name', variant.label)} ({100 * run['test_converged']:.1f}%)"
        for variant, runs in results.items()
        if variant.solver == solver and variant.model not in BASELINES
        for run in runs
        if run.get("test_converged", 1.0) < CONVERGED_WARNING_BELOW
    ]
    if not failed:
        return []
    share = f"{100 * CONVERGED_WARNING_BELOW:.0f}%"
    line = (
        f"not converged (fewer than {share} of the test solves met the tolerance, so "
        f"training followed inexact gradients): {', '.join(failed)}"
    )
    return [line]


def headline_ratios(results: dict[Variant, list[dict]], solver: str) -> list[str]:
    """The paper's claims as measured ratios."""

    def mean(model, key, jac=False):
        runs = results.get(Variant(model, jac, solver))
        return None if runs is None else _stats(runs, key, 1.0)[0]

    lines = []
    vanilla_time, skip_reg_time = mean("vanilla", "train_min"), mean("skip-reg", "train_min")
    if vanilla_time and skip_reg_time:
        lines.append(
            f"Skip Reg. vs Vanilla training time: {vanilla_time / skip_reg_time:.2f}x (paper 4.0x)"
        )
        lines.append(
            f"test NFE Skip Reg. {mean('skip-reg', 'test_nfe'):.1f} vs Vanilla "
            f"{mean('vanilla', 'test_nfe'):.1f} (paper 4.0 vs 18.3)"
        )
    node = mean("neural-ode", "train_min")
    if node and vanilla_time:
        lines.append(
            f"neural ODE vs continuous Vanilla DEQ training time: {node / vanilla_time:.2f}x "
            "(paper 2-4x)"
        )
        # backward_s is clamped at 0 when it is below timer noise: no ratio then.
        node_backward = mean("neural-ode", "backward_s")
        vanilla_backward = mean("vanilla", "backward_s")
        ratio = f"{node_backward / vanilla_backward:.2f}x" if vanilla_backward else "n/a"
        lines.append(f"neural ODE vs continuous Vanilla DEQ backward s/batch: {ratio}")
    return (
        lines
        + _speedups_to_vanilla_accuracy(results, solver)
        + _prediction_vs_explicit(results, solver)
        + _accuracy_vs_explicit(results, solver)
        + _not_converged(results, solver)
        + _cached_compiles(results, solver)
    )


def _cached_compiles(results: dict[Variant, list[dict]], solver: str) -> list[str]:
    cached = [
        v.label
        for v, runs in results.items()
        if v.solver == solver and any(run.get("compile_cached") for run in runs)
    ]
    if not cached:
        return []
    names = ", ".join(cached)
    return [f"compile (s) of {names}: read from the persistent compilation cache (cold: longer)"]


def plot(results: dict[Variant, list[dict]], path: Path, title: str) -> None:
    """Test accuracy, test NFE and training step time against training step, one line per
    variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("test_accuracy", "test accuracy (%)", 100.0),
        ("test_nfe", "test NFE per sample", 1.0),
        ("step_time_s", "training step time (s/batch)", 1.0),
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for variant, runs in results.items():
        steps = [h["step"] for h in runs[0]["history"]]
        for axis, (key, label, scale) in zip(axes, panels):
            values = np.mean([[h[key] * scale for h in run["history"]] for run in runs], 0)
            axis.plot(steps, values, marker="o", label=variant.label)
            axis.set_xlabel("training step")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


_PRESENTATION_ONLY = ("progress", "resume", "out_dir")
"""Options that do not change what a run computes (a results folder may be moved)."""


def _how_far(progress: dict | None) -> str:
    """How far an unfinished run got, from its `run_progress`."""
    if progress is None:
        return "not started"
    return f"checkpoint at step {progress['steps']:,} of {progress['of']:,}"


def run_progress(config: TrainConfig, train_size: int) -> dict | None:
    """What a run of `config` has done so far: steps done of all, and the evaluation
    records (test accuracy, NFE, converged share) up to its summary or last checkpoint;
    None if it never started."""
    summary = finished_run(config)
    path = Path(config.out_dir) / CHECKPOINT
    if summary is None and not path.is_file():
        return None
    meta = summary or read_checkpoint_meta(path)
    steps = summary["steps"] if summary else meta["global_step"]
    return {
        "steps": steps,
        "of": total_steps(config, train_size),
        "finished": summary is not None,
        "history": meta["history"],
        # Logs written before the baselines stopped recording a converged share show 0.
        "solves": config.model not in BASELINES,
    }


def progress_table(runs: dict[str, dict | None]) -> str:
    """Markdown table of how far each run got: steps, test accuracy at each evaluation,
    test NFE from the first evaluation to the last, and the last converged share."""
    lines = [
        "| run | steps done | test accuracy % at each evaluation | test NFE | converged % |",
        "|---|---|---|---|---|",
    ]
    for name, progress in runs.items():
        if progress is None:
            lines.append(f"| {name} | not started | | | |")
            continue
        history = progress["history"]
        done = f"{progress['steps']:,} of {progress['of']:,}"
        if progress["finished"]:
            done += " (finished)"
        accuracy = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in history)
        ends = history[:1] + history[1:][-1:]
        nfe = " → ".join(f"{r['test_nfe']:.2f}" for r in ends)
        solves = progress.get("solves", True)
        converged = history[-1].get("test_converged") if history and solves else None
        converged = "—" if converged is None else f"{100 * converged:.1f}"
        lines.append(f"| {name} | {done} | {accuracy} | {nfe} | {converged} |")
    return "\n".join(lines)


def finished_run(config: TrainConfig) -> dict | None:
    """The summary a finished run of exactly `config` left in `config.out_dir`, or None.

    Lets an interrupted `reproduce` start again without retraining what it had finished;
    a summary from a run with any other setting is not reused (that run is retrained)."""
    path = Path(config.out_dir) / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    # A setting added after the run was written counts as its default.
    stored = {**dataclasses.asdict(TrainConfig()), **summary.get("config", {})}
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists
    if any(stored.get(k) != v for k, v in wanted.items() if k not in _PRESENTATION_ONLY):
        return None
    return summary


def reproduce(
    experiment: str,
    *,
    dataset: str,
    seeds: int,
    epochs: int,
    solvers: tuple[str, ...],
    out_dir: str = "results",
    with_jac: bool = True,
    base: TrainConfig | None = None,
    models: tuple[str, ...] = tuple(VARIANTS),
    report_only: bool = False,
) -> dict:
    """Train every variant for every seed; write `table.md`, `results.json` and one PNG per
    solver kind under `out_dir/<experiment>`; print the table and headline ratios. With
    `base.jac_on_demand` or a `base.jac_norm` other than Frobenius the files are named for
    it (`table-jac-ondemand0.9.md`, `table-jac-spectral.md`, ...), so they sit beside the
    report of the rows with the plain Jacobian term.

    Runs already finished with the same settings under `out_dir` are read back, not
    retrained (`finished_run`); with `base.resume` an interrupted run continues from its
    last checkpoint. With `report_only` nothing is trained: the report covers the finished
    runs and says how far each unfinished one got."""
    if experiment not in EXPERIMENTS:
        raise ValueError(
            f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}."
        )
    base = base or TrainConfig()
    cifar = experiment.startswith("cifar10")
    if cifar != dataset.startswith("cifar10="):
        raise ValueError(
            f"{experiment} trains on "
            + (
                "CIFAR-10: pass --dataset cifar10=PATH."
                if cifar
                else f"MNIST-like images, not {dataset!r}."
            )
        )
    plan = variants(solvers, with_jac, models)
    if base.jac_variant_tag and not any(variant.jac for variant in plan):
        raise ValueError("jac_on_demand and jac_norm apply to the +jac rows, and none is planned.")
    if cifar:
        base = dataclasses.replace(base, augment=True)
    folder = Path(out_dir) / experiment
    tag = base.jac_variant_tag and "-jac" + base.jac_variant_tag
    data = load_dataset(dataset, limit_train=base.limit_train, limit_test=base.limit_test)
    results: dict[Variant, list[dict]] = {}
    unfinished: list[str] = []
    progress: dict[str, dict | None] = {}
    for index, variant in enumerate(plan):
        for seed in range(seeds):
            config = dataclasses.replace(
                base,
                model=variant.model,
                solver=variant.solver,
                jac_weight=1.0 if variant.jac else 0.0,
                jac_on_demand=base.jac_on_demand if variant.jac else None,
                jac_norm=base.jac_norm if variant.jac else "frobenius",
                architecture=EXPERIMENTS[experiment],
                dataset=dataset,
                epochs=epochs,
                seed=seed,
            )
            config = dataclasses.replace(config, out_dir=str(folder / "runs" / config.name))
            summary = finished_run(config)
            left_out = summary is None and report_only
            if left_out:
                how_far = _how_far(run_progress(config, len(data.x_train)))
                unfinished.append(f"{config.name}: {how_far}")
                status = "not finished, left out of the report"
            else:
                status = "finished earlier, reused" if summary else "training"
            print(f"[{index + 1}/{len(plan)}] {config.name}: {status}", file=sys.stderr, flush=True)
            if not left_out:
                results.setdefault(variant, []).append(summary or train(config, data))
            progress[config.name] = run_progress(config, len(data.x_train))
    report = [f"# {experiment} on {dataset}: {seeds} seed(s), {epochs} epoch(s)\n"]
    if base.jac_on_demand is not None:
        report.append(
            f"The +jac rows apply the Jacobian term only to steps where fewer than "
            f"{base.jac_on_demand:.0%} of the batch's solves converged.\n"
        )
    if base.jac_norm == "spectral":
        report.append(
            "The +jac rows penalise the squared spectral radius of ∂f/∂z at z* (power "
            "iteration), not the Frobenius norm.\n"
        )
    if unfinished:
        report.append("Not finished, left out: " + "; ".join(unfinished) + ".\n")
    for solver in solvers:
        paper = paper_figures(experiment, solver)
        report.append(f"## {solver}\n\n{table(results, solver, paper)}\n")
        report.extend(f"- {line}" for line in headline_ratios(results, solver))
        png = f"{experiment}-{solver}{tag}.png"
        report.append(f"\n![{solver}]({png})\n")
        solver_rows = {v: r for v, r in results.items() if v.solver == solver}
        if solver_rows:
            plot(solver_rows, folder / png, f"{experiment}, {solver}")
    report.append(f"## Progress of every run\n\n{progress_table(progress)}\n")
    text = "\n".join(report)
    write_atomically(folder / f"table{tag}.md", text.encode())
    serialisable = {f"{v.label}@{v.solver}": runs for v, runs in results.items()}
    write_atomically(folder / f"results{tag}.json", json.dumps(serialisable, indent=1).encode())
    print(text)
    return serialisable
