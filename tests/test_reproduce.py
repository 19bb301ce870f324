"""`reproduce`: every variant trained on tiny data, then table.md, results.json and a plot;
plus the table and headline ratios on hand-made results (no training)."""

import dataclasses
import json
import shutil

import pytest

from imex_deq.experiments import TrainConfig, _reproduce, reproduce
from imex_deq.experiments._reproduce import (
    Variant,
    headline_ratios,
    table,
    time_to_accuracy,
    variants,
)

ROWS = ("vanilla", "skip", "skip-reg", "neural-ode", "explicit")


TINY_BASE = TrainConfig(
    limit_train=64, limit_test=32, batch_size=16, progress=False, timing_batches=1
)


def _reproduce_tiny(out, base=TINY_BASE, **options):
    return reproduce(
        "mnist-dense",
        dataset="digits",
        seeds=1,
        epochs=1,
        solvers=("anderson",),
        with_jac=False,
        base=base,
        out_dir=str(out),
        **options,
    )


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out / "mnist-dense", _reproduce_tiny(out)


def test_table_has_every_variant_and_the_paper(reproduced):
    folder, _ = reproduced
    text = (folder / "table.md").read_text()
    assert text.startswith("# mnist-dense on digits: 1 seed(s), 1 epoch(s)")
    assert "## anderson" in text
    for row in ROWS:
        assert f"| {row} |" in text, row
    assert "+jac" not in text  # with_jac=False
    assert "paper 97.93" in text  # the vanilla row quotes the paper's accuracy
    assert "paper" in text and "× vanilla" in text
    assert "![anderson](mnist-dense-anderson.png)" in text


def test_only_the_deqs_report_converged_solves(reproduced):
    folder, _ = reproduced
    for row in ROWS:
        name = f"{row}-s0" if row in ("neural-ode", "explicit") else f"{row}-anderson-s0"
        summary = json.loads((folder / "runs" / name / "summary.json").read_text())
        assert ("test_converged" in summary) == (row not in ("neural-ode", "explicit")), row


def test_headline_ratio_lines(reproduced, capsys):
    folder, _ = reproduced
    text = (folder / "table.md").read_text()
    for start in (
        "- Skip Reg. vs Vanilla training time: ",
        "- test NFE Skip Reg. ",
        "- neural ODE vs continuous Vanilla DEQ training time: ",
        "- neural ODE vs continuous Vanilla DEQ backward s/batch: ",
        "- skip-reg prediction time vs the explicit network: ",
        "- skip-reg vs Vanilla training time to ",
    ):
        assert start in text, start


def test_results_json(reproduced):
    folder, returned = reproduced
    stored = json.loads((folder / "results.json").read_text())
    assert sorted(stored) == sorted(f"{row}@anderson" for row in ROWS)
    assert sorted(returned) == sorted(stored)
    for key, runs in stored.items():
        assert len(runs) == 1, key
        run = runs[0]
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["steps"] == 4
        assert run["config"]["solver"] == "anderson"
        assert run["config"]["limit_train"] == 64
        assert run["history"] and run["history"][-1]["step"] == 4
    # Each run kept its own folder with log, checkpoint and summary.
    runs = sorted(p.name for p in (folder / "runs").iterdir())
    assert runs == sorted(
        ["vanilla-anderson-s0", "skip-anderson-s0", "skip-reg-anderson-s0", "neural-ode-s0",
         "explicit-s0"]
    )  # fmt: skip
    for name in runs:
        assert (folder / "runs" / name / "summary.json").is_file()


def test_rerun_reuses_finished_runs(reproduced, monkeypatch):
    folder, first = reproduced

    def no_training(config, data=None):
        raise AssertionError(f"{config.name} was retrained")

    monkeypatch.setattr(_reproduce, "train", no_training)
    # progress is presentation only: a rerun with it on still reuses every run.
    again = _reproduce_tiny(folder.parent, dataclasses.replace(TINY_BASE, progress=True))
    assert again == json.loads((folder / "results.json").read_text())
    assert sorted(again) == sorted(first)


def test_finished_run_not_reused_when_a_setting_changed(reproduced):
    folder, _ = reproduced
    config = TrainConfig(
        **{**dataclasses.asdict(TINY_BASE), "model": "vanilla", "solver": "anderson"},
    )
    run_dir = folder / "runs" / "vanilla-anderson-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    same = TrainConfig(**summary["config"])
    assert _reproduce.finished_run(same) == summary
    for change in ({"learning_rate": 0.5}, {"limit_train": 48}, {"seed": 1}):
        assert _reproduce.finished_run(dataclasses.replace(same, **change)) is None, change
    assert _reproduce.finished_run(dataclasses.replace(config, out_dir=str(folder))) is None


def test_finished_run_from_before_a_setting_existed_counts_as_its_default(reproduced, tmp_path):
    folder, _ = reproduced
    summary = json.loads((folder / "runs" / "vanilla-anderson-s0" / "summary.json").read_text())
    del summary["config"]["lr_schedule"]  # as written before the option was added
    summary["config"]["out_dir"] = str(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    old = TrainConfig(**summary["config"])
    assert old.lr_schedule == "constant"
    assert _reproduce.finished_run(old) == summary
    assert _reproduce.finished_run(dataclasses.replace(old, lr_schedule="cosine")) is None


def test_moved_results_folder_is_still_reused(reproduced, tmp_path):
    folder, _ = reproduced
    moved = tmp_path / "vanilla-anderson-s0"
    shutil.copytree(folder / "runs" / "vanilla-anderson-s0", moved)
    summary = json.loads((moved / "summary.json").read_text())
    config = TrainConfig(**{**summary["config"], "out_dir": str(moved)})
    assert _reproduce.finished_run(config) == summary


def test_report_only_trains_nothing_and_says_how_far_the_rest_got(
    reproduced, tmp_path, monkeypatch
):
    folder, _ = reproduced
    copy = tmp_path / "mnist-dense"
    shutil.copytree(folder, copy)
    (copy / "runs" / "skip-anderson-s0" / "summary.json").unlink()  # interrupted at the end
    shutil.rmtree(copy / "runs" / "neural-ode-s0")  # never started

    def no_training(config, data=None):
        raise AssertionError(f"{config.name} was trained")

    monkeypatch.setattr(_reproduce, "train", no_training)
    returned = _reproduce_tiny(tmp_path, report_only=True)
    assert sorted(returned) == sorted(
        f"{row}@anderson" for row in ROWS if row not in ("skip", "neural-ode")
    )
    text = (copy / "table.md").read_text()
    assert (
        "Not finished, left out: skip-anderson-s0: checkpoint at step 4 of 4; "
        "neural-ode-s0: not started." in text
    )
    assert "| skip |" not in text and "| neural-ode |" not in text
    assert "| skip-reg |" in text
    progress = text.split("## Progress of every run")[1]
    assert "| neural-ode-s0 | not started |" in progress
    skip_row = next(line for line in progress.splitlines() if line.startswith("| skip-anderson"))
    assert skip_row.startswith("| skip-anderson-s0 | 4 of 4 |")  # not finished: no summary
    vanilla = json.loads((copy / "runs" / "vanilla-anderson-s0" / "summary.json").read_text())
    accuracy = f"{100 * vanilla['history'][-1]['test_accuracy']:.2f}"
    assert f"| vanilla-anderson-s0 | 4 of 4 (finished) | {accuracy} |" in progress


def test_plot_written(reproduced):
    folder, _ = reproduced
    png = folder / "mnist-dense-anderson.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_unknown_experiment(tmp_path):
    with pytest.raises(ValueError, match="mnist-dense"):
        reproduce("cifar-dense", dataset="digits", seeds=1, epochs=1, solvers=("anderson",),
                  out_dir=tmp_path)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- table without training


def _run(accuracy, nfe, train_s, backward_s, predict_s=0.01, history=()):
    return {
        "test_accuracy": accuracy,
        "test_nfe": nfe,
        "train_time_s": train_s,
        "backward_s": backward_s,
        "predict_s": predict_s,
        "compile_time_s": 3.0,
        "history": list(history),
    }


def _evals(*pairs):
    """A run history from (seconds, test accuracy) pairs."""
    return [{"train_time_s": s, "test_accuracy": a} for s, a in pairs]


def _results(vanilla_backward_s):
    rows = variants(("continuous",), with_jac=True)
    assert [v.label for v in rows] == [
        "vanilla", "vanilla+jac", "skip", "skip+jac", "skip-reg", "skip-reg+jac", "neural-ode",
        "explicit",
    ]  # fmt: skip
    results = {v: [_run(0.9, 10.0, 120.0, 0.02), _run(0.92, 12.0, 120.0, 0.02)] for v in rows}
    results[Variant("vanilla", False, "continuous")] = [
        _run(0.96, 18.0, 240.0, vanilla_backward_s),
        _run(0.98, 18.0, 240.0, vanilla_backward_s),
    ]
    return results


def test_table_means_ratios_and_paper_values():
    from imex_deq.experiments._reproduce import PAPER_MNIST_DENSE

    text = table(_results(0.04), "continuous", PAPER_MNIST_DENSE)
    lines = text.splitlines()
    assert len(lines) == 2 + 8
    vanilla = next(line for line in lines if line.startswith("| vanilla |"))
    assert "97.00 ± 1.41" in vanilla and "paper 97.93" in vanilla and "×" not in vanilla
    skip = next(line for line in lines if line.startswith("| skip |"))
    assert "91.00 ± 1.41 (0.94× vanilla; paper 97.76)" in skip
    assert "2.00 ± 0.00 (0.50× vanilla; paper 1.71)" in skip  # train minutes


def test_headline_ratios():
    lines = headline_ratios(_results(0.04), "continuous")
    assert lines[:7] == [
        "Skip Reg. vs Vanilla training time: 2.00x (paper 4.0x)",
        "test NFE Skip Reg. 11.0 vs Vanilla 18.0 (paper 4.0 vs 18.3)",
        "neural ODE vs continuous Vanilla DEQ training time: 0.50x (paper 2-4x)",
        "neural ODE vs continuous Vanilla DEQ backward s/batch: 0.50x",
        "vanilla prediction time vs the explicit network: 1.00x",
        "skip prediction time vs the explicit network: 1.00x",
        "skip-reg prediction time vs the explicit network: 1.00x",
    ]
    assert lines[7] == (
        "vanilla vs the explicit network, test accuracy paired by seed: +6.00 ± 0.00 points "
        "(mean ± standard error, 2 seeds): at least the explicit network's"
    )
    assert len(lines) == 7 + 6  # one accuracy line per DEQ row


def test_headline_ratios_name_compiles_read_from_the_cache():
    results = _results(0.04)
    results[Variant("skip", False, "continuous")][0]["compile_cached"] = True
    lines = headline_ratios(results, "continuous")
    assert lines[-1] == (
        "compile (s) of skip: read from the persistent compilation cache (cold: longer)"
    )
    assert len(lines) == 14


def test_headline_ratios_with_unmeasurable_backward_time():
    # backward_s is clamped at 0 when step - forward - update is below timer noise.
    lines = headline_ratios(_results(0.0), "continuous")
    assert len(lines) == 13
    assert lines[3].startswith("neural ODE vs continuous Vanilla DEQ backward s/batch: ")


def _seeded(seed, accuracy):
    return {**_run(accuracy, 3.0, 60.0, 0.02), "config": {"seed": seed}}


def test_accuracy_vs_explicit_pairs_seeds_and_says_whether_the_gap_is_noise():
    def row(model, jac=False):
        return Variant(model, jac, "anderson")

    results = {
        row("explicit"): [_seeded(0, 0.914), _seeded(1, 0.912), _seeded(2, 0.910)],
        # Listed out of seed order: pairing goes by the config's seed, not the position.
        row("vanilla"): [_seeded(1, 0.914), _seeded(0, 0.916), _seeded(2, 0.912)],
        row("skip"): [_seeded(0, 0.910), _seeded(1, 0.909), _seeded(2, 0.905)],
        row("skip", jac=True): [_seeded(0, 0.910), _seeded(1, 0.915), _seeded(2, 0.907)],
        row("skip-reg"): [_seeded(2, 0.913)],  # only seed 2 finished
    }
    lines = [line for line in headline_ratios(results, "anderson") if "test accuracy" in line]
    assert lines == [
        (
            "vanilla vs the explicit network, test accuracy paired by seed: +0.20 ± 0.00 points "
            "(mean ± standard error, 3 seeds): at least the explicit network's"
        ),
        # differences -0.4, -0.3, -0.5: standard error 0.058
        (
            "skip vs the explicit network, test accuracy paired by seed: -0.40 ± 0.06 points "
            "(mean ± standard error, 3 seeds): below, by more than 2 standard errors"
        ),
        # differences -0.4, +0.3, -0.3: mean -0.13, standard error 0.22
        (
            "skip+jac vs the explicit network, test accuracy paired by seed: -0.13 ± 0.22 points "
            "(mean ± standard error, 3 seeds): below, within 2 standard errors (not significant)"
        ),
        "skip-reg vs the explicit network, test accuracy: +0.30 points (one seed)",
    ]


def test_headline_names_the_runs_whose_solves_did_not_converge():
    results = _results(0.04)
    vanilla = results[Variant("vanilla", False, "continuous")]
    vanilla[0].update(name="vanilla-continuous-s0", test_converged=0.03)
    vanilla[1].update(name="vanilla-continuous-s1", test_converged=0.5)  # at the threshold
    results[Variant("skip", False, "continuous")][1]["test_converged"] = 0.0  # no name
    # Summaries written before evaluate() left it out for the baselines carry a 0.
    results[Variant("explicit", False, "continuous")][0]["test_converged"] = 0.0
    lines = headline_ratios(results, "continuous")
    assert lines[-1] == (
        "not converged (fewer than 50% of the test solves met the tolerance, so training "
        "followed inexact gradients): vanilla-continuous-s0 (3.0%), skip (0.0%)"
    )
    assert len(lines) == 14
    assert not any(line.startswith("not converged") for line in headline_ratios(results, "x"))


def test_time_to_accuracy_averages_seeds_and_reads_the_first_hit():
    runs = [
        _run(0.9, 5, 30.0, 0.1, history=_evals((10.0, 0.5), (20.0, 0.8), (30.0, 0.9))),
        _run(0.9, 5, 34.0, 0.1, history=_evals((12.0, 0.6), (22.0, 0.9), (34.0, 0.9))),
    ]
    assert time_to_accuracy(runs, 0.85) == pytest.approx(21.0)  # mean accuracy 0.85 at eval 2
    assert time_to_accuracy(runs, 0.5) == pytest.approx(11.0)
    assert time_to_accuracy(runs, 0.95) is None


def test_speedup_to_vanilla_accuracy_line():
    results = _results(0.04)
    vanilla = Variant("vanilla", False, "continuous")
    skip_reg = Variant("skip-reg", False, "continuous")
    slow = _evals((100.0, 0.9), (200.0, 0.97))
    results[vanilla] = [_run(0.97, 18.0, 200.0, 0.04, history=slow)] * 2
    # 96.6% is within the 0.5-point slack of Vanilla's 97%: reached at 25 s.
    fast = _evals((25.0, 0.966), (50.0, 0.968))
    results[skip_reg] = [_run(0.968, 4.0, 60.0, 0.02, history=fast)]
    results[Variant("skip", False, "continuous")] = [
        _run(0.9, 4.0, 60.0, 0.02, history=_evals((30.0, 0.8), (60.0, 0.9)))
    ]
    lines = headline_ratios(results, "continuous")
    assert (
        "skip-reg vs Vanilla training time to 96.50% test accuracy (Vanilla's final minus "
        "0.5 points): 8.00x faster (paper 4.01x on MNIST dense)"
    ) in lines
    assert any(line.startswith("skip vs Vanilla") and "never reached" in line for line in lines)


def test_variants_subset_and_unknown_model():
    rows = variants(("anderson",), with_jac=False, models=("vanilla", "explicit"))
    assert [v.label for v in rows] == ["vanilla", "explicit"]
    with pytest.raises(ValueError, match=r"models: unknown \['resnet'\]; choose from vanilla"):
        variants(("anderson",), with_jac=False, models=("vanilla", "resnet"))
    with pytest.raises(ValueError, match="models: unknown"):
        variants(("anderson",), with_jac=False, models=())


def test_variants_row_label_selects_one_row():
    rows = variants(("anderson",), with_jac=True, models=("skip+jac", "explicit"))
    assert [v.label for v in rows] == ["skip+jac", "explicit"]
    both = variants(("anderson",), with_jac=True, models=("skip",))
    assert [v.label for v in both] == ["skip", "skip+jac"]
    with pytest.raises(ValueError, match=r"\['skip\+jac'\] contradict --no-jac"):
        variants(("anderson",), with_jac=False, models=("skip+jac",))


def test_cifar_experiments_need_cifar_data_and_the_others_refuse_it():
    with pytest.raises(
        ValueError, match=r"cifar10-small trains on CIFAR-10: pass --dataset cifar10=PATH"
    ):
        reproduce("cifar10-small", dataset="digits", seeds=1, epochs=1, solvers=("anderson",))
    with pytest.raises(
        ValueError, match=r"mnist-conv trains on MNIST-like images, not 'cifar10=/x'"
    ):
        reproduce("mnist-conv", dataset="cifar10=/x", seeds=1, epochs=1, solvers=("anderson",))


def test_cifar_experiment_table_quotes_the_papers_figures():
    from imex_deq.experiments._reproduce import paper_figures

    assert paper_figures("cifar10-small", "anderson")["vanilla"]["test_accuracy"] == 81.2
    assert paper_figures("cifar10-small", "continuous")["neural-ode"]["step_s"] == 1.608
    assert paper_figures("cifar10-large", "continuous")["vanilla"]["step_s"] == 1.284
    assert paper_figures("mnist-conv", "anderson") == {}


def test_progress_table_shows_no_converged_share_for_a_baseline():
    # An explicit-network log from before the baselines stopped recording a share of 0.
    history = [{"test_accuracy": 0.9, "test_nfe": 1.0, "test_converged": 0.0}]
    runs = {
        "explicit-s1": {"steps": 4, "of": 4, "finished": True, "history": history, "solves": False},
        "vanilla-anderson-s0": {"steps": 4, "of": 4, "finished": True, "history": history},
    }
    rows = _reproduce.progress_table(runs).splitlines()[2:]
    assert rows[0].endswith("| 1.00 | — |")
    assert rows[1].endswith("| 1.00 | 0.0 |")


@pytest.mark.parametrize(
    "base", [TrainConfig(jac_weight=1.0, jac_on_demand=0.9), TrainConfig(jac_norm="spectral")]
)
def test_jac_variants_need_a_regularised_row(tmp_path, base):
    with pytest.raises(ValueError, match=r"jac_on_demand and jac_norm apply to the \+jac rows"):
        reproduce("mnist-dense", dataset="digits", seeds=1, epochs=1, solvers=("anderson",),
                  with_jac=False, base=base, out_dir=tmp_path)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def _report_only_on_a_copy(reproduced, tmp_path, monkeypatch, models, **settings):
    """`reproduce --report-only` with `settings` on a copy of the tiny reproduction; returns
    the copy's folder after checking that nothing trained and table.md is untouched."""
    folder, _ = reproduced
    copy = tmp_path / "mnist-dense"
    shutil.copytree(folder, copy)
    regular = (copy / "table.md").read_text()
    monkeypatch.setattr(_reproduce, "train", lambda config, data=None: pytest.fail("trained"))
    reproduce("mnist-dense", dataset="digits", seeds=1, epochs=1, solvers=("anderson",),
              base=dataclasses.replace(TINY_BASE, **settings), models=models,
              out_dir=str(tmp_path), report_only=True)  # fmt: skip
    assert (copy / "table.md").read_text() == regular
    return copy


def test_jac_on_demand_report_sits_beside_the_regular_one(reproduced, tmp_path, monkeypatch):
    copy = _report_only_on_a_copy(
        reproduced, tmp_path, monkeypatch, ("skip", "explicit"), jac_weight=1.0, jac_on_demand=0.9
    )
    text = (copy / "table-jac-ondemand0.9.md").read_text()
    assert "fewer than 90% of the batch's solves converged" in text
    assert "skip-anderson-jac-ondemand0.9-s0: not started" in text
    assert "| skip |" in text and "| explicit |" in text
    assert "![anderson](mnist-dense-anderson-jac-ondemand0.9.png)" in text
    assert (copy / "mnist-dense-anderson-jac-ondemand0.9.png").is_file()
    assert "skip@anderson" in json.loads((copy / "results-jac-ondemand0.9.json").read_text())


def test_spectral_report_sits_beside_the_regular_one(reproduced, tmp_path, monkeypatch):
    copy = _report_only_on_a_copy(
        reproduced, tmp_path, monkeypatch, ("vanilla+jac", "explicit"), jac_norm="spectral"
    )
    text = (copy / "table-jac-spectral.md").read_text()
    assert "squared spectral radius" in text and "fewer than" not in text
    assert "vanilla-anderson-jac-spectral-s0: not started" in text
    assert "| explicit |" in text  # the rows without the term are reused as they are
    assert (copy / "mnist-dense-anderson-jac-spectral.png").is_file()
