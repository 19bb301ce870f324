# %% [markdown]
# # 04 · Custom models: your own $f$, PyTree states, adjoints, checkpoints
#
# Everything in imex-deq accepts any $f(z, x) \to z$ written in JAX: a function or an
# Equinox module, on any PyTree state. This notebook builds, on the 8×8 digits:
#
# 1. a small **convolutional** $f$ on image-shaped states;
# 2. a **two-resolution PyTree state** `(z_fine, z_coarse)`;
# 3. a comparison of **adjoints** on it (gradient accuracy against cost);
# 4. a classifier with the DEQ **inside a bigger Equinox model**, trained with optax, with
#    **Jacobian regularisation**, **fixed-depth pretraining** (`with_fixed_depth`) and
#    **checkpointing and resuming** (`save_checkpoint` / `load_checkpoint`).

# %%
import tempfile
import time
import warnings
from pathlib import Path

# imex_deq.experiments shows progress bars with tqdm, which warns in Jupyter without ipywidgets.
warnings.filterwarnings("ignore", message="IProgress not found")

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import matplotlib.pyplot as plt
import numpy as np
import optax

import imex_deq as deq
from imex_deq.data import iterate_batches, load_digits
from imex_deq.experiments import load_checkpoint, save_checkpoint

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
print("JAX", jax.__version__, "on", jax.devices()[0].platform)

# %%
data = load_digits()
# The layers below work on one sample, channels first: (1, 8, 8).
images_train = jnp.moveaxis(jnp.asarray(data.x_train), -1, 1)
images_test = jnp.moveaxis(jnp.asarray(data.x_test), -1, 1)
y_train, y_test = jnp.asarray(data.y_train), jnp.asarray(data.y_test)
print(images_train.shape, images_test.shape)


def converged_percent(info):
    return 100 * float(jnp.mean(info.result == deq.RESULTS.successful))


# %% [markdown]
# ## 1. A convolutional $f$
#
# Any Equinox module with `__call__(z, x)` works. Here $z$ has 8 channels on the 8×8 grid,
# and the image $x$ enters through a convolution of its own. The state's shape differs from
# $x$'s, so `state_shape` tells the layer what it is.
#
# The convolution acting on $z$ starts at half the usual scale, so that $f$ starts out as a
# contraction and the first solves converge. (At Equinox's default scale this $f$ is not a
# contraction, and training would begin with unconverged solves; notebook 05 shows what
# that looks like.)

# %%
C = 8


def shrink(conv, factor=0.5):
    """The same convolution with its weights scaled by `factor`."""
    return eqx.tree_at(lambda c: c.weight, conv, factor * conv.weight)


class ConvCell(eqx.Module):
    conv_z: eqx.nn.Conv2d
    conv_x: eqx.nn.Conv2d

    def __init__(self, key):
        kz, kx = jax.random.split(key)
        self.conv_z = shrink(eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=kz))
        self.conv_x = eqx.nn.Conv2d(1, C, 3, padding=1, key=kx)

    def __call__(self, z, x):
        return jnp.tanh(self.conv_z(z) + self.conv_x(x))


@eqx.filter_jit
def solve_batch(layer, x):
    return jax.vmap(layer)(x)


conv_layer = deq.DEQ(
    ConvCell(jax.random.PRNGKey(0)),
    deq.Anderson(rtol=1e-3),
    state_shape=jax.ShapeDtypeStruct((C, 8, 8), jnp.float32),
    max_steps=30,
)
z_star, info = solve_batch(conv_layer, images_test[:4])
print("z* shape", z_star.shape, "| NFE", info.nfe, "| residual", info.residual)

# %% [markdown]
# ## 2. A PyTree state
#
# The state can be any PyTree of arrays: here a tuple of a fine (8×8) and a coarse (4×4)
# resolution that exchange information, as in multiscale DEQs. $f$ must return the same
# structure, shapes and dtypes; the library checks this when it traces $f$ and names any
# mismatch. Solvers work on the flattened state internally, and residuals are norms over
# all leaves together.


# %%
class TwoScaleCell(eqx.Module):
    fine: eqx.nn.Conv2d
    coarse: eqx.nn.Conv2d
    down: eqx.nn.Conv2d
    up: eqx.nn.Conv2d
    inject: eqx.nn.Conv2d

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.fine = shrink(eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=k[0]))
        self.coarse = shrink(eqx.nn.Conv2d(C, C, 3, padding=1, use_bias=False, key=k[1]))
        self.down = shrink(eqx.nn.Conv2d(C, C, 3, stride=2, padding=1, use_bias=False, key=k[2]))
        self.up = shrink(eqx.nn.Conv2d(C, C, 1, use_bias=False, key=k[3]))
        self.inject = eqx.nn.Conv2d(C, C, 3, padding=1, key=k[4])

    def __call__(self, z, x):
        z_fine, z_coarse = z  # (C, 8, 8) and (C, 4, 4)
        upsampled = jnp.repeat(jnp.repeat(self.up(z_coarse), 2, axis=1), 2, axis=2)
        new_fine = jnp.tanh(self.fine(z_fine) + upsampled + self.inject(x))
        new_coarse = jnp.tanh(self.coarse(z_coarse) + self.down(z_fine))
        return new_fine, new_coarse


TWO_SCALE_STATE = (
    jax.ShapeDtypeStruct((C, 8, 8), jnp.float32),
    jax.ShapeDtypeStruct((C, 4, 4), jnp.float32),
)
stem = eqx.nn.Conv2d(1, C, 3, padding=1, key=jax.random.PRNGKey(1))  # image -> injection x
cell = TwoScaleCell(jax.random.PRNGKey(2))
x_batch = jax.vmap(stem)(images_train[:32])
labels_batch = y_train[:32]

two_scale = deq.DEQ(cell, deq.Anderson(rtol=1e-3), state_shape=TWO_SCALE_STATE, max_steps=30)
(z_fine, z_coarse), info = solve_batch(two_scale, x_batch)
print(
    "fine",
    z_fine.shape,
    "coarse",
    z_coarse.shape,
    f"| mean NFE {float(info.nfe.mean()):.1f} | converged {converged_percent(info):.0f}%",
)

# %% [markdown]
# ## 3. Choosing the solver and the adjoint
#
# The **solver** finds $z^\star$ in the forward pass; the **adjoint** decides how gradients
# flow back. Both are plain arguments of the layer:
#
# | adjoint | gradient | backward cost | memory |
# |---|---|---|---|
# | `ImplicitAdjoint()` (default) | exact up to a GMRES tolerance | up to a few dozen VJPs at $z^\star$ | constant |
# | `ImplicitAdjoint(linear_solver=deq.Anderson(...))` | exact up to its tolerance | iterations × 1 VJP; no LAPACK | constant |
# | `PhantomAdjoint(steps=k, damp=d)` | inexact ("phantom", or Jacobian-free) | $k$ VJPs | constant |
# | `UnrolledAdjoint()` | backpropagation through every solver step | = forward NFE | grows with steps |
#
# Below, three adjoints differentiate the same loss (a linear read-out of the two-scale
# equilibrium, then cross-entropy) with respect to $f$'s parameters, and each gradient is
# compared with a tightly solved implicit gradient. The backward NFE is read from
# `backward_counter`. (`UnrolledAdjoint` is left out: differentiating through every
# Anderson step of this convolutional $f$ takes far longer to compile than the rest of the
# notebook takes to run.)

# %%
readout = eqx.nn.Linear(C * 8 * 8 + C * 4 * 4, 10, key=jax.random.PRNGKey(3))


def loss_and_counter(cell, counter, layer, x, y):
    layer = eqx.tree_at(lambda layer: layer.f, layer, cell)
    z, _ = jax.vmap(lambda xi: layer(xi, backward_counter=counter))(x)
    features = jnp.concatenate([z[0].reshape(len(x), -1), z[1].reshape(len(x), -1)], axis=1)
    logits = jax.vmap(readout)(features)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def grad_and_backward_nfe(layer, x, y):
    """d loss / d f's parameters, and the backward NFE per sample."""
    grads, counter_grad = eqx.filter_grad(lambda args: loss_and_counter(*args, layer, x, y))(
        (layer.f, jnp.zeros(()))
    )
    return grads, counter_grad / len(x)


def flat(tree):
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.concatenate([leaf.ravel() for leaf in leaves])


def with_adjoint(layer, adjoint):
    return eqx.tree_at(lambda layer: layer.adjoint, layer, adjoint)


tight = deq.ImplicitAdjoint(linear_solver=lx.GMRES(rtol=1e-6, atol=1e-7, restart=20, max_steps=10))
adjoints = {
    "Implicit (GMRES, default)": deq.ImplicitAdjoint(),
    "Implicit (Anderson)": deq.ImplicitAdjoint(linear_solver=deq.Anderson(rtol=1e-3)),
    "Phantom (5 steps, damp 0.5)": deq.PhantomAdjoint(steps=5, damp=0.5),
}
reference, _ = grad_and_backward_nfe(with_adjoint(two_scale, tight), x_batch, labels_batch)
reference = flat(reference)
comparison = {}
for name, adjoint in adjoints.items():
    layer = with_adjoint(two_scale, adjoint)
    grads, backward_nfe = grad_and_backward_nfe(layer, x_batch, labels_batch)  # compiles
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(grad_and_backward_nfe(layer, x_batch, labels_batch))
        times.append(time.perf_counter() - start)
    g = flat(grads)
    cosine = float(g @ reference / (jnp.linalg.norm(g) * jnp.linalg.norm(reference)))
    rel_err = float(jnp.linalg.norm(g - reference) / jnp.linalg.norm(reference))
    comparison[name] = dict(
        cosine=cosine,
        rel_err=rel_err,
        backward_nfe=float(backward_nfe),
        ms=1e3 * float(np.median(times)),
    )
    print(
        f"{name:28s} cos(g, g_ref) {cosine:7.4f}  rel. error {rel_err:7.4f}  "
        f"backward NFE {float(backward_nfe):6.1f}  step {comparison[name]['ms']:6.1f} ms"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
names = list(comparison)
positions = np.arange(len(names))
short = [n.replace(" (", "\n(") for n in names]
errors = [max(comparison[n]["rel_err"], 1e-7) for n in names]  # log scale: floor at 1e-7
bars = axes[0].bar(positions, errors, color="C3", label="||g - g_ref|| / ||g_ref||")
axes[0].bar_label(bars, labels=[f"{e:.1e}" for e in errors], fontsize=8)
axes[0].set(
    title="Gradient error vs a tightly solved implicit gradient",
    yscale="log",
    ylabel="relative error (unitless, log scale)",
    ylim=(1e-7, 1),
    xticks=positions,
)
axes[0].set_xticklabels(short, fontsize=8)
axes[0].legend()
bars = axes[1].bar(
    positions,
    [comparison[n]["backward_nfe"] for n in names],
    color="C0",
    label="VJPs of f per sample",
)
axes[1].bar_label(bars, fmt="%.1f", fontsize=8)
axes[1].set(title="Backward cost", ylabel="backward NFE (VJPs per sample)", xticks=positions)
axes[1].set_xticklabels(short, fontsize=8)
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Rules of thumb (the FAQ in the docs has more):
#
# - `ImplicitAdjoint()` is the default and the one to start from.
# - `PhantomAdjoint` is the cheapest and often good enough for training, but its gradient
#   is biased: check that the loss still goes down.
# - `UnrolledAdjoint` is exact *for the truncated solver*, not for $z^\star$, and its memory
#   grows with the steps; use it in tests and for short fixed-depth pretraining.
# - The solver is independent of the adjoint. `Anderson` and `Broyden` are good defaults,
#   `SteadyStateODE` is the continuous DEQ (notebook 03), `NewtonKrylov` suits stiff
#   problems, and `FixedPointIteration` is enough when $f$ is a strong contraction.
#
# ## 4. A DEQ inside a bigger model, trained with optax
#
# A stem convolution, the two-scale DEQ and a linear head over both resolutions make an
# ordinary Equinox module. The training step adds Jacobian regularisation to the
# cross-entropy: `layer.jacobian_regularisation` is a one-sample Hutchinson estimate of
# $\lVert\partial f/\partial z\rVert_F^2 / d$ at $z^\star$.


# %%
class DigitsModel(eqx.Module):
    stem: eqx.nn.Conv2d
    layer: deq.DEQ
    head: eqx.nn.Linear

    def __init__(self, key):
        k_stem, k_cell, k_head = jax.random.split(key, 3)
        self.stem = eqx.nn.Conv2d(1, C, 3, padding=1, key=k_stem)
        self.layer = deq.DEQ(
            TwoScaleCell(k_cell),
            deq.Anderson(rtol=1e-3),
            state_shape=TWO_SCALE_STATE,
            max_steps=30,
        )
        self.head = eqx.nn.Linear(C * 8 * 8 + C * 4 * 4, 10, key=k_head)

    def __call__(self, image):
        x = self.stem(image)
        (z_fine, z_coarse), info = self.layer(x)
        logits = self.head(jnp.concatenate([z_fine.ravel(), z_coarse.ravel()]))
        return logits, info, x


JAC_WEIGHT = 0.5
optimizer = optax.adam(2e-3)


def init(key):
    model = DigitsModel(key)
    return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


@eqx.filter_jit
def train_step(model, opt_state, images, labels, key, depth=None):
    def loss_fn(model):
        if depth is not None:  # pretraining: apply f `depth` times, plain backprop
            model = deq.with_fixed_depth(model, depth)
        logits, info, x = jax.vmap(model)(images)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        keys = jax.random.split(key, len(images))
        jac = jax.vmap(lambda xi, inf, k: model.layer.jacobian_regularisation(xi, inf, key=k))(
            x, info, keys
        ).mean()
        return ce + JAC_WEIGHT * jac, (ce, jac, info.nfe.mean())

    (_, (ce, jac, nfe)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, dict(ce=ce, jac=jac, nfe=nfe)


@eqx.filter_jit
def evaluate(model, images, labels):
    logits, info, _ = jax.vmap(model)(images)
    return jnp.mean(jnp.argmax(logits, -1) == labels), info


# %% [markdown]
# ### Fixed-depth pretraining, then the real DEQ
#
# `with_fixed_depth(model, k)` returns the same model with every DEQ layer inside it
# switched to applying $f$ exactly $k$ times with plain backprop: the cheap warm-up that
# MDEQ uses. `with_fixed_depth(model, None)` switches back.
#
# The depth is a *static* field of the layer, so it is part of the model's PyTree
# structure. Switch it **inside** the loss, as `train_step` above does with its `depth`
# argument: the gradient then has the solving model's structure, and the optimizer state
# (Adam's moments, built from the solving model) fits both phases. Passing
# `with_fixed_depth(model, k)` itself to `optimizer.update` fails with a "different pytree
# metadata" error. Each phase compiles once.


# %%
def batches(epoch):
    return iterate_batches(np.asarray(images_train), np.asarray(y_train), 64, seed=0, epoch=epoch)


model, opt_state = init(jax.random.PRNGKey(0))
history, step = [], 0
PRETRAIN_STEPS, DEPTH = 15, 4
start = time.perf_counter()
for epoch in range(2):
    for xb, yb in batches(epoch):
        pretraining = step < PRETRAIN_STEPS
        model, opt_state, metrics = train_step(
            model, opt_state, xb, yb, jax.random.PRNGKey(step), DEPTH if pretraining else None
        )
        record = {k: float(v) for k, v in metrics.items()}
        history.append(record | {"step": step, "pretraining": pretraining})
        step += 1
accuracy, info = evaluate(model, images_test, y_test)
print(
    f"{step} steps in {time.perf_counter() - start:.1f} s (two compiles included); "
    f"test accuracy {float(accuracy):.3f}, mean NFE {float(info.nfe.mean()):.1f}, "
    f"converged {converged_percent(info):.0f}%"
)

# %% [markdown]
# ### Checkpointing and resuming
#
# `save_checkpoint(path, tree, meta)` atomically writes any PyTree (here
# `(model, opt_state)`) together with a JSON-serialisable dict. `load_checkpoint(path,
# template)` needs a template of the same structure, which `eqx.filter_eval_shape(init,
# key)` builds without allocating anything. We check that *resuming from the checkpoint*
# gives exactly the same parameters as *never stopping*.

# %%
path = Path(tempfile.mkdtemp(prefix="imex-deq-ckpt-")) / "digits.eqx"
save_checkpoint(path, (model, opt_state), {"step": step, "epoch": 2})
print("saved", path.name, f"({path.stat().st_size / 1024:.0f} KiB)")


def more_steps(model, opt_state, first_step, epoch, n):
    for i, (xb, yb) in enumerate(batches(epoch)):
        if i == n:
            break
        key = jax.random.PRNGKey(first_step + i)
        model, opt_state, metrics = train_step(model, opt_state, xb, yb, key, None)
    return model, opt_state, metrics


# (a) keep going without stopping
continued, _, _ = more_steps(model, opt_state, step, 2, 10)
# (b) what a fresh process would do: rebuild the structure, load, resume
template = eqx.filter_eval_shape(init, jax.random.PRNGKey(0))
(restored_model, restored_opt), meta = load_checkpoint(path, template)
resumed, _, metrics = more_steps(restored_model, restored_opt, meta["step"], meta["epoch"], 10)
difference = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(continued, eqx.is_array)),
        jax.tree_util.tree_leaves(eqx.filter(resumed, eqx.is_array)),
    )
)
print("meta:", meta, "| max |continued - resumed| over all parameters:", difference)

# %%
steps = np.array([h["step"] for h in history])
pre = np.array([h["pretraining"] for h in history])
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
panels = (
    ("ce", "cross-entropy (nats)", "Training loss"),
    ("jac", "||df/dz||_F^2 / d (unitless)", "Jacobian regulariser at z*"),
    ("nfe", "NFE per sample (evaluations of f)", "Forward cost"),
)
for ax, (key, ylabel, title) in zip(axes, panels):
    values = np.array([h[key] for h in history])
    ax.plot(
        steps[pre], values[pre], "o-", ms=3, color="C1", label=f"fixed depth {DEPTH} (pretraining)"
    )
    ax.plot(steps[~pre], values[~pre], "o-", ms=3, color="C0", label="DEQ, Anderson solve")
    ax.set(title=title, xlabel="training step (batch of 64)", ylabel=ylabel)
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# During pretraining the "NFE" is the fixed depth; afterwards it is what Anderson needed to
# reach `rtol = 1e-3`. The Jacobian regulariser keeps $\partial f/\partial z$ small, which
# keeps $f$ well conditioned and the solves short (notebook 05 shows what happens without
# it).
