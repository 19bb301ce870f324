"""Checkpoints: round trip, atomic writes, damaged files, and kill/resume reproducing an
uninterrupted run bit for bit."""

import dataclasses
import functools
import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imex_deq import SteadyStateODE
from imex_deq.data import load_dataset
from imex_deq.experiments import (
    CheckpointError,
    TrainConfig,
    Trainer,
    _checkpoint,
    build_dense_model,
    evaluate,
    load_checkpoint,
    load_trained,
    make_solver,
    save_checkpoint,
    train,
)
from imex_deq.experiments._training import CHECKPOINT, LOG, _initial_state, make_optimizer


@functools.cache
def _template(width: int = 16):
    """Shapes of a small classifier and its Adam state (nothing is computed)."""

    def build():
        model = build_dense_model(
            "skip",
            make_solver("anderson", 1e-3),
            in_features=12,
            width=width,
            num_classes=3,
            key=jax.random.PRNGKey(0),
        )
        return model, optax.adam(1e-3).init(eqx.filter(model, eqx.is_inexact_array))

    return eqx.filter_eval_shape(build)


def _state(seed: int, width: int = 16):
    """The template filled with random parameters and optimizer moments (drawn with NumPy:
    no XLA compiles) and step count `seed + 7`."""
    return _filled(_template(width), seed)


def _filled(template, seed: int):
    """`template`'s shape leaves replaced by random floats and integers `seed + 7`."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if np.issubdtype(leaf.dtype, np.floating):
            return jnp.asarray(rng.standard_normal(leaf.shape).astype(leaf.dtype))
        return jnp.asarray(np.full(leaf.shape, seed + 7, leaf.dtype))

    return jax.tree_util.tree_map(fill, template)


def _arrays(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(eqx.filter(a, eqx.is_array)) == (
        jax.tree_util.tree_structure(eqx.filter(b, eqx.is_array))
    )
    assert_arrays_equal(a, b)


def assert_arrays_equal(a, b) -> None:
    """The array leaves of `a` and `b` agree in dtype, shape and value, in order."""
    left, right = _arrays(a), _arrays(b)
    assert len(left) == len(right) > 0
    for x, y in zip(left, right):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


def test_round_trip(tmp_path):
    tree = _state(1)
    meta = {"global_step": 12, "history": [{"step": 10, "test_accuracy": 0.5}], "x": 0.25}
    path = tmp_path / "sub" / "ckpt.eqx"  # parent folder is created
    save_checkpoint(path, tree, meta)
    loaded, loaded_meta = load_checkpoint(path, _template())
    assert loaded_meta == meta
    assert_trees_equal(loaded, tree)
    # The optimizer's step count (an integer leaf) survives too.
    counts = [x for x in _arrays(loaded[1]) if np.issubdtype(x.dtype, np.integer)]
    assert counts and all(int(c) == 8 for c in counts)
    # Overwriting replaces the content.
    other = _state(2)
    save_checkpoint(path, other, {"global_step": 13})
    loaded, loaded_meta = load_checkpoint(path, _template())
    assert loaded_meta == {"global_step": 13}
    assert_trees_equal(loaded, other)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.eqx"]  # no temp files


def test_loading_into_another_model_fails(tmp_path):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, _state(1), {"global_step": 1})
    with pytest.raises(CheckpointError, match="ckpt.eqx"):
        load_checkpoint(path, _template(width=8))


def test_checkpoint_loads_under_another_stall_factor(tmp_path):
    """`ode_stall_factor` came after checkpoints of continuous DEQs were written: it is
    static, so a checkpoint saved under one factor loads into a model with another."""

    def shapes(factor):
        solver = SteadyStateODE(rtol=1e-2, ode_stall_factor=factor)
        return eqx.filter_eval_shape(
            lambda: build_dense_model(
                "vanilla",
                solver,
                in_features=12,
                width=16,
                num_classes=3,
                key=jax.random.PRNGKey(0),
            )
        )

    saved = _filled(shapes(1.0), seed=3)
    save_checkpoint(tmp_path / "ckpt.eqx", saved, {"global_step": 5})
    loaded, meta = load_checkpoint(tmp_path / "ckpt.eqx", shapes(10.0))
    assert meta == {"global_step": 5}
    # The static factor is part of the tree structure, so compare the arrays alone.
    assert_arrays_equal(loaded, saved)
    assert loaded.layer.solver.ode_stall_factor == 10.0


@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_write_is_atomic(tmp_path, monkeypatch, fail):
    path = tmp_path / "ckpt.eqx"
    old_tree = _state(1)
    save_checkpoint(path, old_tree, {"global_step": 1})
    old_bytes = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError(f"simulated crash in os.{fail}")

    monkeypatch.setattr(_checkpoint.os, fail, crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, _state(2), {"global_step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    loaded, meta = load_checkpoint(path, _template())
    assert meta == {"global_step": 1}
    assert_trees_equal(loaded, old_tree)


def test_missing_file(tmp_path):
    path = tmp_path / "nothing.eqx"
    with pytest.raises(CheckpointError, match="nothing.eqx"):
        load_checkpoint(path, _template())


@pytest.mark.parametrize("keep", [0, 5, 20, 0.5, -9])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "ckpt.eqx"
    save_checkpoint(path, _state(1), {"global_step": 1, "history": []})
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, _template())
    assert str(path) in str(info.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "ckpt.eqx"
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, _template())
    assert str(path) in str(info.value)
    # A valid header and metadata followed by garbage instead of arrays.
    save_checkpoint(path, _state(1), {"global_step": 1})
    data = bytearray(path.read_bytes())
    meta_end = 8 + int.from_bytes(data[:8], "little")
    data[meta_end:] = b"\xff" * (len(data) - meta_end)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ckpt.eqx"):
        load_checkpoint(path, _template())


# ---------------------------------------------------------------------------- kill/resume

PER_EPOCH = 5  # 80 images / batch 16
EPOCHS = 2
EVERY = 3  # checkpoints after steps 3, 5 (epoch end), 6, 9, 10
STOP = 8  # killed 2 steps after the checkpoint of step 6, mid epoch 2


def _config(out, **changes) -> TrainConfig:
    return TrainConfig(
        model="vanilla",
        solver="fixed-point",
        backward="unrolled",
        dataset="digits",
        batch_size=16,
        limit_train=80,
        limit_test=32,
        max_steps=10,
        epochs=EPOCHS,
        learning_rate=1e-2,
        lr_schedule="cosine",  # the schedule's step count must survive the kill too
        checkpoint_every=EVERY,
        progress=False,
        timing_batches=1,
        out_dir=str(out),
        **changes,
    )


def _final_state(config, data):
    trainer = Trainer(config, make_optimizer(config, PER_EPOCH * EPOCHS))
    template = eqx.filter_eval_shape(_initial_state, config, data, trainer)
    return load_checkpoint(config.out_dir + "/" + CHECKPOINT, template)


def _log(out):
    return [json.loads(line) for line in (out / LOG).read_text().splitlines()]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    data = load_dataset("digits", limit_train=80, limit_test=32)
    straight = _config(tmp_path / "straight")
    reference = train(straight, data)
    assert reference["steps"] == PER_EPOCH * EPOCHS

    killed = tmp_path / "killed"
    stopped = train(_config(killed, stop_after_steps=STOP), data)
    assert stopped == {"interrupted_at": STOP}
    _, meta = _final_state(_config(killed), data)
    assert meta["global_step"] == 6  # the last checkpoint before the kill
    assert not (killed / "summary.json").exists()
    # The kill also cut the log mid-line.
    with open(killed / LOG, "a") as handle:
        handle.write('{"step": 9, "epoch": 1, "lo')

    resumed = train(_config(killed, resume=True), data)
    assert resumed["steps"] == PER_EPOCH * EPOCHS

    (model_a, opt_a), meta_a = _final_state(straight, data)
    (model_b, opt_b), meta_b = _final_state(_config(killed), data)
    assert_trees_equal((model_a, opt_a), (model_b, opt_b))
    assert meta_a["global_step"] == meta_b["global_step"] == PER_EPOCH * EPOCHS
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["test_nfe"] == reference["test_nfe"]
    strip = ("train_time_s", "step_time_s")
    assert [{k: v for k, v in h.items() if k not in strip} for h in resumed["history"]] == [
        {k: v for k, v in h.items() if k not in strip} for h in reference["history"]
    ]

    # load_trained hands back the finished model, which scores what the summary says.
    trainer, model = load_trained(straight, data)
    assert_trees_equal(model, model_a)
    scores = evaluate(trainer, model, data.x_test, data.y_test, straight.batch_size)
    assert scores["test_accuracy"] == reference["test_accuracy"]

    records = _log(killed)
    steps = [r["step"] for r in records if "type" not in r]
    assert steps == list(range(1, PER_EPOCH * EPOCHS + 1))
    # The resumed session compiled once more: its compile time is reported, not the sum.
    first_after_resume = next(r for r in records if r.get("step") == 7 and "type" not in r)
    assert resumed["compile_time_s"] == pytest.approx(first_after_resume["time_s"], rel=1e-6)
    assert [r["step"] for r in records if r.get("type") == "eval"] == [5, 10]
    # Per-step metrics after the resume are those of the uninterrupted run.
    reference_steps = [r for r in _log(tmp_path / "straight") if "type" not in r]
    for a, b in zip(reference_steps, (r for r in records if "type" not in r)):
        assert a["loss"] == b["loss"] and a["nfe"] == b["nfe"], a["step"]


def test_load_trained_names_what_is_missing(tmp_path):
    data = load_dataset("digits", limit_train=80, limit_test=32)
    with pytest.raises(ValueError, match="out_dir is None"):
        load_trained(dataclasses.replace(_config(tmp_path), out_dir=None), data)
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        load_trained(_config(tmp_path / "nowhere"), data)
