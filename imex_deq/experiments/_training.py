"""The training loop: one jitted step, honest timing, JSON-lines log, atomic checkpoints."""

import dataclasses
import functools
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array
from tqdm.auto import tqdm

from .. import nn
from .._deq import SkipDEQ, SkipRegDEQ, with_fixed_depth
from .._precision import with_precision
from .._regularisers import skip_loss
from .._solution import RESULTS
from ..data import Dataset, iterate_batches, load_dataset, num_batches
from ._checkpoint import load_checkpoint, save_checkpoint, write_atomically
from ._compile_cache import cache_hits
from ._config import TrainConfig
from ._models import Classifier, build_conv_model, build_dense_model
from ._parallel import (
    check_batch_size,
    host_slice,
    initialize_distributed,
    is_main_process,
    make_data_mesh,
    replicate,
    shard_batch,
    to_host,
)
from ._presets import PRESETS
from ._registry import BASELINES, make_adjoint, make_solver
from ._timing import median_time, time_call

CHECKPOINT = "checkpoint.eqx"
LOG = "log.jsonl"
SUMMARY = "summary.json"


CONVERGED_WARNING_BELOW = 0.5
"""An evaluation at which fewer than this fraction of the DEQ's test solves met the
tolerance raises a `NonConvergenceWarning`."""


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or non-finite parameters; the run stopped
    there, and the last checkpoint written before it (if any) is left as it was."""


class NonConvergenceWarning(UserWarning):
    """Most of a DEQ's solves stopped at the iteration cap: z is not an equilibrium there,
    so the implicit-function-theorem gradient is not the gradient of the model trained."""


def build_model(config: TrainConfig, data: Dataset) -> Classifier:
    """The run's model, initialised from its seed; with `precision="bfloat16"` the DEQ's f
    is wrapped in `MixedPrecision`."""
    return with_model_precision(_build_model(config, data), config.precision)


def with_model_precision(model: Classifier, precision: str) -> Classifier:
    """`model` with its layer's f computed in `precision`: `"float32"` returns it as it
    is, `"bfloat16"` wraps f in `MixedPrecision` (parameters and state stay float32)."""
    if precision == "float32":
        return model
    return eqx.tree_at(lambda m: m.layer.f, model, with_precision(model.layer.f, precision))


def _build_model(config: TrainConfig, data: Dataset) -> Classifier:
    key = jax.random.PRNGKey(config.seed)
    solver = make_solver(
        config.solver, config.rtol, config.ode_solver, config.ode_rtol, config.ode_atol
    )
    adjoint = make_adjoint(config.backward, config.rtol)
    if config.architecture == "dense":
        return build_dense_model(
            config.model,
            solver,
            in_features=int(np.prod(data.image_shape)),
            num_classes=data.num_classes,
            key=key,
            adjoint=adjoint,
            max_steps=config.max_steps,
        )
    conv = dataclasses.replace(
        PRESETS[config.architecture](),
        image_size=tuple(data.image_shape[:2]),
        in_channels=data.image_shape[2],
        num_classes=data.num_classes,
    )
    return build_conv_model(
        config.model, solver, config=conv, key=key, adjoint=adjoint, max_steps=config.max_steps
    )


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam at `config.learning_rate`, held constant or cosine-annealed to 0 over
    `total_steps` (`config.lr_schedule`)."""
    if config.lr_schedule == "cosine":
        return optax.adam(optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1)))
    return optax.adam(config.learning_rate)


class Trainer(eqx.Module):
    """The jitted functions of one configuration: loss, training step, update, prediction."""

    config: TrainConfig = eqx.field(static=True)
    optimizer: optax.GradientTransformation = eqx.field(static=True)

    def loss(self, model_and_counter, x, y, key):
        """Cross-entropy + skip loss + Jacobian regularisation, and the batch's metrics."""
        model, counter = model_and_counter
        dropout_key, jac_key, jac_coin = jax.random.split(key, 3)
        logits, info, injection = jax.vmap(
            lambda image, k: model.forward(image, key=k, backward_counter=counter)
        )(x, jax.random.split(dropout_key, x.shape[0]))
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        converged = jnp.mean(info.result == RESULTS.successful)
        skip = (
            skip_loss(info, self.config.skip_weight)
            if isinstance(model.layer, (SkipDEQ, SkipRegDEQ))
            else jnp.zeros(())
        )
        jac = jnp.zeros(())
        jac_applied = jnp.zeros(())
        if self.config.jac_weight:

            def jacobian_term():
                keys = jax.random.split(jac_key, x.shape[0])
                return jnp.mean(
                    jax.vmap(
                        lambda i, n, k: model.layer.jacobian_regularisation(
                            i, n, key=k, norm=self.config.jac_norm
                        )
                    )(injection, info, keys)
                )

            conditions = []
            if self.config.jac_prob < 1.0:
                # Bai et al. 2021: regularise a random fraction of the steps.
                conditions.append(jax.random.bernoulli(jac_coin, self.config.jac_prob))
            if self.config.jac_on_demand is not None:
                # Only while the batch's solves do not converge (docs/results.md, "Why
                # Skip's third seed collapsed").
                conditions.append(converged < self.config.jac_on_demand)
            if conditions:
                # A step left unregularised costs nothing: the cond's other branch runs.
                apply = functools.reduce(jnp.logical_and, conditions)
                jac = jax.lax.cond(apply, jacobian_term, lambda: jnp.zeros(()))
                jac_applied = apply.astype(jac.dtype)
            else:
                jac, jac_applied = jacobian_term(), jnp.ones(())
        total = ce + skip + self.config.jac_weight * jac
        metrics = dict(
            loss=total,
            ce=ce,
            skip=skip,
            jac=jac,
            jac_applied=jac_applied,
            accuracy=jnp.mean(jnp.argmax(logits, -1) == y),
            nfe=jnp.mean(info.nfe),
            nfe_max=jnp.max(info.nfe),
            converged=converged,
        )
        return total, metrics

    @eqx.filter_jit
    def forward_loss(self, model, x, y, key):
        return self.loss((model, jnp.zeros(())), x, y, key)[0]

    def _depth_loss(self, model_and_counter, x, y, key, fixed_depth):
        model, counter = model_and_counter
        if fixed_depth is not None:
            model = with_fixed_depth(model, fixed_depth)
        return self.loss((model, counter), x, y, key)

    @eqx.filter_jit
    def step(self, model, opt_state, x, y, key, fixed_depth=None):
        """One training step: predictor + solve + loss + adjoint + optimizer update.
        `fixed_depth` (pretraining) applies f that many times instead of solving; `model`,
        its gradient and `opt_state` keep the solving model's structure either way."""
        grad_fn = eqx.filter_value_and_grad(self._depth_loss, has_aux=True)
        (_, metrics), (grads, counter_grad) = grad_fn(
            (model, jnp.zeros(())), x, y, key, fixed_depth
        )
        model, opt_state = self._apply(model, opt_state, grads)
        metrics["backward_nfe"] = counter_grad / x.shape[0]
        metrics["params_finite"] = _all_finite(model)
        return model, opt_state, metrics

    def _apply(self, model, opt_state, grads):
        params = eqx.filter(model, eqx.is_inexact_array)
        # optax mixes Python floats with int32 step counts (Adam's bias correction), which
        # fails under jax_numpy_dtype_promotion="strict"; the library's own code stays strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    @eqx.filter_jit
    def update(self, model, opt_state, grads):
        return self._apply(model, opt_state, grads)

    @eqx.filter_jit
    def predict(self, model, x):
        logits, info, _ = jax.vmap(lambda image: model.forward(image, inference=True))(x)
        return jnp.argmax(logits, -1), info.nfe, info.result == RESULTS.successful


def total_steps(config: TrainConfig, train_size: int) -> int:
    """Training steps of a whole run of `config` on `train_size` images."""
    return num_batches(train_size, config.batch_size) * config.epochs


def make_trainer(config: TrainConfig, data: Dataset) -> Trainer:
    """The `Trainer` of `config` on `data` (its learning-rate schedule spans all steps)."""
    return Trainer(config, make_optimizer(config, total_steps(config, len(data.x_train))))


def load_trained(config: TrainConfig, data: Dataset) -> tuple[Trainer, Classifier]:
    """`(trainer, model)` of the run of `config` saved in `config.out_dir` (its last
    checkpoint: the finished model, or where an interrupted run stopped). A missing,
    truncated or mismatched checkpoint is a `CheckpointError` naming the file."""
    if config.out_dir is None:
        raise ValueError("load_trained: config.out_dir is None (where is the checkpoint?).")
    trainer = make_trainer(config, data)
    template = eqx.filter_eval_shape(_initial_state, config, data, trainer)
    (model, _), _ = load_checkpoint(Path(config.out_dir) / CHECKPOINT, template)
    return trainer, model


def _all_finite(tree) -> Array:
    """Whether every inexact array in `tree` is finite (one reduction per leaf)."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def evaluate(
    trainer: Trainer, model, x: np.ndarray, y: np.ndarray, batch_size: int, put=jnp.asarray
) -> dict:
    """Test accuracy, mean NFE and (for the DEQs) the fraction of samples whose solve met
    the tolerance (result `successful`) over all of (x, y); the last batch is padded, not
    recompiled.
    `put` places a batch on the devices (e.g. sharded for data parallelism)."""
    correct, nfes, solved = 0, [], []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        real = len(xb)
        if real < batch_size:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch_size - real, 0)])
        predictions, nfe, converged = trainer.predict(model, put(xb))
        correct += int(np.sum(to_host(predictions)[:real] == y[start : start + real]))
        nfes.extend(to_host(nfe)[:real].tolist())
        solved.extend(to_host(converged)[:real].tolist())
    scores = {"test_accuracy": correct / len(x), "test_nfe": float(np.mean(nfes))}
    if trainer.config.model not in BASELINES:  # the baselines solve for no equilibrium
        scores["test_converged"] = float(np.mean(solved))
    return scores


def _step_key(config: TrainConfig, global_step: int):
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), global_step)


def _initial_state(config, data, trainer):
    model = build_model(config, data)
    return model, trainer.optimizer.init(eqx.filter(model, eqx.is_inexact_array))


def _resume(config: TrainConfig, data: Dataset, trainer: Trainer, out: Path):
    template = eqx.filter_eval_shape(_initial_state, config, data, trainer)
    (model, opt_state), meta = load_checkpoint(out / CHECKPOINT, template)
    log = out / LOG
    if log.exists() and is_main_process():
        kept = [
            line
            for line in log.read_text().splitlines()
            if _logged_step(line) <= meta["global_step"]
        ]
        log.write_text("".join(line + "\n" for line in kept))
    return model, opt_state, meta


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short by a kill mid-write counts as after any
    checkpoint (it is dropped on resume)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class _Log:
    def __init__(self, out: Path | None):
        self.path = None if out is None else out / LOG

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def non_convergence_message(config: TrainConfig, record: dict) -> str | None:
    """Why an evaluation `record` of a DEQ run is a `NonConvergenceWarning`, or None when
    at least `CONVERGED_WARNING_BELOW` of its test solves converged (baselines: always None)."""
    converged = record.get("test_converged")
    if converged is None or converged >= CONVERGED_WARNING_BELOW:
        return None
    return (
        f"{config.name}, step {record['step']}: only {100 * converged:.1f}% of the test "
        f"solves met rtol {config.rtol:g} within {config.max_steps} steps (mean NFE "
        f"{record['test_nfe']:.1f}); the implicit gradient assumes an equilibrium, so "
        "training follows an inexact gradient. Jacobian regularisation (jac_weight; "
        "jac_on_demand to apply it only while solves fail), more steps (max_steps) or a "
        "looser tolerance (rtol) are the remedies."
    )


def _to_float(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


def _non_finite(metrics: dict, params_finite: bool) -> str | None:
    """What is not finite after a step (its loss, or its updated parameters), or None."""
    if not math.isfinite(metrics["loss"]):
        return f"the loss is {metrics['loss']}"
    if not params_finite:
        return "the updated parameters are not finite"
    return None


def measure_timing(
    trainer: Trainer, model, opt_state, data: Dataset, repeats: int, put=jnp.asarray
) -> dict:
    """Per-batch seconds of the forward pass (with the solve), the backward pass (the
    adjoint), the optimizer update and prediction, each median of `repeats` after a
    compile-and-warm-up call reported apart."""
    config = trainer.config
    x = put(data.x_train[: config.batch_size])
    y = put(data.y_train[: config.batch_size])
    key = _step_key(config, 0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
    compile_forward, forward = median_time(trainer.forward_loss, model, x, y, key, repeats=repeats)
    _, step = median_time(trainer.step, model, opt_state, x, y, key, repeats=repeats)
    compile_update, update = median_time(trainer.update, model, opt_state, zeros, repeats=repeats)
    x_test = put(data.x_test[: config.batch_size])
    compile_predict, predict = median_time(trainer.predict, model, x_test, repeats=repeats)
    return {
        "forward_s": forward,
        "backward_s": max(step - forward - update, 0.0),
        "optimizer_s": update,
        "step_s": step,
        "predict_s": predict,
        "compile_timing_s": compile_forward + compile_update + compile_predict,
    }


def train(config: TrainConfig, data: Dataset | None = None) -> dict:
    """Run one training run and return its summary (also written to `out_dir`).

    **Arguments:**

    - `config`: a `TrainConfig`.
    - `data`: an already loaded `Dataset` (default: load `config.dataset`).

    **Returns:**

    A dict with the final test accuracy and NFE, training time (compile excluded),
    compile time, per-batch forward/backward/optimizer/prediction seconds, and the
    evaluation history.

    With `config.data_parallel` (or `distributed`) every batch is split over all devices
    and the model and optimizer state are replicated; the jitted step is the same.

    A step whose loss or updated parameters are not finite stops the run with
    `NonFiniteError` naming the step. Nothing is saved after it: the last checkpoint in
    `out_dir` (a fresh run writes one at step 0) stays as it was.
    """
    if config.distributed:
        initialize_distributed()
    mesh = make_data_mesh() if config.data_parallel or config.distributed else None
    if mesh is None:
        put = jnp.asarray
    else:
        check_batch_size(mesh, config.batch_size)

        def put(batch):
            return shard_batch(mesh, host_slice(np.asarray(batch)))

    if data is None:
        data = load_dataset(
            config.dataset, limit_train=config.limit_train, limit_test=config.limit_test
        )
    out = None if config.out_dir is None else Path(config.out_dir)
    writer = out if is_main_process() else None  # several hosts: process 0 writes, all read
    if writer is not None:
        writer.mkdir(parents=True, exist_ok=True)
    per_epoch = num_batches(len(data.x_train), config.batch_size)
    run_steps = total_steps(config, len(data.x_train))
    trainer = make_trainer(config, data)
    if config.resume and (out / CHECKPOINT).exists():
        model, opt_state, meta = _resume(config, data, trainer, out)
    else:
        if writer is not None and (writer / LOG).exists():
            (writer / LOG).unlink()
        model, opt_state = _initial_state(config, data, trainer)
        meta = {"global_step": 0, "history": [], "train_time_s": 0.0, "compile_time_s": 0.0}
        if writer is not None:  # a good checkpoint to keep should the first steps diverge
            save_checkpoint(writer / CHECKPOINT, (model, opt_state), meta)
    saved_step = meta["global_step"]
    if mesh is not None:
        model, opt_state = replicate(mesh, (model, opt_state))
    log = _Log(writer)
    eval_points = {
        round(per_epoch * (e + (i + 1) / config.evals_per_epoch))
        for e in range(config.epochs)
        for i in range(config.evals_per_epoch)
    }
    global_step = meta["global_step"]
    compiled: set[bool] = set()
    recent: list[float] = []
    bar = tqdm(total=run_steps, initial=global_step, disable=not config.progress, leave=False)
    while global_step < run_steps:
        epoch, start = divmod(global_step, per_epoch)
        batches = iterate_batches(
            data.x_train,
            data.y_train,
            config.batch_size,
            seed=config.seed,
            epoch=epoch,
            start_batch=start,
            augment=config.augment,
        )
        for xb, yb in batches:
            pretraining = global_step < config.pretrain_steps
            hits_before = cache_hits()
            (model, opt_state, metrics), seconds = time_call(
                trainer.step,
                model,
                opt_state,
                put(xb),
                put(yb),
                _step_key(config, global_step),
                config.pretrain_depth if pretraining else None,
            )
            if pretraining not in compiled:
                compiled.add(pretraining)
                # A resumed session compiles again: its time replaces, not adds to, the last.
                program = "pretraining" if pretraining else "training"
                meta.setdefault("compile_s", {})[program] = seconds
                meta.setdefault("compile_cached", {})[program] = cache_hits() > hits_before
                meta["compile_time_s"] = sum(meta["compile_s"].values())
            else:
                meta["train_time_s"] += seconds
                recent.append(seconds)
            global_step += 1
            metrics = _to_float(metrics)
            failure = _non_finite(metrics, metrics.pop("params_finite") == 1.0)
            if failure is not None:  # stop before anything saves the bad parameters
                bar.close()
                kept = (
                    "no checkpoint is written without out_dir"
                    if out is None
                    else f"the last good checkpoint (step {saved_step}) is kept in "
                    f"{out / CHECKPOINT}"
                )
                message = f"training stopped at step {global_step}: {failure}; {kept}"
                log.write({"type": "non-finite", "step": global_step, "message": message})
                raise NonFiniteError(message)
            log.write({"step": global_step, "epoch": epoch, "time_s": seconds, **metrics})
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                acc=f"{metrics['accuracy']:.3f}",
                nfe=f"{metrics['nfe']:.1f}",
            )
            if global_step in eval_points:
                record = evaluate(trainer, model, data.x_test, data.y_test, config.batch_size, put)
                record.update(
                    step=global_step,
                    train_time_s=meta["train_time_s"],
                    step_time_s=statistics.median(recent) if recent else float("nan"),
                    train_loss=metrics["loss"],
                    train_nfe=metrics["nfe"],
                    backward_nfe=metrics["backward_nfe"],
                )
                recent = []
                meta["history"].append(record)
                log.write({"type": "eval", **record})
                message = non_convergence_message(config, record)
                if message is not None:
                    log.write({"type": "not-converged", "step": global_step, "message": message})
                    warnings.warn(message, NonConvergenceWarning, stacklevel=2)
            at_epoch_end = global_step % per_epoch == 0
            if writer is not None and (global_step % config.checkpoint_every == 0 or at_epoch_end):
                meta["global_step"] = saved_step = global_step
                save_checkpoint(writer / CHECKPOINT, (model, opt_state), meta)
            if config.stop_after_steps is not None and global_step >= config.stop_after_steps:
                bar.close()
                return {"interrupted_at": global_step}
    bar.close()
    meta["global_step"] = global_step
    summary = _summarise(config, trainer, model, opt_state, data, meta, put)
    if writer is not None:
        save_checkpoint(writer / CHECKPOINT, (model, opt_state), meta)
        write_atomically(writer / SUMMARY, json.dumps(summary, indent=2).encode())
    return summary


def _summarise(config, trainer, model, opt_state, data, meta, put=jnp.asarray) -> dict[str, Any]:
    final = evaluate(trainer, model, data.x_test, data.y_test, config.batch_size, put)
    timing = measure_timing(trainer, model, opt_state, data, config.timing_batches, put)
    history = meta["history"]
    return {
        "config": dataclasses.asdict(config),
        "name": config.name,
        **final,
        "train_time_s": meta["train_time_s"],
        "compile_time_s": meta["compile_time_s"],
        "compile_cached": any(meta.get("compile_cached", {}).values()),
        "steps": meta["global_step"],
        "backward_nfe": history[-1]["backward_nfe"] if history else float("nan"),
        "parameters": nn.count_parameters(model),
        **timing,
        "history": history,
    }
