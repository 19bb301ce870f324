"""The `imex-deq` command line: bad input exits with status 2 and a clear message before
anything is trained; a tiny real `train` prints its summary as JSON."""

import json

import pytest

from imex_deq.experiments.cli import main


def run_error(capsys, argv: list[str]) -> str:
    """`main(argv)` must fail with status 2 (returned, or argparse's SystemExit); returns
    stderr."""
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    assert status == 2, argv
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_unknown_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--no-such-option", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "--no-such-option" in err


def test_missing_command(capsys):
    err = run_error(capsys, [])
    assert "command" in err


def test_bad_model_choice(capsys):
    err = run_error(capsys, ["train", "--model", "resnet"])
    assert "--model" in err and "'resnet'" in err
    for variant in ("vanilla", "skip", "skip-reg", "neural-ode", "explicit"):
        assert variant in err


def test_bad_solver_choice(capsys):
    err = run_error(capsys, ["train", "--solver", "newton"])
    assert "--solver" in err and "anderson" in err


@pytest.mark.parametrize("value", ["-1", "0"])
def test_non_positive_epochs(capsys, value):
    err = run_error(capsys, ["train", "--epochs", value, "--no-progress"])
    assert err.startswith("imex-deq: error:")
    assert "epochs" in err and value in err


def test_negative_batch_size(capsys):
    err = run_error(capsys, ["train", "--batch-size", "-4", "--no-progress"])
    assert "batch_size" in err and "-4" in err


def test_bad_lr_schedule(capsys):
    err = run_error(capsys, ["train", "--lr-schedule", "linear"])
    assert "--lr-schedule" in err and "'linear'" in err and "cosine" in err


def test_non_integer_epochs(capsys):
    err = run_error(capsys, ["train", "--epochs", "two"])
    assert "--epochs" in err and "'two'" in err


@pytest.mark.parametrize("spec", ["imagenet", "mnist=", "digits=3"])
def test_bad_dataset_spec(capsys, spec):
    err = run_error(capsys, ["train", "--dataset", spec, "--no-progress"])
    assert err.startswith("imex-deq: error:")
    assert repr(spec) in err
    for choice in ("digits", "fashion-mnist", "mnist=PATH"):
        assert choice in err


def test_missing_mnist_folder(capsys, tmp_path):
    err = run_error(capsys, ["train", "--dataset", f"mnist={tmp_path / 'none'}", "--no-progress"])
    assert str(tmp_path / "none") in err


def test_resume_without_out(capsys):
    err = run_error(capsys, ["train", "--resume", "--no-progress"])
    assert "resume" in err and "out" in err


def test_resume_from_damaged_checkpoint(capsys, tmp_path):
    (tmp_path / "checkpoint.eqx").write_bytes(b"\x00\x01")
    argv = ["train", "--out", str(tmp_path), "--resume", "--limit-train", "32"]
    argv += ["--batch-size", "16", "--no-progress"]
    err = run_error(capsys, argv)
    assert "checkpoint" in err and str(tmp_path) in err


@pytest.mark.parametrize("solvers", ["anderson,newton", "", " , "])
def test_reproduce_unknown_solver(capsys, tmp_path, solvers):
    argv = ["reproduce", "mnist-dense", "--solvers", solvers, "--out", str(tmp_path)]
    err = run_error(capsys, argv)
    assert "--solvers" in err and "continuous" in err and "newton-krylov" in err
    if "newton" in solvers:
        assert "'newton'" in err
    assert list(tmp_path.iterdir()) == []  # nothing was trained or written


def test_reproduce_unknown_experiment(capsys):
    err = run_error(capsys, ["reproduce", "cifar-conv"])
    assert "mnist-dense" in err


@pytest.mark.parametrize("option", ["--seeds", "--epochs"])
def test_reproduce_non_positive_counts(capsys, tmp_path, option):
    err = run_error(capsys, ["reproduce", "mnist-dense", option, "0", "--out", str(tmp_path)])
    assert option in err
    assert list(tmp_path.iterdir()) == []


def test_tiny_train_run(capsys, tmp_path):
    argv = [
        "train",
        "--model", "vanilla",
        "--solver", "fixed-point",
        "--backward", "unrolled",
        "--dataset", "digits",
        "--epochs", "1",
        "--batch-size", "16",
        "--limit-train", "32",
        "--limit-test", "16",
        "--max-steps", "10",
        "--out", str(tmp_path),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["steps"] == 2
    assert summary["name"] == "vanilla-fixed-point-s0"
    assert "history" not in summary and "config" not in summary
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    ("value", "shown"), [("inf", "inf"), ("nan", "nan"), ("-0.5", "-0.5"), ("0", "0.0")]
)
def test_learning_rate_must_be_finite_and_positive(capsys, value, shown):
    err = run_error(capsys, ["train", "--learning-rate", value, "--no-progress"])
    assert err.startswith("imex-deq: error: learning_rate must be")
    assert err.rstrip().endswith(f"got {shown}.")


def test_diverging_train_run_exits_non_zero_with_the_step(capsys, tmp_path):
    argv = [
        "train",
        "--model", "explicit",
        "--solver", "fixed-point",
        "--backward", "unrolled",
        "--learning-rate", "1e30",
        "--batch-size", "16",
        "--limit-train", "64",
        "--limit-test", "16",
        "--out", str(tmp_path),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("imex-deq: error: training stopped at step 2: the loss is nan")
    assert str(tmp_path / "checkpoint.eqx") in captured.err
    assert "Traceback" not in captured.err


def test_reproduce_resume_runs(tmp_path):
    argv = [
        "reproduce", "mnist-dense", "--dataset", "digits", "--seeds", "1", "--epochs", "1",
        "--solvers", "anderson", "--models", "explicit", "--limit-train", "64",
        "--limit-test", "32", "--batch-size", "32", "--no-progress",
        "--resume", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "mnist-dense" / "runs" / "explicit-s0" / "summary.json").is_file()


# ------------------------------------------------------------ huge pages for XLA's buffers


def test_huge_pages_environment_decides_when_to_restart():
    from imex_deq.experiments._hugepages import huge_pages_environment

    new = huge_pages_environment({"PATH": "/bin"}, "madvise", (2, 36))
    assert new == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = huge_pages_environment({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, "always", (2, 39))
    assert kept["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    for environ, mode, version in (
        ({}, "never", (2, 36)),  # huge pages off
        ({}, None, (2, 36)),  # not Linux, or unknown
        ({}, "madvise", (2, 31)),  # glibc without the tunable
        ({}, "madvise", None),  # not glibc
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36)),  # user's choice
        ({"IMEX_DEQ_HUGEPAGES": "0"}, "madvise", (2, 36)),  # opted out
    ):
        assert huge_pages_environment(environ, mode, version) is None, (environ, mode, version)


def test_restart_sets_the_tunable_where_it_helps():
    import os
    import subprocess
    import sys

    from imex_deq.experiments import _hugepages

    environ = {
        k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "IMEX_DEQ_HUGEPAGES")
    }
    code = (
        "from imex_deq.experiments._hugepages import restart_with_huge_pages as restart; "
        "restart(['-c', 'import os; print(os.environ.get(\"GLIBC_TUNABLES\", \"unset\"))'])"
        "; print('not restarted')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    ).stdout.strip()
    expected = _hugepages.huge_pages_environment(
        environ, _hugepages._thp_mode(), _hugepages._glibc_version()
    )
    assert out == ("glibc.malloc.hugetlb=1" if expected else "not restarted")


def test_ode_rtol_with_a_discrete_solver(capsys):
    err = run_error(
        capsys, ["train", "--solver", "anderson", "--ode-rtol", "1e-3", "--no-progress"]
    )
    assert err.startswith("imex-deq: error:") and "ode_rtol" in err and "'anderson'" in err
