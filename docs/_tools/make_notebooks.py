"""Generate the tutorial notebooks in `notebooks/` (outputs stripped).

Run from the repository root:

    .venv/bin/python docs/_tools/make_notebooks.py

The notebooks are the source of truth for readers; this script is the source of truth for
editors. Edit the cells here, regenerate, then execute them (tests/test_notebooks.py does).
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}

# Shared first code cell: imports, plotting defaults and the wall-clock start.
SETUP = '''\
import time

NOTEBOOK_START = time.perf_counter()

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import imex_deq as deq
from imex_deq.data import iterate_batches, load_digits

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
print("JAX", jax.__version__, "on", jax.devices()[0].platform)'''

RESULT_HELPER = '''\
RESULT_NAMES = ("successful", "nonlinear_max_steps_reached", "nonlinear_divergence", "nonfinite")


def result_counts(result):
    """How many samples ended with each RESULTS code (works on one sample or a batch)."""
    counts = {name: int(np.sum(np.asarray(result == getattr(deq.RESULTS, name))))
              for name in RESULT_NAMES}
    return {name: n for name, n in counts.items() if n}'''

TRACE_HELPER = '''\
def residual_trace(solver, f, x, z0, steps):
    """Relative residual ||f(z_k) - z_k|| / ||f(z_k)|| and cumulative NFE after each of
    `steps` iterations of a discrete solver, by running its update rule (the same
    `init`/`update` that `fixed_point` drives) in a `lax.scan`. Stopping is switched off,
    so every step is recorded."""

    @jax.jit
    def run(x, z0):
        fn = lambda z: f(z, x)

        def body(carry, _):
            z, state = carry
            fz, z_next, state, nfe = solver.update(fn, z, state)
            return (z_next, state), (deq.residual_norm(fz, z, "rel"), nfe)

        _, (res, nfe) = jax.lax.scan(body, (z0, solver.init(z0)), length=steps)
        return res, jnp.cumsum(nfe)

    res, nfe = run(x, z0)
    return np.asarray(res), np.asarray(nfe)'''

FOOTER = '''\
print(f"notebook run time: {time.perf_counter() - NOTEBOOK_START:.1f} s")'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------------------
# 01 quickstart
# --------------------------------------------------------------------------------------


def quickstart():
    return [
        md(r"""
# 01 · Quickstart: a deep equilibrium model in ten lines

A **deep equilibrium model (DEQ)** replaces a stack of layers by one layer $f$ applied
"infinitely often". Its output is the **fixed point**

$$z^\star = f(z^\star, x),$$

found by a root solver rather than by running the layers one after another. Gradients come
from the implicit function theorem at $z^\star$, so memory does not grow with the number of
solver iterations.

This notebook trains a tiny DEQ classifier on scikit-learn's bundled 8×8 digits (nothing is
downloaded), then looks inside one solve: the fixed point, the number of function
evaluations (**NFE**), the **residual** and the **result code**, and how each solver
drives the residual down.
"""),
        code(SETUP),
        md(r"""
## Data

`load_digits` returns standardised images shaped `(N, 8, 8, 1)`. A dense model just
flattens them to 64 numbers.
"""),
        code('''\
data = load_digits()
x_train = data.x_train.reshape(data.num_train, -1)
x_test = data.x_test.reshape(data.num_test, -1)
print(data)
print("train", x_train.shape, "test", x_test.shape)'''),
        md(r"""
## The model: ten lines

`f(z, x) = tanh(W_z z + W_x x + b)` on a 32-number state $z$. `deq.DEQ` wraps it into a
layer that takes **one** sample and returns `(z_star, info)`; batch with `jax.vmap`.
Because the state (32) is not shaped like the input (64), `state_shape` tells the layer
what $z$ looks like.
"""),
        code('''\
WIDTH = 32


class Cell(eqx.Module):  # f(z, x)
    w_z: eqx.nn.Linear
    w_x: eqx.nn.Linear

    def __init__(self, key):
        kz, kx = jax.random.split(key)
        self.w_z = eqx.nn.Linear(WIDTH, WIDTH, use_bias=False, key=kz)
        self.w_x = eqx.nn.Linear(64, WIDTH, key=kx)

    def __call__(self, z, x):
        return jnp.tanh(self.w_z(z) + self.w_x(x))


class Classifier(eqx.Module):  # x -> DEQ -> linear head
    layer: deq.DEQ
    head: eqx.nn.Linear

    def __call__(self, x):
        z_star, info = self.layer(x)
        return self.head(z_star), info


k_cell, k_head = jax.random.split(jax.random.PRNGKey(0))
state = jax.ShapeDtypeStruct((WIDTH,), jnp.float32)
model = Classifier(deq.DEQ(Cell(k_cell), deq.Anderson(rtol=1e-3), state_shape=state),
                   eqx.nn.Linear(WIDTH, 10, key=k_head))'''),
        md(r"""
## Training

An ordinary Equinox + optax loop. The solve happens inside `jax.vmap(model)`; the backward
pass uses the default `ImplicitAdjoint` (a GMRES solve with $(I - \partial f/\partial z)^\top$
at $z^\star$).
"""),
        code('''\
optimizer = optax.adam(3e-3)
opt_state = optimizer.init(eqx.filter(model, eqx.is_array))


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    def loss_fn(model):
        logits, info = jax.vmap(model)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, info

    (loss, info), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss, info.nfe.mean()


@eqx.filter_jit
def predict(model, x):
    logits, info = jax.vmap(model)(x)
    return jnp.argmax(logits, -1), info


losses, nfes = [], []
start = time.perf_counter()
for epoch in range(5):
    for xb, yb in iterate_batches(x_train, data.y_train, 128, seed=0, epoch=epoch):
        model, opt_state, loss, nfe = train_step(model, opt_state, xb, yb)
        losses.append(float(loss))
        nfes.append(float(nfe))
print(f"{len(losses)} steps in {time.perf_counter() - start:.1f} s (first step compiles)")

labels, info = predict(model, x_test)
print(f"test accuracy {np.mean(np.asarray(labels) == data.y_test):.3f}, "
      f"mean NFE {float(info.nfe.mean()):.1f}")'''),
        code('''\
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(losses, label="training batch")
ax1.set(title="Training loss", xlabel="training step (batch of 128)",
        ylabel="cross-entropy (nats)")
ax1.legend()
ax2.plot(nfes, color="C1", label="mean over the batch")
ax2.set(title="Forward NFE per sample (Anderson, rtol 1e-3)",
        xlabel="training step (batch of 128)", ylabel="NFE (evaluations of f)")
ax2.legend()
fig.tight_layout()
plt.show()'''),
        md(r"""
## What did the solve return?

`info` is a `DEQInfo` per sample (batched by `vmap`):

- `z_star`: the equilibrium $z^\star$;
- `nfe`: how many times $f$ was evaluated;
- `steps`: solver iterations (for Anderson, one $f$ per step; the final $f$ counts too);
- `residual`: $\lVert f(z) - z\rVert / \lVert f(z)\rVert$ at the last iterate
  (`termination="rel"`, the default);
- `result`: a `deq.RESULTS` code: `successful`, `nonlinear_max_steps_reached`,
  `nonlinear_divergence` or `nonfinite`.

We can check the fixed point by hand: apply $f$ once more and measure how far it moves.
The reported residual belongs to the solver's last iterate $z_k$ and the returned value is
$z^\star = f(z_k)$, one more application of $f$, so the hand-made number is usually a bit
smaller than the reported one.
"""),
        code(RESULT_HELPER),
        code('''\
f = model.layer.f
x0 = jnp.asarray(x_test[0])
z_star, one = model.layer(x0)
fz = f(z_star, x0)
manual = float(jnp.linalg.norm(fz - z_star) / jnp.linalg.norm(fz))
print(f"NFE {int(one.nfe)}, steps {int(one.steps)}, reported residual {float(one.residual):.2e}")
print(f"||f(z*) - z*|| / ||f(z*)|| recomputed by hand: {manual:.2e}  (tolerance rtol = 1e-3)")
print("converged:", bool(one.result == deq.RESULTS.successful))
print("result codes over the test set:", result_counts(info.result))'''),
        md(r"""
## Residual per iteration, for every solver

The same $f$ (the trained cell at one test image) solved by each solver. For the four
discrete solvers we run their update rule step by step with stopping switched off, using
the public `init`/`update` methods that `fixed_point` itself drives. The plot uses **NFE**
on the horizontal axis because one Newton–Krylov step costs many evaluations of $f$
(a linearisation plus GMRES products) while the others cost one.

To make the comparison interesting we also solve a *harder* map with the **same fixed
point**: the over-relaxed $f_\omega(z, x) = z + \omega\,(f(z, x) - z)$ with $\omega = 2.2$.
Its Jacobian $I + \omega(\partial f/\partial z - I)$ has eigenvalues near $1 - \omega = -1.2$,
outside the unit circle, so plain fixed-point iteration oscillates away from $z^\star$ while
the accelerated solvers, which model the Jacobian, still converge.
"""),
        code(TRACE_HELPER),
        code('''\
OMEGA = 2.2
f_hard = lambda z, x: z + OMEGA * (f(z, x) - z)  # same fixed point, harder to find
z0 = jnp.zeros(WIDTH)
discrete = {
    "FixedPointIteration": deq.FixedPointIteration(),
    "Anderson": deq.Anderson(),
    "Broyden": deq.Broyden(),
    "NewtonKrylov": deq.NewtonKrylov(),
}
traces = {}
for label, cell in (("trained f", f), ("over-relaxed f (ω = 2.2)", f_hard)):
    traces[label] = {name: residual_trace(s, cell, x0, z0, 40) for name, s in discrete.items()}'''),
        md(r"""
`SteadyStateODE` (the continuous DEQ) is not a step-by-step rule; it integrates
$\mathrm{d}z/\mathrm{d}t = f(z, x) - z$ with an adaptive Tsit5 solver. We record its residual
at every accepted ODE step by integrating the same equation with diffrax and
`SaveAt(steps=True)`, with the settings `SteadyStateODE` uses (initial step 1, PID control
at `rtol / 5`), and convert steps to NFE with the count `SteadyStateODE` documents
(1 first-same-as-last stage + 1 initial steady-state test, then 6 stages + 1 test per step,
+ 1 final $f$). The `fixed_point` calls further down confirm these counts.
"""),
        code('''\
import diffrax as dfx


def ode_trace(cell, x, z0, steps, ode_tol=2e-4):
    @jax.jit
    def run(x, z0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, z, x: cell(z, x) - z), dfx.Tsit5(), t0=0.0, t1=1e3,
            dt0=1.0, y0=z0, args=x, saveat=dfx.SaveAt(steps=True),
            stepsize_controller=dfx.PIDController(rtol=ode_tol, atol=ode_tol),
            max_steps=steps, throw=False)
        res = jax.vmap(lambda z: deq.residual_norm(cell(z, x), z, "rel"))(sol.ys)
        return res, sol.stats["num_steps"]

    res, n = run(x, z0)
    res = np.asarray(res)[: int(n)]
    nfe = 1 + 1 + 7 * np.arange(1, len(res) + 1) + 1
    return res, nfe


for label, cell in (("trained f", f), ("over-relaxed f (ω = 2.2)", f_hard)):
    traces[label]["SteadyStateODE"] = ode_trace(cell, x0, z0, 40)'''),
        code('''\
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (label, per_solver) in zip(axes, traces.items()):
    for name, (res, nfe) in per_solver.items():
        ax.semilogy(nfe, res, marker=".", label=name)
    ax.axhline(1e-3, color="k", ls="--", lw=1, label="rtol = 1e-3")
    ax.set(title=f"Residual vs cost: {label}", xlabel="NFE (evaluations of f)",
           ylabel="relative residual ||f(z)-z|| / ||f(z)|| (unitless)", xlim=(0, 200))
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
        md(r"""
Reading the plot:

- On the trained $f$ (a contraction) the three one-evaluation-per-step solvers behave
  alike and cross the tolerance after about ten evaluations; the residual then bottoms out
  near $10^{-7}$, float32 round-off.
- On the over-relaxed $f$ plain fixed-point iteration never gets below 1, while Anderson
  and Broyden still converge in about a dozen evaluations.
- Newton–Krylov pays about 20 evaluations per step (a linearisation and GMRES products).
  It has no line search, so from $z_0 = 0$ it can wander for a few steps before the
  quadratic convergence sets in; it pays off for large, stiff problems, not this one.
- The continuous solver (`SteadyStateODE`) needs the most evaluations and its residual
  levels off near the ODE's local error tolerance: it follows the trajectory $z(t)$
  instead of jumping to $z^\star$ (see notebook 03).

## Calling a solver directly with `fixed_point`

`deq.fixed_point(fn, solver, z0, args)` is the functional core under every layer. With
`throw=False` (the default) a failed solve is reported, not raised:
"""),
        code('''\
print("over-relaxed f, rtol = 1e-3, max_steps = 30")
for name, solver in {**discrete, "SteadyStateODE": deq.SteadyStateODE()}.items():
    sol = deq.fixed_point(f_hard, solver, z0, x0, max_steps=30, throw=False)
    print(f"  {name:20s} NFE {int(sol.nfe):4d}  steps {int(sol.num_steps):3d}  "
          f"residual {float(sol.residual):.1e}  {result_counts(sol.result)}")'''),
        md(r"""
## Next

- `02_skip_deq.ipynb`: Skip DEQ and Skip Reg. DEQ, the explicit initial guess that makes
  solves cheaper.
- `03_continuous_vs_neural_ode.ipynb`: the continuous DEQ as an infinite-time neural ODE.
- `04_custom_models.ipynb`: your own $f$, PyTree states, adjoints, checkpoints.
- `05_failure_modes.ipynb`: what non-convergence looks like and what to do about it.
"""),
        code(FOOTER),
    ]


# --------------------------------------------------------------------------------------
# 02 Skip DEQ
# --------------------------------------------------------------------------------------


def skip_deq():
    return [
        md(r"""
# 02 · Vanilla vs Skip vs Skip Reg. DEQ

A vanilla DEQ starts every solve from $z_0 = 0$. Pal, Edelman & Rackauckas (2022) add an
**explicit** initial guess that is trained to land close to the equilibrium, so the
implicit solve has less to do:

| model | initial guess $z_0$ | extra parameters | extra loss |
|---|---|---|---|
| Vanilla DEQ (`deq.DEQ`) | $0$ | none | none |
| Skip DEQ (`deq.SkipDEQ`) | $g_\phi(x)$, a small explicit network | $\phi$ | $\lambda_\text{skip}\,\lVert z^\star - g_\phi(x)\rVert_1$ |
| Skip Reg. DEQ (`deq.SkipRegDEQ`) | $f(0, x)$, one application of $f$ | none | $\lambda_\text{skip}\,\lVert z^\star - f(0, x)\rVert_1$ |

`deq.skip_loss(info)` is that extra loss (mean absolute error, $\lambda_\text{skip}=0.01$).

This notebook trains the three variants of the paper's MNIST-dense model (embedding →
DEQ on 128 numbers with $f(z, x) = \mathrm{relu}(W_1 z) + \mathrm{relu}(W_2 x)$ → linear
head) on the 8×8 digits with the continuous solver, using the library's own training
loop `imex_deq.experiments.train`, and compares learning curves, NFE and wall time.
The runs are short (4 epochs of 11 batches) so the notebook stays quick; the absolute
numbers are not the paper's MNIST numbers.
"""),
        code(SETUP),
        code(RESULT_HELPER),
        md(r"""
## Train the three variants

`train(config, data)` runs one configuration and returns a summary; with `out_dir` it
also writes a JSON-lines log (one record per training step, plus evaluation records) and
a checkpoint. Compile time is measured apart from training time.
"""),
        code('''\
import json
import tempfile
from pathlib import Path

from imex_deq.experiments import TrainConfig, train

data = load_digits()
runs = Path(tempfile.mkdtemp(prefix="imex-deq-skip-"))
NAMES = {"vanilla": "Vanilla DEQ", "skip": "Skip DEQ", "skip-reg": "Skip Reg. DEQ"}
configs = {
    variant: TrainConfig(model=variant, solver="continuous", dataset="digits", epochs=4,
                         batch_size=128, evals_per_epoch=2, timing_batches=3,
                         progress=False, out_dir=str(runs / variant))
    for variant in NAMES
}
summaries = {}
for variant, config in configs.items():
    start = time.perf_counter()
    summaries[variant] = train(config, data)
    print(f"{NAMES[variant]:14s} {time.perf_counter() - start:5.1f} s wall "
          f"(compile {summaries[variant]['compile_time_s']:.1f} s), "
          f"test accuracy {summaries[variant]['test_accuracy']:.3f}, "
          f"test NFE {summaries[variant]['test_nfe']:.1f}")


def read_log(variant):
    records = [json.loads(line) for line in (runs / variant / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("type") != "eval"]
    evals = [r for r in records if r.get("type") == "eval"]
    return steps, evals


logs = {variant: read_log(variant) for variant in NAMES}'''),
        md(r"""
## Training curves and NFE per batch

The log's `ce` is the cross-entropy alone (the Skip variants also pay the small skip
loss, so their total loss is not comparable). `nfe` is the mean forward NFE over the
batch's samples.
"""),
        code('''\
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for i, (variant, (steps, evals)) in enumerate(logs.items()):
    style = dict(color=f"C{i}", label=NAMES[variant])
    axes[0].plot([r["step"] for r in steps], [r["ce"] for r in steps], **style)
    axes[1].plot([r["step"] for r in steps], [r["nfe"] for r in steps], **style)
    axes[2].plot([r["step"] for r in evals], [100 * r["test_accuracy"] for r in evals],
                 marker="o", **style)
axes[0].set(title="Training loss", xlabel="training step (batch of 128)",
            ylabel="cross-entropy (nats)")
axes[1].set(title="Forward NFE per batch (continuous solver)",
            xlabel="training step (batch of 128)", ylabel="NFE per sample (evaluations of f)")
axes[2].set(title="Test accuracy", xlabel="training step (batch of 128)",
            ylabel="test accuracy (%)")
for ax in axes:
    ax.legend()
fig.tight_layout()
plt.show()'''),
        md(r"""
## Wall time side by side

From each run's summary: total training time (compile excluded) and the per-batch
medians of the forward pass (solve + loss), the backward pass (adjoint) and prediction,
timed after compilation. On a shared CPU these numbers are noisy; compare them
relative to each other, not to the paper's GPU timings.
"""),
        code('''\
columns = {"train_time_s": "training (s, 44 steps)", "forward_s": "forward (s/batch)",
           "backward_s": "backward (s/batch)", "predict_s": "predict (s/batch)"}
print(f"{'model':14s} {'acc %':>6s} {'test NFE':>8s} " + " ".join(f"{c:>22s}" for c in columns.values()))
for variant, s in summaries.items():
    print(f"{NAMES[variant]:14s} {100 * s['test_accuracy']:6.1f} {s['test_nfe']:8.1f} "
          + " ".join(f"{s[key]:22.4f}" for key in columns))

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
positions = np.arange(len(NAMES))
axes[0].bar(positions, [summaries[v]["train_time_s"] for v in NAMES],
            color=[f"C{i}" for i in range(len(NAMES))], label="training, compile excluded")
axes[0].set(title="Training wall time (4 epochs)", ylabel="time (s)", xticks=positions,
            xticklabels=list(NAMES.values()))
axes[0].legend()
width = 0.25
for j, key in enumerate(("forward_s", "backward_s", "predict_s")):
    axes[1].bar(positions + (j - 1) * width, [1e3 * summaries[v][key] for v in NAMES], width,
                label=key.removesuffix("_s"))
axes[1].set(title="Per-batch cost (batch of 128, median)", ylabel="time (ms per batch)",
            xticks=positions, xticklabels=list(NAMES.values()))
axes[1].legend()
fig.tight_layout()
plt.show()'''),
        md(r"""
## The explicit prediction $z_0$ vs the corrected equilibrium $z^\star$

Each run saved a checkpoint holding `(model, optimizer_state)`. `load_checkpoint` needs a
template of the same structure; `eqx.filter_eval_shape` builds one without allocating
anything, from the same public builder the training loop used.
"""),
        code('''\
from imex_deq.experiments import build_dense_model, load_checkpoint, make_solver


def template(config):
    model = build_dense_model(config.model, make_solver(config.solver, config.rtol),
                              in_features=64, num_classes=10,
                              key=jax.random.PRNGKey(config.seed), max_steps=config.max_steps)
    opt_state = optax.adam(config.learning_rate).init(eqx.filter(model, eqx.is_inexact_array))
    return model, opt_state


models = {}
for variant, config in configs.items():
    (models[variant], _), meta = load_checkpoint(
        runs / variant / "checkpoint.eqx", eqx.filter_eval_shape(template, config))
    print(NAMES[variant], "restored at step", meta["global_step"])


@eqx.filter_jit
def explicit_and_implicit(model, images):
    """Logits from the explicit guess head(z0) and from the equilibrium head(z*)."""
    logits, info, _ = jax.vmap(model.forward)(images)
    return jax.vmap(model.head)(info.z0), logits, info


x_test, y_test = jnp.asarray(data.x_test), data.y_test
print(f"\\n{'model':14s} {'acc head(z0)':>12s} {'acc head(z*)':>12s} "
      f"{'||z*-z0||/||z*||':>17s} {'NFE':>6s}")
outputs = {}
for variant, model in models.items():
    explicit, implicit, info = outputs[variant] = explicit_and_implicit(model, x_test)
    gap = jnp.linalg.norm(info.z_star - info.z0, axis=-1) / jnp.linalg.norm(info.z_star, axis=-1)
    print(f"{NAMES[variant]:14s} {np.mean(np.argmax(explicit, -1) == y_test):12.3f} "
          f"{np.mean(np.argmax(implicit, -1) == y_test):12.3f} {float(gap.mean()):17.3f} "
          f"{float(info.nfe.mean()):6.1f}  {result_counts(info.result)}")'''),
        md(r"""
For a Vanilla DEQ $z_0 = 0$, so the gap is 1 and the head applied to $z_0$ is a constant
guess. The two Skip variants' explicit guesses are already close to $z^\star$. The picture
shows three test digits: the 128-number state drawn as an 8×16 image, first the explicit
prediction $z_0$, then the equilibrium $z^\star$ the solver corrected it to, and the class
probabilities each would give.
"""),
        code('''\
picks = [0, 1, 2]
fig, axes = plt.subplots(len(picks), 6, figsize=(15, 2.6 * len(picks)),
                         gridspec_kw={"width_ratios": [0.8, 1.6, 1.6, 1.6, 1.6, 2.2]})
for row, i in enumerate(picks):
    axes[row, 0].imshow(data.x_test[i, :, :, 0], cmap="gray_r")
    axes[row, 0].set(title=f"input (label {y_test[i]})", xticks=[], yticks=[])
    axes[row, 0].grid(False)
    col = 1
    for variant in ("skip", "skip-reg"):
        _, _, info = outputs[variant]
        vmax = float(jnp.max(jnp.abs(info.z_star[i])))
        for which, z in (("z0", info.z0[i]), ("z*", info.z_star[i])):
            ax = axes[row, col]
            im = ax.imshow(np.asarray(z).reshape(8, 16), cmap="viridis", vmin=0, vmax=vmax)
            ax.set(title=f"{NAMES[variant]}: {which}", xticks=[], yticks=[],
                   xlabel="state unit (8x16 grid)")
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.046, label="activation (a.u.)")
            col += 1
    ax = axes[row, 5]
    explicit, implicit, _ = outputs["skip-reg"]
    ax.bar(np.arange(10) - 0.2, jax.nn.softmax(explicit[i]), 0.4, label="head(z0)")
    ax.bar(np.arange(10) + 0.2, jax.nn.softmax(implicit[i]), 0.4, label="head(z*)")
    ax.set(title="Skip Reg. DEQ class probabilities", xlabel="digit class",
           ylabel="probability", xticks=range(10), ylim=(0, 1))
    ax.legend(fontsize=8)
fig.suptitle("Explicit prediction z0 vs corrected equilibrium z* (ReLU states are >= 0)")
fig.tight_layout()
plt.show()'''),
        md(r"""
Things to notice:

- The Skip variants reach similar accuracy to the vanilla DEQ while their solves start
  nearer the answer; on this small, briefly trained model the NFE saving is modest. The
  paper reports larger savings on full MNIST after longer training, where the skip loss
  has had time to pull $z_0$ onto $z^\star$.
- Skip Reg. DEQ gets its guess for free ($f(0, x)$ is one evaluation of $f$, no extra
  parameters); Skip DEQ trains a separate predictor.
- The equilibrium is what the classifier uses; $z_0$ only decides where the solver starts.
"""),
        code(FOOTER),
    ]


# --------------------------------------------------------------------------------------
# 03 continuous DEQ vs neural ODE
# --------------------------------------------------------------------------------------


def continuous_vs_neural_ode():
    return [
        md(r"""
# 03 · Continuous DEQ vs neural ODE

The paper's second idea: a DEQ's fixed point is the **steady state of an ODE**. If
$z^\star = f(z^\star, x)$ then $z^\star$ is where

$$\frac{\mathrm{d}z}{\mathrm{d}t} = f(z, x) - z$$

stops moving, so a DEQ can be solved by integrating this ODE "to $t = \infty$" and stopping
when $\lVert f(z) - z\rVert$ is small: an **infinite-time neural ODE**, or *continuous DEQ*.
In imex-deq that is the `SteadyStateODE` solver.

A **neural ODE** with the same $f$ integrates $\mathrm{d}z/\mathrm{d}t = f(z, x)$ over a
fixed horizon $[0, t_1]$ and uses $z(t_1)$; `deq.NeuralODE` is that baseline.

Their forward passes look alike (an adaptive ODE solve), but their backward passes do not:
the continuous DEQ differentiates **only the end point** with the implicit function theorem,
while the neural ODE must backpropagate through (or re-solve) the whole trajectory.
"""),
        code(SETUP),
        md(r"""
## One $f$ for both

$f(z, x) = \tanh(W_z z + W_x x + b)$ on a 32-number state, with $x$ the 64 pixels of a
digit. $W_z$ is rescaled to spectral norm 0.9, so $f$ is a contraction with a unique fixed
point, approached slowly enough that the trajectory is worth looking at.
"""),
        code('''\
import diffrax as dfx

WIDTH = 32
data = load_digits()
x_test = jnp.asarray(data.x_test.reshape(data.num_test, -1))


class Cell(eqx.Module):
    w_z: jax.Array
    w_x: eqx.nn.Linear

    def __init__(self, key):
        kz, kx = jax.random.split(key)
        w = jax.random.normal(kz, (WIDTH, WIDTH))
        self.w_z = 0.9 * w / jnp.linalg.norm(w, ord=2)  # spectral norm 0.9
        self.w_x = eqx.nn.Linear(64, WIDTH, key=kx)

    def __call__(self, z, x):
        return jnp.tanh(self.w_z @ z + self.w_x(x))


f = Cell(jax.random.PRNGKey(0))
x0 = x_test[0]
z0 = jnp.zeros(WIDTH)'''),
        md(r"""
## The trajectory $z(t)$

We integrate both vector fields with diffrax directly, saving on a grid of times
(`SaveAt(ts=...)`), and plot a few components of $z(t)$ and the relative residual
$\lVert f(z) - z\rVert / \lVert f(z)\rVert$ along the way.
"""),
        code('''\
ts = jnp.linspace(0.0, 12.0, 241)


@jax.jit
def trajectory(x, ts):
    relax = dfx.diffeqsolve(  # continuous DEQ: dz/dt = f(z, x) - z
        dfx.ODETerm(lambda t, z, x: f(z, x) - z), dfx.Tsit5(), t0=0.0, t1=ts[-1], dt0=0.1,
        y0=z0, args=x, saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5))
    node = dfx.diffeqsolve(  # neural ODE: dz/dt = f(z, x)
        dfx.ODETerm(lambda t, z, x: f(z, x)), dfx.Tsit5(), t0=0.0, t1=ts[-1], dt0=0.1,
        y0=z0, args=x, saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5))
    residual = jax.vmap(lambda z: deq.residual_norm(f(z, x), z, "rel"))(relax.ys)
    return relax.ys, node.ys, residual


z_relax, z_node, residual = trajectory(x0, ts)
sol = deq.fixed_point(f, deq.SteadyStateODE(rtol=1e-3), z0, x0, max_steps=100)
t_stop = float(ts[np.argmax(np.asarray(residual) <= 1e-3)])
print(f"SteadyStateODE(rtol=1e-3): NFE {int(sol.nfe)}, {int(sol.num_steps)} ODE steps, "
      f"residual {float(sol.residual):.1e}")
print(f"on the dense trajectory the residual first drops below 1e-3 at t = {t_stop:.2f}")'''),
        code('''\
units = [0, 1, 2, 3, 4]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for k, u in enumerate(units):
    axes[0].plot(ts, z_relax[:, u], color=f"C{k}", label=f"z[{u}](t)")
    axes[0].axhline(float(sol.value[u]), color=f"C{k}", ls=":", lw=1)
axes[0].axvline(t_stop, color="k", ls="--", lw=1, label="residual < 1e-3")
axes[0].set(title="Continuous DEQ: dz/dt = f(z, x) - z", xlabel="time t (ODE time, a.u.)",
            ylabel="state component (a.u.)")
axes[0].legend(fontsize=8, title="dotted: z* from fixed_point", title_fontsize=8)

axes[1].semilogy(ts, residual, label="||f(z)-z|| / ||f(z)||")
axes[1].axhline(1e-3, color="k", ls="--", lw=1, label="rtol = 1e-3")
axes[1].axvline(t_stop, color="k", ls=":", lw=1, label=f"steady state, t = {t_stop:.1f}")
axes[1].set(title="Residual along the trajectory", xlabel="time t (ODE time, a.u.)",
            ylabel="relative residual (unitless)")
axes[1].legend(fontsize=8)

for k, u in enumerate(units):
    axes[2].plot(ts, z_node[:, u], color=f"C{k}", label=f"z[{u}](t)")
axes[2].axvline(1.0, color="k", ls="--", lw=1, label="t1 = 1: output z(1)")
axes[2].set(title="Neural ODE: dz/dt = f(z, x)", xlabel="time t (ODE time, a.u.)",
            ylabel="state component (a.u.)")
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()'''),
        md(r"""
The continuous DEQ's components level off at the fixed point found by `fixed_point`
(dotted lines): the trajectory *is* a way to find $z^\star$, and where it is stopped does
not matter once it is at steady state. The neural ODE's $f$ never vanishes, so its state
keeps drifting; its output is whatever $z(1)$ happens to be, and the whole path to it is
part of the model.

## Forward and backward cost

Three ways to train with the same $f$ on a batch of 128 digits (a linear head and
cross-entropy on top):

1. continuous DEQ, `SteadyStateODE` + `ImplicitAdjoint` (the steady-state adjoint);
2. continuous DEQ, `SteadyStateODE` + `UnrolledAdjoint` (backpropagate through the ODE
   solver's steps, as one would for a neural ODE);
3. `NeuralODE(f, t1=1)` with diffrax's `RecursiveCheckpointAdjoint`.

Forward NFE comes from `info.nfe`. Backward NFE comes from the gradient of
`backward_counter`, a scalar zero whose gradient the library sets to the number of
vector–Jacobian products the backward pass spent. Times are medians of a few calls after
compilation.
"""),
        code('''\
import statistics

state = jax.ShapeDtypeStruct((WIDTH,), jnp.float32)
head = eqx.nn.Linear(WIDTH, 10, key=jax.random.PRNGKey(1))
layers = {
    "continuous DEQ, implicit adjoint": deq.DEQ(
        f, deq.SteadyStateODE(rtol=1e-3), state_shape=state, max_steps=100),
    "continuous DEQ, unrolled adjoint": deq.DEQ(
        f, deq.SteadyStateODE(rtol=1e-3), adjoint=deq.UnrolledAdjoint(), state_shape=state,
        max_steps=100),
    "neural ODE (t1 = 1)": deq.NeuralODE(f, t1=1.0, rtol=1e-3, atol=1e-3, state_shape=state),
}
xb, yb = x_test[:128], jnp.asarray(data.y_test[:128])


def loss_fn(layer_and_counter, x, y):
    layer, counter = layer_and_counter
    z, info = jax.vmap(lambda xi: layer(xi, backward_counter=counter))(x)
    logits = jax.vmap(head)(z)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), info


forward = eqx.filter_jit(loss_fn)
gradient = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))


def median_seconds(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


costs = {}
for name, layer in layers.items():
    args = ((layer, jnp.zeros(())), xb, yb)
    (_, info), (_, counter_grad) = gradient(*args)
    t_forward = median_seconds(forward, *args)
    t_total = median_seconds(gradient, *args)
    costs[name] = dict(forward_nfe=float(info.nfe.mean()), backward_nfe=float(counter_grad) / 128,
                       forward_ms=1e3 * t_forward, backward_ms=1e3 * max(t_total - t_forward, 0))
    print(f"{name:34s} forward NFE {costs[name]['forward_nfe']:6.1f}  "
          f"backward NFE {costs[name]['backward_nfe']:6.1f}  "
          f"forward {costs[name]['forward_ms']:7.1f} ms  backward {costs[name]['backward_ms']:7.1f} ms")'''),
        code('''\
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
names = list(costs)
positions = np.arange(len(names))
labels = [n.replace(", ", ",\\n") for n in names]
for ax, (suffix, unit, title) in zip(
        axes, (("nfe", "evaluations of f (or VJPs) per sample", "Function evaluations"),
               ("ms", "time (ms per batch of 128)", "Wall time"))):
    ax.bar(positions - 0.2, [costs[n][f"forward_{suffix}"] for n in names], 0.4, label="forward")
    ax.bar(positions + 0.2, [costs[n][f"backward_{suffix}"] for n in names], 0.4, label="backward")
    ax.set(title=f"{title}: forward vs backward", ylabel=unit, xticks=positions)
    ax.set_xticklabels(labels, fontsize=9)
    ax.legend()
fig.tight_layout()
plt.show()'''),
        md(r"""
## Why the steady-state adjoint is cheaper

At the fixed point $z^\star = f(z^\star, x; \theta)$ the implicit function theorem gives

$$\frac{\partial z^\star}{\partial \theta}
  = \Big(I - \frac{\partial f}{\partial z}\Big|_{z^\star}\Big)^{-1}
    \frac{\partial f}{\partial \theta}\Big|_{z^\star},$$

so for a loss $L(z^\star)$ the backward pass solves one linear system

$$\Big(I - \frac{\partial f}{\partial z}\Big)^{\!\top}\lambda = \frac{\partial L}{\partial z^\star},
\qquad \frac{\mathrm{d}L}{\mathrm{d}\theta} = \lambda^{\top}\frac{\partial f}{\partial \theta},$$

with vector–Jacobian products at $z^\star$ only (GMRES in `ImplicitAdjoint`). This is the
steady-state adjoint: it does not care how the forward solve got to $z^\star$, so

- its cost is set by the conditioning of $I - \partial f/\partial z$, **not** by how many
  ODE steps the forward pass took;
- it stores nothing but $z^\star$: memory is constant in the number of steps;
- the forward solve can be stopped as soon as the residual is small, or started from a good
  guess (Skip DEQ), without changing the backward pass.

Backpropagating through the solver (the unrolled adjoint, or a neural ODE with
`RecursiveCheckpointAdjoint`) instead replays every step: one VJP per forward evaluation,
memory that grows with the number of steps (checkpointing trades it for recomputation),
and a cost tied to the forward NFE. The neural ODE is also stuck with its trajectory:
$z(t_1)$ depends on every step, so there is no shortcut.

In the measurements above the implicit backward pass costs a fixed number of VJPs (an
upper bound from GMRES's restart settings), while the unrolled and neural-ODE backward
passes cost as many VJPs as their forward passes took evaluations.
"""),
        code(FOOTER),
    ]


NOTEBOOK_BUILDERS = {
    "01_quickstart.ipynb": quickstart,
    "02_skip_deq.ipynb": skip_deq,
    "03_continuous_vs_neural_ode.ipynb": continuous_vs_neural_ode,
}


def write(name: str, cells) -> Path:
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives no spurious diff
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    path = NOTEBOOKS / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path


def main():
    NOTEBOOKS.mkdir(exist_ok=True)
    for name, builder in NOTEBOOK_BUILDERS.items():
        print("wrote", write(name, builder()).relative_to(ROOT))


if __name__ == "__main__":
    main()
