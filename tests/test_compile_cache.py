"""The persistent compilation cache: a second process reads the training step back (and
says so in its summary); the command's options and their errors. The cache is global to
a process, so the runs that use it run in subprocesses."""

import json
import subprocess
import sys

from imex_deq.experiments import cli

TRAIN_TWICE = """
import json, sys
from imex_deq.experiments import TrainConfig, enable_compile_cache, train
enable_compile_cache(sys.argv[1], min_compile_s=0.0)
config = TrainConfig(model="vanilla", solver="fixed-point", backward="unrolled",
    dataset="digits", batch_size=16, limit_train=32, limit_test=16, max_steps=5,
    epochs=1, progress=False, timing_batches=1)
summary = train(config)
print(json.dumps({k: summary[k] for k in ("compile_cached", "test_accuracy")}))
"""


def _train_in_a_new_process(cache) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_TWICE, str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_second_process_reads_the_step_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _train_in_a_new_process(cache)
    assert first["compile_cached"] is False
    assert any(cache.iterdir())
    second = _train_in_a_new_process(cache)
    assert second["compile_cached"] is True
    assert second["test_accuracy"] == first["test_accuracy"]  # the same program


def _cache_calls(monkeypatch, argv, as_command=False) -> list:
    calls = []
    monkeypatch.setattr(cli, "enable_compile_cache", lambda path: calls.append(path))
    monkeypatch.setattr(cli, "enable_default_compile_cache", lambda: calls.append("default"))
    cli._set_up_compile_cache(cli.parser().parse_args(argv), as_command=as_command)
    return calls


def test_command_options(monkeypatch, tmp_path):
    folder = str(tmp_path / "c")
    assert _cache_calls(monkeypatch, ["train"]) == []  # main(argv) from Python: off
    assert _cache_calls(monkeypatch, ["train"], as_command=True) == ["default"]
    assert _cache_calls(monkeypatch, ["train", "--compile-cache", folder]) == [folder]
    argv = ["reproduce", "mnist-dense", "--no-compile-cache"]
    assert _cache_calls(monkeypatch, argv, as_command=True) == []


def test_contradicting_options(capsys, tmp_path):
    argv = ["train", "--compile-cache", str(tmp_path), "--no-compile-cache", "--no-progress"]
    assert cli.main(argv) == 2
    assert "--compile-cache and --no-compile-cache" in capsys.readouterr().err


def test_folder_that_cannot_be_made(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["train", "--compile-cache", str(blocker / "cache"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "compile cache folder" in err and str(blocker / "cache") in err


def test_default_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.default_compile_cache_dir() == tmp_path / "imex-deq" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cli.default_compile_cache_dir().parts[-3:] == (".cache", "imex-deq", "xla")


def test_default_folder_unusable_warns_and_goes_on(monkeypatch, tmp_path, capsys):
    from imex_deq.experiments import _compile_cache

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert _compile_cache.enable_default_compile_cache() is None
    assert "Compiling without a cache" in capsys.readouterr().err
