# %% [markdown]
# # 01 · Quickstart: a deep equilibrium model in ten lines
#
# A **deep equilibrium model (DEQ)** replaces a stack of layers by one layer $f$ applied
# "infinitely often". Its output is the **fixed point**
#
# $$z^\star = f(z^\star, x),$$
#
# which a root solver finds directly instead of running the layers one after another.
# Gradients come from the implicit function theorem at $z^\star$, so memory does not grow
# with the number of solver iterations.
#
# This notebook trains a tiny DEQ classifier on scikit-learn's bundled 8×8 digits (nothing
# is downloaded), then looks inside one solve: the fixed point, the number of function
# evaluations (**NFE**), the **residual** and the **result code**, and how fast each solver
# drives the residual down.

# %%
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import imex_deq as deq
from imex_deq.data import iterate_batches, load_digits

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
print("JAX", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## Data
#
# `load_digits` returns standardised images shaped `(N, 8, 8, 1)`. A dense model only needs
# the 64 pixel values, so we flatten them.

# %%
data = load_digits()
x_train = data.x_train.reshape(data.num_train, -1)
x_test = data.x_test.reshape(data.num_test, -1)
print(data)
print("train", x_train.shape, "test", x_test.shape)

# %% [markdown]
# ## The model
#
# The layer is $f(z, x) = \tanh(W_z z + W_x x + b)$ on a state $z$ of 32 numbers.
# `deq.DEQ` turns it into a layer that takes **one** sample and returns `(z_star, info)`;
# batches go through `jax.vmap`. The state (32 numbers) is not shaped like the input
# (64 numbers), so `state_shape` tells the layer what $z$ looks like.

# %%
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
model = Classifier(
    deq.DEQ(Cell(k_cell), deq.Anderson(rtol=1e-3), state_shape=state),
    eqx.nn.Linear(WIDTH, 10, key=k_head),
)

# %% [markdown]
# ## Training
#
# An ordinary Equinox + optax loop: nothing in it is specific to DEQs. The solve happens
# inside `jax.vmap(model)`, and the backward pass uses the default `ImplicitAdjoint`, which
# solves one linear system with $(I - \partial f/\partial z)^\top$ at $z^\star$ by GMRES.

# %%
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
print(f"{len(losses)} steps in {time.perf_counter() - start:.1f} s (the first step compiles)")

labels, info = predict(model, x_test)
print(
    f"test accuracy {np.mean(np.asarray(labels) == data.y_test):.3f}, "
    f"mean NFE {float(info.nfe.mean()):.1f}"
)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(losses, label="training batch")
ax1.set(title="Training loss", xlabel="training step (batch of 128)", ylabel="cross-entropy (nats)")
ax1.legend()
ax2.plot(nfes, color="C1", label="mean over the batch")
ax2.set(
    title="Forward NFE per sample (Anderson, rtol 1e-3)",
    xlabel="training step (batch of 128)",
    ylabel="NFE (evaluations of f)",
)
ax2.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What did the solve return?
#
# `info` is a `DEQInfo` for each sample (batched by `vmap`):
#
# - `z_star`: the equilibrium $z^\star$;
# - `nfe`: how many times $f$ was evaluated;
# - `steps`: solver iterations (Anderson evaluates $f$ once per step, so here
#   `nfe == steps`);
# - `residual`: $\lVert f(z) - z\rVert / \lVert f(z)\rVert$ at the last iterate
#   (`termination="rel"`, the default);
# - `result`: a `deq.RESULTS` code: `successful`, `nonlinear_max_steps_reached`,
#   `nonlinear_divergence` or `nonfinite` (notebook 05 provokes each of them).
#
# We can check the fixed point by hand: apply $f$ once more and measure how far $z$ moves.
# The reported residual belongs to the solver's last iterate $z_k$, whereas the returned
# value is $z^\star = f(z_k)$, which the last step computed anyway and which is one
# contraction step closer to the fixed point. So the number computed by hand is usually a
# little smaller than the reported one.

# %%
f = model.layer.f
x0 = jnp.asarray(x_test[0])
z_star, one = model.layer(x0)
fz = f(z_star, x0)
by_hand = float(jnp.linalg.norm(fz - z_star) / jnp.linalg.norm(fz))
print(f"NFE {int(one.nfe)}, steps {int(one.steps)}, reported residual {float(one.residual):.2e}")
print(f"||f(z*) - z*|| / ||f(z*)|| computed by hand: {by_hand:.2e}  (tolerance rtol = 1e-3)")
print("converged:", bool(one.result == deq.RESULTS.successful))
converged = int(jnp.sum(info.result == deq.RESULTS.successful))
print(f"converged solves over the test set: {converged} of {len(x_test)}")

# %% [markdown]
# ## Residual per iteration, for every solver
#
# Now we solve the same $f$ (the trained cell at one test image) with each solver and
# record the residual after every iteration. For the four discrete solvers
# `deq.residual_trace` does this: it runs a solver's own update rule with stopping switched
# off. The plot puts **NFE** on the horizontal axis because one Newton–Krylov step costs
# many evaluations of $f$ (a linearisation plus GMRES products) while a step of the others
# costs one.
#
# To make the comparison interesting we also solve a *harder* map with the **same fixed
# point**: the over-relaxed $f_\omega(z, x) = z + \omega\,(f(z, x) - z)$ with $\omega = 2.2$.
# Its Jacobian $I + \omega(\partial f/\partial z - I)$ has eigenvalues near
# $1 - \omega = -1.2$, outside the unit circle, so plain fixed-point iteration oscillates
# away from $z^\star$. The accelerated solvers build a model of the Jacobian and still
# converge.

# %%
OMEGA = 2.2


def f_hard(z, x):  # same fixed point as f, harder to find
    return z + OMEGA * (f(z, x) - z)


MAPS = {"trained f": f, f"over-relaxed f (ω = {OMEGA})": f_hard}
z0 = jnp.zeros(WIDTH)
discrete = {
    "FixedPointIteration": deq.FixedPointIteration(),
    "Anderson": deq.Anderson(),
    "Broyden": deq.Broyden(),
    "NewtonKrylov": deq.NewtonKrylov(),
}
traces = {
    label: {
        name: deq.residual_trace(fn, solver, z0, x0, steps=40) for name, solver in discrete.items()
    }
    for label, fn in MAPS.items()
}

# %% [markdown]
# `SteadyStateODE`, the continuous DEQ, has no step-by-step update rule: it integrates
# $\mathrm{d}z/\mathrm{d}t = f(z, x) - z$ with an adaptive Tsit5 solver. To record its
# residual at every accepted ODE step we integrate the same equation with diffrax and
# `SaveAt(steps=True)`, with the settings `SteadyStateODE` uses (initial step 1, PID control
# at `rtol / 5`). Steps become NFE by the count `SteadyStateODE` documents: 1
# first-same-as-last stage, then 6 new stages per step (the steady-state test reads the
# last stage, f(z) − z at the new point, so it costs nothing). The `fixed_point` calls
# further down confirm these counts.


# %%
def ode_trace(fn, x, z0, steps, ode_tol=2e-4):
    @jax.jit
    def run(x, z0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, z, x: fn(z, x) - z),
            dfx.Tsit5(),
            t0=0.0,
            t1=1e3,
            dt0=1.0,
            y0=z0,
            args=x,
            saveat=dfx.SaveAt(steps=True),
            stepsize_controller=dfx.PIDController(rtol=ode_tol, atol=ode_tol),
            max_steps=steps,
            throw=False,
        )
        residuals = jax.vmap(lambda z: deq.residual_norm(fn(z, x), z, "rel"))(sol.ys)
        return residuals, sol.stats["num_steps"]

    residuals, n = run(x, z0)
    residuals = np.asarray(residuals)[: int(n)]
    nfe = 1 + 6 * np.arange(1, len(residuals) + 1)
    return residuals, nfe


for label, fn in MAPS.items():
    traces[label]["SteadyStateODE"] = ode_trace(fn, x0, z0, 40)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (label, per_solver) in zip(axes, traces.items()):
    for name, (residuals, nfe) in per_solver.items():
        ax.semilogy(nfe, residuals, marker=".", label=name)
    ax.axhline(1e-3, color="k", ls="--", lw=1, label="rtol = 1e-3")
    ax.set(
        title=f"Residual vs cost: {label}",
        xlabel="NFE (evaluations of f)",
        ylabel="relative residual ||f(z)-z|| / ||f(z)|| (unitless)",
        xlim=(0, 200),
    )
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Reading the plot:
#
# - On the trained $f$ (a contraction) the three solvers that evaluate $f$ once per step
#   behave alike and cross the tolerance after about ten evaluations. The residual then
#   bottoms out near $10^{-7}$, the round-off of float32.
# - On the over-relaxed $f$ plain fixed-point iteration never gets below 1, while Anderson
#   and Broyden still converge in about a dozen evaluations.
# - Newton–Krylov pays about 20 evaluations per step. It has no line search, so from
#   $z_0 = 0$ it can wander for a few steps before its quadratic convergence sets in; it
#   pays off on large, stiff problems, not on this one.
# - The continuous solver (`SteadyStateODE`) needs the most evaluations, and its residual
#   levels off near the ODE's local error tolerance: it follows the trajectory $z(t)$
#   instead of jumping to $z^\star$ (notebook 03 looks at that trajectory).
#
# ## Calling a solver directly with `fixed_point`
#
# `deq.fixed_point(fn, solver, z0, args)` is the functional core under every layer. With
# `throw=False` (the default) a failed solve is reported in the result, not raised:

# %%
print("over-relaxed f, rtol = 1e-3, max_steps = 30")
for name, solver in {**discrete, "SteadyStateODE": deq.SteadyStateODE()}.items():
    sol = deq.fixed_point(f_hard, solver, z0, x0, max_steps=30, throw=False)
    verdict = "converged" if bool(sol.result == deq.RESULTS.successful) else "NOT converged"
    print(
        f"  {name:20s} NFE {int(sol.nfe):4d}  steps {int(sol.num_steps):3d}  "
        f"residual {float(sol.residual):.1e}  {verdict}"
    )

# %% [markdown]
# ## Next
#
# - `02_skip_deq.ipynb`: Skip DEQ and Skip Reg. DEQ, whose explicit initial guess makes
#   solves cheaper.
# - `03_continuous_vs_neural_ode.ipynb`: the continuous DEQ as an infinite-time neural ODE.
# - `04_custom_models.ipynb`: your own $f$, PyTree states, adjoints, checkpoints.
# - `05_failure_modes.ipynb`: what non-convergence looks like and what to do about it.
