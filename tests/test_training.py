"""The training loop: one `Trainer.step` per model variant, fixed-depth pretraining, and the
files `train()` writes (log.jsonl, summary.json, checkpoint).

Every configuration here uses the cheapest solver/adjoint pair (fixed-point iteration,
unrolled backward) on 64 digits images, and each compiled step is shared through a
module-scoped fixture: JAX compiles dominate the runtime.
"""

import dataclasses
import itertools
import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imex_deq import RESULTS
from imex_deq.data import load_dataset
from imex_deq.experiments import (
    NonConvergenceWarning,
    NonFiniteError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    make_optimizer,
    train,
)
from imex_deq.experiments._training import (
    _initial_state,
    build_model,
    non_convergence_message,
)

VARIANTS = ("vanilla", "skip", "skip-reg", "neural-ode", "explicit")
TINY = {
    "solver": "fixed-point",
    "backward": "unrolled",
    "dataset": "digits",
    "batch_size": 16,
    "limit_train": 64,
    "limit_test": 32,
    "max_steps": 10,
    "epochs": 1,
    "learning_rate": 1e-2,
    "progress": False,
    "timing_batches": 1,
}


def tiny_config(**changes) -> TrainConfig:
    return TrainConfig(**{**TINY, **changes})


def strict_json(text: str):
    """`json.loads` that rejects NaN/Infinity (not JSON, and unreadable by most tools)."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def param_leaves(model) -> list[np.ndarray]:
    params = eqx.filter(model, eqx.is_inexact_array)
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit_train=64, limit_test=32)


@pytest.fixture(scope="module", params=VARIANTS)
def stepped(request, data):
    """One training step of one variant; skip-reg also with Jacobian regularisation so the
    same compile covers the `jac` metric."""
    variant = request.param
    config = tiny_config(model=variant, jac_weight=1.0 if variant == "skip-reg" else 0.0)
    trainer = Trainer(config, optax.adam(config.learning_rate))
    model = build_model(config, data)
    opt_state = trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    x = jnp.asarray(data.x_train[: config.batch_size])
    y = jnp.asarray(data.y_train[: config.batch_size])
    new_model, _new_opt_state, metrics = trainer.step(model, opt_state, x, y, jax.random.PRNGKey(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    return variant, model, new_model, metrics


def test_step_returns_finite_loss(stepped):
    variant, _, _, metrics = stepped
    for name in ("loss", "ce", "skip", "jac", "accuracy"):
        assert math.isfinite(metrics[name]), (variant, name, metrics)
    assert metrics["loss"] > 0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= metrics["converged"] <= 1.0


def test_step_changes_every_parameter(stepped):
    variant, before, after, _ = stepped
    old, new = param_leaves(before), param_leaves(after)
    assert len(old) == len(new) > 0
    # The explicit network evaluates f(0, x): the state weights W_z never see a gradient.
    dead = {id(before.layer.f.w_z.weight)} if variant == "explicit" else set()
    leaves = jax.tree_util.tree_leaves(eqx.filter(before, eqx.is_inexact_array))
    for i, (leaf, a, b) in enumerate(zip(leaves, old, new)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.all(np.isfinite(b)), (variant, i)
        if id(leaf) in dead:
            np.testing.assert_array_equal(a, b)
        else:
            assert not np.array_equal(a, b), f"{variant}: parameter leaf {i} did not change"


def test_step_reports_forward_and_backward_nfe(stepped):
    variant, _, _, metrics = stepped
    assert metrics["nfe"] > 0
    assert metrics["nfe_max"] >= metrics["nfe"]
    assert metrics["backward_nfe"] > 0
    # backward="unrolled" (and the neural ODE's recursive checkpointing) backpropagates
    # once through every forward evaluation.
    assert metrics["backward_nfe"] == pytest.approx(metrics["nfe"], rel=1e-6), variant


def test_step_reports_whether_the_updated_parameters_are_finite(stepped):
    variant, _, _, metrics = stepped
    assert metrics["params_finite"] == 1.0, variant


def test_jacobian_metric(stepped):
    variant, _, _, metrics = stepped
    if variant == "skip-reg":  # trained with jac_weight=1.0
        assert metrics["jac"] > 0
        assert metrics["loss"] == pytest.approx(
            metrics["ce"] + metrics["skip"] + metrics["jac"], rel=1e-5
        )
    else:
        assert metrics["jac"] == 0.0


def test_skip_loss_only_for_skip_variants(stepped):
    variant, _, _, metrics = stepped
    if variant in ("skip", "skip-reg"):
        assert metrics["skip"] > 0
    else:
        assert metrics["skip"] == 0.0


def test_skip_predictor_trained_only_in_skip(stepped):
    variant, before, after, _ = stepped
    if variant != "skip":
        # No explicit predictor: Skip Reg. uses f(0, x), the others start at zero.
        assert not hasattr(before.layer, "predictor")
        return
    old = param_leaves(before.layer.predictor)
    new = param_leaves(after.layer.predictor)
    assert old and all(not np.array_equal(a, b) for a, b in zip(old, new))


# ------------------------------------------------------------------- train() end to end


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, data):
    """train(): 4 steps, the first 2 at fixed depth 3."""
    out = tmp_path_factory.mktemp("pretrain")
    config = tiny_config(model="vanilla", pretrain_steps=2, pretrain_depth=3, out_dir=str(out))
    summary = train(config, data)
    return config, out, summary


def _log(out):
    lines = (out / "log.jsonl").read_text().splitlines()
    return [strict_json(line) for line in lines]


def test_train_log_is_json_lines_with_increasing_steps(pretrained_run):
    _, out, _ = pretrained_run
    text = (out / "log.jsonl").read_text()
    assert text.endswith("\n")
    records = _log(out)
    steps = [r["step"] for r in records if "type" not in r]
    assert steps == [1, 2, 3, 4]
    evals = [r for r in records if r.get("type") == "eval"]
    assert [r["step"] for r in evals] == [4]
    for record in records:
        if "type" not in record:
            assert record["epoch"] == 0
            assert record["time_s"] > 0
            for key in ("loss", "ce", "accuracy", "nfe", "backward_nfe", "converged"):
                assert math.isfinite(record[key]), (key, record)


def test_pretraining_runs_at_fixed_depth(pretrained_run):
    _, out, _ = pretrained_run
    steps = [r for r in _log(out) if "type" not in r]
    for record in steps[:2]:
        assert record["nfe"] == 3
        assert record["nfe_max"] == 3
        assert record["backward_nfe"] == 3  # plain backprop through the 3 applications
    # After pretraining the solver runs again (it is not stuck in fixed-depth mode).
    for record in steps[2:]:
        assert record["backward_nfe"] == pytest.approx(record["nfe"], rel=1e-6)


def test_train_summary(pretrained_run):
    config, out, summary = pretrained_run
    on_disk = strict_json((out / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    assert on_disk["test_nfe"] > 0
    assert on_disk["steps"] == 4
    assert on_disk["name"] == config.name
    assert on_disk["config"]["pretrain_steps"] == 2
    assert on_disk["parameters"] > 0
    for key in ("forward_s", "backward_s", "optimizer_s", "step_s", "predict_s"):
        assert on_disk[key] >= 0, key
    assert on_disk["forward_s"] > 0 and on_disk["predict_s"] > 0
    assert len(on_disk["history"]) == 1 and on_disk["history"][0]["step"] == 4
    assert (out / "checkpoint.eqx").is_file()


def test_compile_time_reported_apart_from_train_time(pretrained_run):
    _, out, summary = pretrained_run
    steps = [r for r in _log(out) if "type" not in r]
    # The first call of each compiled mode (fixed depth: step 1; solving: step 3) is
    # compile time, the rest is training time.
    compile_s = steps[0]["time_s"] + steps[2]["time_s"]
    train_s = steps[1]["time_s"] + steps[3]["time_s"]
    assert summary["compile_time_s"] == pytest.approx(compile_s, rel=1e-6)
    assert summary["train_time_s"] == pytest.approx(train_s, rel=1e-6)
    assert summary["compile_time_s"] > summary["train_time_s"] > 0
    assert summary["compile_timing_s"] >= 0


def test_cosine_schedule_starts_at_the_learning_rate_and_ends_at_zero():
    """Adam's first step is ±lr whatever the gradient's scale; under the cosine schedule
    the step shrinks to 0 at the last training step and stays there."""
    steps = 10
    config = tiny_config(learning_rate=0.1, lr_schedule="cosine")
    optimiser = make_optimizer(config, steps)
    constant = make_optimizer(tiny_config(learning_rate=0.1), steps)
    params = jnp.zeros(3)
    grads = jnp.array([1.0, -2.0, 0.5])
    state, constant_state = optimiser.init(params), constant.init(params)
    sizes = []
    for _ in range(steps + 2):
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and floats
            updates, state = optimiser.update(grads, state)
            fixed, constant_state = constant.update(grads, constant_state)
        sizes.append(float(jnp.max(jnp.abs(updates))))
        np.testing.assert_allclose(np.abs(fixed), 0.1, rtol=1e-4)
    np.testing.assert_allclose(sizes[0], 0.1, rtol=1e-4)
    assert all(a > b for a, b in itertools.pairwise(sizes[:steps]))  # decreasing
    assert sizes[steps] == sizes[steps + 1] == 0.0


def test_unknown_lr_schedule_is_rejected():
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine; got 'step'"):
        tiny_config(lr_schedule="step")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1e-3, 0.0])
def test_learning_rate_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="learning_rate must be"):
        tiny_config(learning_rate=value)


# ------------------------------------------------------------- non-finite runs stop


def _saved_state(config, data):
    trainer = Trainer(config, make_optimizer(config, 1))
    template = eqx.filter_eval_shape(_initial_state, config, data, trainer)
    return load_checkpoint(f"{config.out_dir}/checkpoint.eqx", template)


def _assert_finite_parameters(model):
    leaves = param_leaves(model)
    assert leaves and all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, data):
    """Step 1 moves every weight by about the learning rate (Adam), 1e30: step 2's loss
    overflows to nan. The run stops there; the step-0 checkpoint is left as it was."""
    config = tiny_config(model="explicit", learning_rate=1e30, out_dir=str(tmp_path))
    expected = (
        "training stopped at step 2: the loss is nan; the last good checkpoint (step 0) is "
        f"kept in {tmp_path / 'checkpoint.eqx'}"
    )
    with pytest.raises(NonFiniteError) as info:
        train(config, data)
    assert str(info.value) == expected
    assert isinstance(info.value, RuntimeError)
    (model, _), meta = _saved_state(config, data)
    assert meta["global_step"] == 0
    _assert_finite_parameters(model)
    assert not (tmp_path / "summary.json").exists()
    records = _log(tmp_path)  # strict JSON: no NaN written
    assert [r["step"] for r in records if "type" not in r] == [1]
    assert records[-1] == {"type": "non-finite", "step": 2, "message": expected}


def test_non_finite_step_never_overwrites_a_checkpoint(tmp_path, data):
    """A checkpoint after every step; one training image is nan. Whichever step meets it
    stops the run, and the checkpoint of the step before is the one on disk."""
    x_train = data.x_train.copy()
    x_train[37] = np.nan
    poisoned = dataclasses.replace(data, x_train=x_train)
    config = tiny_config(model="explicit", checkpoint_every=1, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"training stopped at step (\d+): the loss is nan"):
        train(config, poisoned)
    failed = _log(tmp_path)[-1]["step"]
    (model, _), meta = _saved_state(config, data)
    assert meta["global_step"] == failed - 1
    _assert_finite_parameters(model)


def test_non_finite_run_without_out_dir(data):
    config = tiny_config(model="explicit", learning_rate=1e30)
    with pytest.raises(NonFiniteError, match="step 2: the loss is nan; no checkpoint is written"):
        train(config, data)


def test_non_convergence_message_names_the_run_the_fraction_and_the_remedies():
    config = tiny_config(model="skip", rtol=1e-2, max_steps=20)
    record = {"step": 468, "test_converged": 0.0, "test_nfe": 20.0}
    message = non_convergence_message(config, record)
    assert message.startswith(
        f"{config.name}, step 468: only 0.0% of the test solves met rtol 0.01 within 20 steps"
    )
    assert "(mean NFE 20.0)" in message and "jac_weight" in message
    assert non_convergence_message(config, {**record, "test_converged": 0.5}) is None
    assert "49.0%" in non_convergence_message(config, {**record, "test_converged": 0.49})
    # The baselines solve for no equilibrium: their records carry no test_converged.
    assert non_convergence_message(config, {"step": 1, "test_nfe": 1.0}) is None


def test_a_run_whose_solves_stop_at_the_cap_warns_and_logs_it(tmp_path, data):
    """Two fixed-point iterations cannot meet rtol 1e-9: every evaluation warns, once."""
    config = tiny_config(model="vanilla", max_steps=2, rtol=1e-9, out_dir=str(tmp_path))
    with pytest.warns(NonConvergenceWarning, match=r"step 4: only 0\.0% of the test solves"):
        summary = train(config, data)
    assert summary["test_converged"] == 0.0
    flagged = [r for r in _log(tmp_path) if r.get("type") == "not-converged"]
    assert [r["step"] for r in flagged] == [4]
    assert flagged[0]["message"].startswith(f"{config.name}, step 4: only 0.0%")


def test_diagnose_convergence_measures_the_spectral_radius_at_the_solution(
    pretrained_run, data, capsys
):
    """scripts/diagnose_convergence.py on a finished run: its power-iteration estimate
    against the eigenvalues of the dense Jacobian, and the table it prints."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from diagnose_convergence import main, solve_and_measure

    config, out, _ = pretrained_run
    model = build_model(config, data)
    image = jnp.asarray(data.x_test[0])
    nfe, converged, residual, radius = np.asarray(solve_and_measure(model, image, 200))
    x = model.embed(image)
    z, info = model.layer(x, inference=True)
    jacobian = jax.jacfwd(lambda state: model.layer.f(state, x))(z)
    assert radius == pytest.approx(np.max(np.abs(np.linalg.eigvals(jacobian))), rel=0.05)
    assert nfe == int(info.nfe)
    assert converged == float(info.result == RESULTS.successful)
    assert residual == pytest.approx(
        float(jnp.linalg.norm(model.layer.f(z, x) - z) / jnp.linalg.norm(z)), rel=1e-4
    )
    main([str(out), "--images", "2", "--power-steps", "5", "--max-steps", "3"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| run | model | NFE | converged % |")
    assert [row.split(" | ")[:2] for row in rows[2:]] == [
        [f"| {out.name}", "initial"],
        [f"| {out.name}", "trained"],
        [f"| {out.name}", "trained, 3 steps"],
    ]
    assert float(rows[4].split(" | ")[2]) <= 3  # the cap it was given, not the run's


def test_compare_power_starts_converges_to_the_spectral_radius(pretrained_run, data, capsys):
    """scripts/compare_power_starts.py: both starts' estimates against the eigenvalues of
    the dense Jacobian, and the table it prints."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from compare_power_starts import main, power_estimates

    config, out, _ = pretrained_run
    model = build_model(config, data)
    image = jnp.asarray(data.x_test[0])
    estimates = np.asarray(power_estimates(model, image, jax.random.PRNGKey(0), 200))
    x = model.embed(image)
    z, _ = model.layer(x, inference=True)
    jacobian = jax.jacfwd(lambda state: model.layer.f(state, x))(z)
    radius = np.max(np.abs(np.linalg.eigvals(jacobian)))
    assert estimates.shape == (2, 201)
    np.testing.assert_allclose(estimates[:, -1], radius, rtol=0.05)
    main([str(out), "--images", "2", "--steps", "3"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| run | start | k = 0 | k = 1 | k = 2 | k = 3 |"
    assert [row.split(" | ")[1] for row in rows[2:]] == ["random", "residual"]
