# %% [markdown]
# # 02 · Vanilla vs Skip vs Skip Reg. DEQ
#
# A vanilla DEQ starts every solve from $z_0 = 0$. Pal, Edelman & Rackauckas (2022) add an
# **explicit** initial guess, trained to land close to the equilibrium, so that the
# implicit solve has less work to do:
#
# | model | initial guess $z_0$ | extra parameters | extra loss |
# |---|---|---|---|
# | Vanilla DEQ (`deq.DEQ`) | $0$ | none | none |
# | Skip DEQ (`deq.SkipDEQ`) | $g_\phi(x)$, a small explicit network | $\phi$ | $\lambda_\text{skip}\,\lVert z^\star - g_\phi(x)\rVert_1$ |
# | Skip Reg. DEQ (`deq.SkipRegDEQ`) | $f(0, x)$, one application of $f$ | none | $\lambda_\text{skip}\,\lVert z^\star - f(0, x)\rVert_1$ |
#
# `deq.skip_loss(info)` computes that extra loss (a mean absolute error, with the paper's
# $\lambda_\text{skip} = 0.01$ by default).
#
# This notebook trains the three variants of the paper's MNIST-dense model (an embedding,
# then a DEQ on 128 numbers with $f(z, x) = \mathrm{relu}(W_1 z) + \mathrm{relu}(W_2 x)$,
# then a linear head) on the 8×8 digits with the continuous solver. It uses the library's
# own training loop, `imex_deq.experiments.train`, and compares learning curves, NFE and
# wall time.
#
# The runs are short (3 epochs of 22 batches) to keep the notebook quick, so the numbers
# are not the paper's MNIST numbers. The paper trains for many epochs with
# $\lambda_\text{skip} = 0.01$; in a run this short that weight barely moves $z_0$, so here
# we use $\lambda_\text{skip} = 1$ to make the effect visible within a minute.

# %%
import json
import tempfile
import time
import warnings
from pathlib import Path

# imex_deq.experiments shows progress bars with tqdm, which warns in Jupyter without ipywidgets.
warnings.filterwarnings("ignore", message="IProgress not found")

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import imex_deq as deq
from imex_deq.data import load_digits
from imex_deq.experiments import (
    TrainConfig,
    build_dense_model,
    load_checkpoint,
    make_solver,
    train,
)

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
print("JAX", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## Train the three variants
#
# `train(config, data)` runs one configuration and returns a summary. Given an `out_dir`
# it also writes a JSON-lines log (one record per training step, plus evaluation records)
# and a checkpoint. Compile time is measured separately from training time.

# %%
data = load_digits()
runs = Path(tempfile.mkdtemp(prefix="imex-deq-skip-"))
NAMES = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip-reg": "Skip Reg. DEQ"}
configs = {
    variant: TrainConfig(
        model=variant,
        solver="continuous",
        dataset="digits",
        epochs=3,
        batch_size=64,
        skip_weight=1.0,
        evals_per_epoch=2,
        timing_batches=3,
        progress=False,
        out_dir=str(runs / variant),
    )
    for variant in NAMES
}
summaries = {}
for variant, config in configs.items():
    start = time.perf_counter()
    summaries[variant] = train(config, data)
    print(
        f"{NAMES[variant]:14s} {time.perf_counter() - start:5.1f} s wall "
        f"(compile {summaries[variant]['compile_time_s']:.1f} s), "
        f"test accuracy {summaries[variant]['test_accuracy']:.3f}, "
        f"test NFE {summaries[variant]['test_nfe']:.1f}"
    )


def read_log(variant):
    lines = (runs / variant / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r for r in records if r.get("type") != "eval"]
    evals = [r for r in records if r.get("type") == "eval"]
    return steps, evals


logs = {variant: read_log(variant) for variant in NAMES}

# %% [markdown]
# ## Training curves and NFE per batch
#
# The log's `ce` is the cross-entropy alone. (The Skip variants also pay the skip loss, so
# their total losses are not comparable with the vanilla DEQ's.) `nfe` is the forward NFE,
# averaged over the batch's samples.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for i, (variant, (steps, evals)) in enumerate(logs.items()):
    style = dict(color=f"C{i}", label=NAMES[variant])
    axes[0].plot([r["step"] for r in steps], [r["ce"] for r in steps], **style)
    axes[1].plot([r["step"] for r in steps], [r["nfe"] for r in steps], **style)
    axes[2].plot(
        [r["step"] for r in evals],
        [100 * r["test_accuracy"] for r in evals],
        marker="o",
        **style,
    )
axes[0].set(
    title="Training loss", xlabel="training step (batch of 64)", ylabel="cross-entropy (nats)"
)
axes[1].set(
    title="Forward NFE per batch (continuous solver)",
    xlabel="training step (batch of 64)",
    ylabel="NFE per sample (evaluations of f)",
)
axes[2].set(title="Test accuracy", xlabel="training step (batch of 64)", ylabel="test accuracy (%)")
for ax in axes:
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Wall time side by side
#
# Each run's summary holds its total training time (compile excluded) and per-batch
# medians, timed after compilation, of the forward pass (solve and loss), of a whole
# training step (forward, backward through the implicit adjoint, Adam update) and of
# prediction. The summary also has a `backward_s`: the step's median minus those of the
# forward pass and the update. With steps this short that difference drowns in timing
# noise (it is clipped at zero), so we plot whole steps instead. On a shared CPU all of
# these times are noisy: compare them with each other, not with the paper's.

# %%
columns = {
    "train_time_s": "training (s)",
    "forward_s": "forward (s/batch)",
    "step_s": "train step (s/batch)",
    "predict_s": "predict (s/batch)",
}
header = " ".join(f"{c:>22s}" for c in columns.values())
print(f"{'model':14s} {'acc %':>6s} {'test NFE':>8s} {header}")
for variant, s in summaries.items():
    times = " ".join(f"{s[key]:22.4f}" for key in columns)
    print(f"{NAMES[variant]:14s} {100 * s['test_accuracy']:6.1f} {s['test_nfe']:8.1f} {times}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
positions = np.arange(len(NAMES))
axes[0].bar(
    positions,
    [summaries[v]["train_time_s"] for v in NAMES],
    color="C0",
    label="training, compile excluded",
)
axes[0].set(
    title="Training wall time (3 epochs)",
    ylabel="time (s)",
    xticks=positions,
    xticklabels=list(NAMES.values()),
)
axes[0].legend()
width = 0.25
bars = (
    ("forward_s", "forward (solve + loss)"),
    ("step_s", "training step (+ backward + Adam)"),
    ("predict_s", "prediction"),
)
for j, (key, label) in enumerate(bars):
    axes[1].bar(
        positions + (j - 1) * width,
        [1e3 * summaries[v][key] for v in NAMES],
        width,
        label=label,
    )
axes[1].set(
    title="Per-batch cost (batch of 64, median)",
    ylabel="time (ms per batch)",
    xticks=positions,
    xticklabels=list(NAMES.values()),
)
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The explicit prediction $z_0$ vs the corrected equilibrium $z^\star$
#
# Each run saved a checkpoint holding `(model, optimizer_state)`. `load_checkpoint` needs a
# template of the same structure; `eqx.filter_eval_shape` builds one without allocating
# anything, from the same public builder the training loop used.


# %%
def template(config):
    solver = make_solver(config.solver, config.rtol)
    model = build_dense_model(
        config.model,
        solver,
        in_features=64,
        num_classes=10,
        key=jax.random.PRNGKey(config.seed),
        max_steps=config.max_steps,
    )
    opt_state = optax.adam(config.learning_rate).init(eqx.filter(model, eqx.is_inexact_array))
    return model, opt_state


models = {}
for variant, config in configs.items():
    (models[variant], _), meta = load_checkpoint(
        runs / variant / "checkpoint.eqx", eqx.filter_eval_shape(template, config)
    )
    print(NAMES[variant], "restored at step", meta["global_step"])


@eqx.filter_jit
def explicit_and_implicit(model, images):
    """Logits from the explicit guess, head(z0), and from the equilibrium, head(z*)."""
    logits, info, _ = jax.vmap(model.forward)(images)
    return jax.vmap(model.head)(info.z0), logits, info


x_test, y_test = jnp.asarray(data.x_test), data.y_test
print(
    f"\n{'model':14s} {'acc head(z0)':>12s} {'acc head(z*)':>12s} "
    f"{'||z*-z0||/||z*||':>17s} {'NFE':>6s} {'converged':>10s}"
)
outputs = {}
for variant, model in models.items():
    explicit, implicit, info = outputs[variant] = explicit_and_implicit(model, x_test)
    gap = jnp.linalg.norm(info.z_star - info.z0, axis=-1) / jnp.linalg.norm(info.z_star, axis=-1)
    converged = float(jnp.mean(info.result == deq.RESULTS.successful))
    print(
        f"{NAMES[variant]:14s} {np.mean(np.argmax(explicit, -1) == y_test):12.3f} "
        f"{np.mean(np.argmax(implicit, -1) == y_test):12.3f} {float(gap.mean()):17.3f} "
        f"{float(info.nfe.mean()):6.1f} {100 * converged:9.0f}%"
    )

# %% [markdown]
# For a vanilla DEQ $z_0 = 0$, so the gap is 1 and the head applied to $z_0$ gives the same
# guess for every image. The two Skip variants' explicit guesses land much closer to
# $z^\star$.
#
# The figure shows three test digits. In the middle columns each of the 128 state units is
# a point, with its equilibrium value $z^\star$ across and its explicit guess $z_0$ up: on
# the dashed line the guess was already exact. The right column shows the class
# probabilities the head gives from the guess and from the equilibrium.

# %%
picks = [0, 1, 2]
fig, axes = plt.subplots(
    len(picks),
    4,
    figsize=(15, 3.3 * len(picks)),
    gridspec_kw={"width_ratios": [0.7, 1.3, 1.3, 1.6]},
)
for row, i in enumerate(picks):
    ax = axes[row, 0]
    ax.imshow(data.x_test[i, :, :, 0], cmap="gray_r")
    ax.set(title=f"test digit {i} (label {y_test[i]})", xticks=[], yticks=[])
    ax.grid(False)
    for col, variant in ((1, "skip"), (2, "skip-reg")):
        _, _, info = outputs[variant]
        z0, zs = np.asarray(info.z0[i]), np.asarray(info.z_star[i])
        ax = axes[row, col]
        top = 1.05 * max(z0.max(), zs.max())
        ax.plot([0, top], [0, top], color="k", lw=1, ls="--", label="z0 = z*")
        ax.scatter(zs, z0, s=10, alpha=0.7, color=f"C{col}", label="one of 128 state units")
        ax.set(
            title=f"{NAMES[variant]}: guess vs equilibrium",
            xlabel="z* (activation, a.u.)",
            ylabel="z0 (activation, a.u.)",
            xlim=(0, top),
            ylim=(0, top),
        )
        ax.legend(fontsize=8, loc="upper left")
    ax = axes[row, 3]
    explicit, implicit, _ = outputs["skip-reg"]
    ax.bar(np.arange(10) - 0.2, jax.nn.softmax(explicit[i]), 0.4, label="from z0 = f(0, x)")
    ax.bar(np.arange(10) + 0.2, jax.nn.softmax(implicit[i]), 0.4, label="from z*")
    ax.set(
        title="Skip Reg. DEQ: head's class probabilities",
        xlabel="digit class",
        ylabel="probability",
        xticks=range(10),
        ylim=(0, 1),
    )
    ax.legend(fontsize=8)
fig.suptitle(
    "Explicit prediction z0 vs corrected equilibrium z* "
    "(points on the dashed line: the guess was already right)"
)
fig.tight_layout()
plt.show()

# %% [markdown]
# Things to notice:
#
# - The Skip variants reach an accuracy similar to the vanilla DEQ's, but their solves
#   start nearer the answer and need fewer function evaluations. The saving grows during
#   training, as the skip loss pulls $z_0$ onto $z^\star$.
# - Skip Reg. DEQ gets its guess for free: $f(0, x)$ is one evaluation of $f$ and adds no
#   parameters. Skip DEQ trains a separate predictor.
# - The classifier uses the equilibrium; $z_0$ only decides where the solver starts.
