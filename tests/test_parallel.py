"""Data-parallel training over several (fake CPU) devices matches one device.

JAX reads `XLA_FLAGS` once, at import, so the check runs in a fresh Python process started
with `--xla_force_host_platform_device_count=4`. It keeps LAPACK out of the graph (Anderson
forward solve, Anderson-based implicit adjoint): batched LAPACK calls on a sharded batch
deadlock jaxlib's CPU thread pool (STACK_NOTES, "Several devices"). The subprocess has a
timeout, so a deadlock fails the test instead of hanging it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

WORKER = textwrap.dedent(
    """
    import json
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")

    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    import optax

    import imex_deq
    from imex_deq.data import load_dataset, load_digits
    from imex_deq.experiments import TrainConfig, Trainer, build_dense_model, train
    from imex_deq.experiments._parallel import (
        make_data_mesh,
        replicate,
        shard_batch,
    )

    report = {"devices": jax.device_count()}
    mesh = make_data_mesh()
    report["mesh"] = dict(mesh.shape)

    config = TrainConfig(model="skip-reg", solver="anderson", backward="anderson", batch_size=8)
    model = build_dense_model(
        "skip-reg",
        imex_deq.Anderson(rtol=1e-5, termination="rel"),
        in_features=12,
        width=16,
        num_classes=3,
        key=jax.random.PRNGKey(0),
        adjoint=imex_deq.ImplicitAdjoint(
            linear_solver=imex_deq.Anderson(rtol=1e-6), max_steps=100
        ),
        max_steps=100,
    )
    trainer = Trainer(config, optax.adam(1e-2))
    opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 12)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    key = jax.random.PRNGKey(1)

    single = trainer.step(model, opt_state, jnp.asarray(x), jnp.asarray(y), key)

    model_r, opt_r = replicate(mesh, (model, opt_state))
    xs, ys = shard_batch(mesh, x), shard_batch(mesh, y)
    report["x_devices"] = len(xs.sharding.device_set)
    report["x_shard_rows"] = sorted({s.data.shape[0] for s in xs.addressable_shards})
    report["param_devices"] = len(model_r.head.weight.sharding.device_set)
    sharded = trainer.step(model_r, opt_r, xs, ys, key)
    report["updated_param_replicated"] = bool(sharded[0].head.weight.sharding.is_fully_replicated)

    def flat(tree):
        leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
        return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves])

    p1, p4 = flat(single[0]), flat(sharded[0])
    p0 = flat(model)
    report["loss"] = [float(single[2]["loss"]), float(sharded[2]["loss"])]
    report["nfe"] = [float(single[2]["nfe"]), float(sharded[2]["nfe"])]
    report["param_max_abs_diff"] = float(np.max(np.abs(p1 - p4)))
    report["param_max_rel_diff"] = float(
        np.max(np.abs(p1 - p4) / np.maximum(np.abs(p1), 1e-6))
    )
    report["params_allclose"] = bool(np.allclose(p4, p1, rtol=1e-5, atol=1e-6))
    report["update_size"] = float(np.max(np.abs(p1 - p0)))
    report["opt_state_allclose"] = bool(
        np.allclose(flat(sharded[1]), flat(single[1]), rtol=1e-5, atol=1e-7)
    )

    # The wiring in train(): a few data-parallel steps, evaluation and timing.
    summary = train(
        TrainConfig(
            model="skip-reg",
            solver="anderson",
            backward="anderson",
            epochs=1,
            batch_size=16,
            limit_train=64,
            limit_test=32,
            timing_batches=1,
            progress=False,
            data_parallel=True,
        ),
        data=load_dataset("digits", limit_train=64, limit_test=32),
    )
    report["train_steps"] = summary["steps"]
    report["train_accuracy_finite"] = bool(np.isfinite(summary["test_accuracy"]))
    try:
        train(TrainConfig(batch_size=6, data_parallel=True, progress=False), data=load_digits())
    except ValueError as error:
        report["bad_batch_error"] = str(error)
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(
            [sys.executable, "-c", WORKER],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"data-parallel worker did not finish in {TIMEOUT_S} s (deadlock?): {error}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT")]
    assert done.returncode == 0 and lines, (
        f"worker failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )
    return json.loads(lines[-1][len("REPORT") :])


def test_four_devices_and_shardings(report):
    assert report["devices"] == 4
    assert report["mesh"] == {"data": 4}
    assert report["x_devices"] == 4
    assert report["x_shard_rows"] == [2]  # batch 8 split 4 ways
    assert report["param_devices"] == 4
    assert report["updated_param_replicated"]


def test_sharded_step_matches_single_device(report):
    single, sharded = report["loss"]
    assert sharded == pytest.approx(single, rel=1e-5)
    assert report["nfe"][0] == report["nfe"][1]
    assert report["update_size"] > 1e-4  # the step did change the parameters
    assert report["params_allclose"], report
    assert report["opt_state_allclose"], report


def test_train_data_parallel_wiring(report):
    assert report["train_steps"] == 4  # 64 images / batch 16, one epoch
    assert report["train_accuracy_finite"]
    assert "multiple of the 4 devices" in report["bad_batch_error"]
