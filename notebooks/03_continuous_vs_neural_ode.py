# %% [markdown]
# # 03 · Continuous DEQ vs neural ODE
#
# The paper's second idea: a DEQ's fixed point is the **steady state of an ODE**. If
# $z^\star = f(z^\star, x)$, then $z^\star$ is where
#
# $$\frac{\mathrm{d}z}{\mathrm{d}t} = f(z, x) - z$$
#
# stops moving. So a DEQ can be solved by integrating this ODE "to $t = \infty$" and
# stopping once $\lVert f(z) - z\rVert$ is small: an **infinite-time neural ODE**, or
# *continuous DEQ*. In imex-deq that is the `SteadyStateODE` solver.
#
# A **neural ODE** with the same $f$ integrates $\mathrm{d}z/\mathrm{d}t = f(z, x)$ over a
# fixed horizon $[0, t_1]$ and outputs $z(t_1)$; `deq.NeuralODE` is that baseline.
#
# The two forward passes look alike (an adaptive ODE solve each), but the backward passes
# do not: the continuous DEQ differentiates **only the end point**, with the implicit
# function theorem, while the neural ODE has to backpropagate through (or re-solve) its
# whole trajectory.

# %%
import statistics
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import imex_deq as deq
from imex_deq.data import load_digits

plt.rcParams.update({"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
print("JAX", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## One $f$ for both
#
# $f(z, x) = \tanh(W_z z + W_x x + b)$ on a state of 32 numbers, with $x$ the 64 pixels of
# a digit. $W_z$ is rescaled to spectral norm 0.9, so $f$ is a contraction with a unique
# fixed point, and one approached slowly enough for the trajectory to be worth a look.

# %%
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
z0 = jnp.zeros(WIDTH)

# %% [markdown]
# ## The trajectory $z(t)$
#
# We integrate both vector fields with diffrax directly, saving $z$ on a grid of times
# (`SaveAt(ts=...)`), and plot a few components of $z(t)$ together with the relative
# residual $\lVert f(z) - z\rVert / \lVert f(z)\rVert$ along the way.

# %%
ts = jnp.linspace(0.0, 12.0, 241)


def integrate(vector_field, x, ts):
    return dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        dfx.Tsit5(),
        t0=0.0,
        t1=ts[-1],
        dt0=0.1,
        y0=z0,
        args=x,
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
    ).ys


@jax.jit
def trajectories(x, ts):
    z_relax = integrate(lambda t, z, x: f(z, x) - z, x, ts)  # continuous DEQ
    z_node = integrate(lambda t, z, x: f(z, x), x, ts)  # neural ODE
    residual = jax.vmap(lambda z: deq.residual_norm(f(z, x), z, "rel"))(z_relax)
    return z_relax, z_node, residual


z_relax, z_node, residual = trajectories(x0, ts)
sol = deq.fixed_point(f, deq.SteadyStateODE(rtol=1e-3), z0, x0, max_steps=100)
t_stop = float(ts[np.argmax(np.asarray(residual) <= 1e-3)])
print(
    f"SteadyStateODE(rtol=1e-3): NFE {int(sol.nfe)}, {int(sol.num_steps)} ODE steps, "
    f"residual {float(sol.residual):.1e}"
)
print(f"on the dense trajectory the residual first drops below 1e-3 at t = {t_stop:.2f}")

# %%
units = [0, 1, 2, 3, 4]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for k, u in enumerate(units):
    axes[0].plot(ts, z_relax[:, u], color=f"C{k}", label=f"z[{u}](t)")
    axes[0].axhline(float(sol.value[u]), color=f"C{k}", ls=":", lw=1)
axes[0].axvline(t_stop, color="k", ls="--", lw=1, label="residual < 1e-3")
axes[0].set(
    title="Continuous DEQ: dz/dt = f(z, x) - z",
    xlabel="time t (ODE time, a.u.)",
    ylabel="state component (a.u.)",
)
axes[0].legend(fontsize=8, title="dotted: z* from fixed_point", title_fontsize=8)

axes[1].semilogy(ts, residual, label="||f(z)-z|| / ||f(z)||")
axes[1].axhline(1e-3, color="k", ls="--", lw=1, label="rtol = 1e-3")
axes[1].axvline(t_stop, color="k", ls=":", lw=1, label=f"steady state, t = {t_stop:.1f}")
axes[1].set(
    title="Residual along the trajectory",
    xlabel="time t (ODE time, a.u.)",
    ylabel="relative residual (unitless)",
)
axes[1].legend(fontsize=8)

for k, u in enumerate(units):
    axes[2].plot(ts, z_node[:, u], color=f"C{k}", label=f"z[{u}](t)")
axes[2].axvline(1.0, color="k", ls="--", lw=1, label="t1 = 1: output z(1)")
axes[2].set(
    title="Neural ODE: dz/dt = f(z, x)",
    xlabel="time t (ODE time, a.u.)",
    ylabel="state component (a.u.)",
)
axes[2].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The continuous DEQ's components level off at the fixed point that `fixed_point` found
# (dotted lines): the trajectory *is* a way to find $z^\star$, and once it has reached
# steady state it does not matter where it is stopped. The neural ODE's $f$ never
# vanishes, so its state keeps drifting; its output is wherever $z(1)$ happens to be, and
# the whole path there is part of the model.
#
# ## Forward and backward cost
#
# Three ways to train with the same $f$ on a batch of 128 digits, with a linear head and
# cross-entropy on top:
#
# 1. continuous DEQ, `SteadyStateODE` + `ImplicitAdjoint` (the steady-state adjoint);
# 2. continuous DEQ, `SteadyStateODE` + `UnrolledAdjoint` (backpropagation through the ODE
#    solver's steps, as one would do for a neural ODE);
# 3. `NeuralODE(f, t1=1)` with diffrax's `RecursiveCheckpointAdjoint`.
#
# The forward NFE comes from `info.nfe`. The backward NFE comes from the gradient with
# respect to `backward_counter`, a scalar zero whose gradient the library sets to the
# number of vector–Jacobian products the backward pass spent. Times are medians over a few
# calls after compilation.

# %%
state = jax.ShapeDtypeStruct((WIDTH,), jnp.float32)
head = eqx.nn.Linear(WIDTH, 10, key=jax.random.PRNGKey(1))
layers = {
    "continuous DEQ, implicit adjoint": deq.DEQ(
        f, deq.SteadyStateODE(rtol=1e-3), state_shape=state, max_steps=100
    ),
    "continuous DEQ, unrolled adjoint": deq.DEQ(
        f,
        deq.SteadyStateODE(rtol=1e-3),
        adjoint=deq.UnrolledAdjoint(),
        state_shape=state,
        max_steps=100,
    ),
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
    jax.block_until_ready(fn(*args))  # compile and warm up
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
    costs[name] = dict(
        forward_nfe=float(info.nfe.mean()),
        backward_nfe=float(counter_grad) / 128,
        forward_ms=1e3 * t_forward,
        backward_ms=1e3 * max(t_total - t_forward, 0),
    )
    c = costs[name]
    print(
        f"{name:34s} forward NFE {c['forward_nfe']:6.1f}  backward NFE {c['backward_nfe']:6.1f}  "
        f"forward {c['forward_ms']:7.1f} ms  backward {c['backward_ms']:7.1f} ms"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
names = list(costs)
positions = np.arange(len(names))
labels = [n.replace(", ", ",\n") for n in names]
panels = (
    ("nfe", "evaluations of f (or VJPs) per sample", "Function evaluations"),
    ("ms", "time (ms per batch of 128)", "Wall time"),
)
for ax, (suffix, unit, title) in zip(axes, panels):
    forward_values = [costs[n][f"forward_{suffix}"] for n in names]
    backward_values = [costs[n][f"backward_{suffix}"] for n in names]
    ax.bar(positions - 0.2, forward_values, 0.4, label="forward")
    ax.bar(positions + 0.2, backward_values, 0.4, label="backward")
    ax.set(title=f"{title}: forward vs backward", ylabel=unit, xticks=positions)
    ax.set_xticklabels(labels, fontsize=9)
    ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Why the steady-state adjoint is cheaper
#
# At the fixed point $z^\star = f(z^\star, x; \theta)$ the implicit function theorem gives
#
# $$\frac{\partial z^\star}{\partial \theta}
#   = \Big(I - \frac{\partial f}{\partial z}\Big|_{z^\star}\Big)^{-1}
#     \frac{\partial f}{\partial \theta}\Big|_{z^\star},$$
#
# so for a loss $L(z^\star)$ the backward pass solves one linear system,
#
# $$\Big(I - \frac{\partial f}{\partial z}\Big)^{\!\top}\lambda = \frac{\partial L}{\partial z^\star},
# \qquad \frac{\mathrm{d}L}{\mathrm{d}\theta} = \lambda^{\top}\frac{\partial f}{\partial \theta},$$
#
# using vector–Jacobian products at $z^\star$ only (by GMRES, in `ImplicitAdjoint`). This
# is the steady-state adjoint. It does not care how the forward solve reached $z^\star$,
# so
#
# - its cost is set by the conditioning of $I - \partial f/\partial z$, **not** by how many
#   ODE steps the forward pass took;
# - it stores nothing but $z^\star$: its memory does not grow with the number of steps;
# - the forward solve can stop as soon as the residual is small, or start from a good guess
#   (Skip DEQ), without any change to the backward pass.
#
# Backpropagating through the solver (the unrolled adjoint, or a neural ODE with
# `RecursiveCheckpointAdjoint`) replays every step instead: one VJP per forward
# evaluation, memory that grows with the number of steps (checkpointing trades it for
# recomputation), and a cost tied to the forward NFE. The neural ODE has no way around
# this: $z(t_1)$ depends on every step, so there is no shortcut.
#
# The measurements above show it. The implicit backward pass costs a fixed number of VJPs
# (an upper bound set by GMRES's restart settings), while the unrolled and neural-ODE
# backward passes cost as many VJPs as their forward passes took evaluations.
