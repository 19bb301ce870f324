"""Shared pieces of the benchmark scripts (`bench_solvers.py`, `bench_peers.py`) and of
`tests/test_bench_parity.py`.

The model is the paper's MNIST-dense DEQ:

    e  = relu(We x + be)                       embedding 784 -> d
    z* = f(z*, e),  f(z, e) = relu(W1 z) + relu(W2 e)   (no biases)
    logits = Wh z* + bh                        head d -> 10

Weights are built once in NumPy (PyTorch `nn.Linear` layout: weight is (out, in), y = W x + b)
and loaded into both JAX and PyTorch, so the two libraries solve the same problem.

Import order matters: call `configure_threads` before anything imports jax or torch.
JAX and PyTorch are imported lazily inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------
# Machine and threads
# ----------------------------------------------------------------------------------------


def configure_threads(threads: int | None) -> None:
    """Pin XLA (and this process) to `threads` threads. Must run before jax is imported.

    Sets XLA_FLAGS to "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=N"
    (the recipe from the JAX FAQ) and, since recent XLA CPU runtimes size their thread pool
    from the CPUs the process may use, also restricts the process's CPU affinity to N CPUs.
    """
    # PyTorch's OpenMP workers busy-wait between parallel regions by default. Interleaved with
    # XLA's threads in one process (or on a loaded machine) that spinning steals the cores:
    # a 2.6 ms step read 66 ms median on this 2-core box under load. Passive waiting fixes it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        return
    if "jax" in sys.modules:
        raise RuntimeError("configure_threads must run before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
    ).strip()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(threads: int | None) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shown = "default (all)" if threads is None else str(threads)
    try:
        load = f"load avg {os.getloadavg()[0]:.1f}"
    except OSError:
        load = "load avg ?"
    return (
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({cores} usable), "
        f"threads={shown}, {load} at start, {platform.system()} {platform.release()}, "
        f"python {platform.python_version()}"
    )


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# Weights, data, shared residual (NumPy)
# ----------------------------------------------------------------------------------------

PARAM_NAMES = ("we", "be", "w1", "w2", "wh", "bh")


def init_weights(
    seed: int = 0,
    d_in: int = 784,
    width: int = 128,
    classes: int = 10,
    spectral_norm: float | None = 0.9,
) -> dict[str, np.ndarray]:
    """float32 weights, PyTorch `nn.Linear` default init (U(±1/sqrt(fan_in))) and layout
    (weight (out, in)). W1 is rescaled to spectral norm `spectral_norm` (None: leave it),
    so f is a contraction with Lipschitz constant <= spectral_norm."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape)

    w = {
        "we": uniform((width, d_in), d_in),
        "be": uniform((width,), d_in),
        "w1": uniform((width, width), width),
        "w2": uniform((width, width), width),
        "wh": uniform((classes, width), width),
        "bh": uniform((classes,), width),
    }
    if spectral_norm is not None:
        w["w1"] = w["w1"] * (spectral_norm / np.linalg.norm(w["w1"], 2))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def make_batch(
    seed: int = 0, batch: int = 128, d_in: int = 784, classes: int = 10, source: str = "digits"
) -> tuple[np.ndarray, np.ndarray, str]:
    """`(x, y, description)`. `source="digits"`: scikit-learn's bundled 8x8 digits, each
    pixel repeated 3x3 (24x24) and zero-padded by 2 to MNIST's 28x28, scaled to [0, 1]
    (requires d_in = 784). `source="random"`: U[0, 1) pixels and random labels."""
    rng = np.random.default_rng(seed + 1)
    if source == "digits" and d_in == 784:
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = rng.permutation(len(digits.target))[:batch]
        if len(index) < batch:
            index = rng.choice(len(digits.target), batch, replace=True)
        images = digits.images[index] / 16.0
        images = np.kron(images, np.ones((1, 3, 3)))
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        x = images.reshape(batch, 784).astype(np.float32)
        y = digits.target[index].astype(np.int32) % classes
        return x, y, "sklearn digits 8x8 -> 3x3 pixel repeat -> pad to 28x28"
    x = rng.uniform(0.0, 1.0, size=(batch, d_in)).astype(np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int32)
    return x, y, "random U[0,1) inputs, random labels"


def np_embed(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float64) @ w["we"].T.astype(np.float64) + w["be"], 0.0)


def np_f(w: dict[str, np.ndarray], z: np.ndarray, e: np.ndarray) -> np.ndarray:
    w1 = w["w1"].astype(np.float64)
    w2 = w["w2"].astype(np.float64)
    return np.maximum(z.astype(np.float64) @ w1.T, 0.0) + np.maximum(
        e.astype(np.float64) @ w2.T, 0.0
    )


def shared_residual(
    w: dict[str, np.ndarray], z: np.ndarray, e: np.ndarray, mode: str = "rel"
) -> np.ndarray:
    """THE residual both libraries are judged by, per sample, in float64:
    ||f(z) - z|| (mode "abs"), divided by ||f(z)|| (mode "rel")."""
    fz = np_f(w, z, e)
    diff = np.linalg.norm(fz - z.astype(np.float64), axis=-1)
    if mode == "abs":
        return diff
    return diff / np.maximum(np.linalg.norm(fz, axis=-1), 1e-30)


def rel_diff(a, b) -> float:
    """||a - b|| / max(||a||, ||b||), 0 when both are zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    if scale == 0.0:
        return 0.0
    return float(np.linalg.norm(a - b) / scale)


# ----------------------------------------------------------------------------------------
# Configurations compared across libraries
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DEQConfig:
    """One stopping rule for both sides: stop when the relative (or absolute) residual
    ||f(z) - z|| [/ ||f(z)||] <= tol, at most `max_iter` f evaluations; the same rule and
    solver for the adjoint (IFT) linear system."""

    solver: str  # torchdeq name: "fixed_point_iter" | "anderson" | "broyden"
    f_tol: float = 5e-3
    f_max_iter: int = 50
    b_tol: float = 5e-3
    b_max_iter: int = 50
    stop_mode: str = "rel"


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    rtol: float = 1e-3
    atol: float = 1e-3
    t1: float = 1.0


TORCHDEQ_SOLVERS = ("fixed_point_iter", "anderson", "broyden")
ANDERSON_HISTORY = 6  # torchdeq's anderson_solver default m=6


def imex_solver(name: str, tol: float, stop_mode: str, max_iter: int, memory: int | None = None):
    """The imex-deq solver matching a torchdeq solver name (same stopping rule, same
    history/memory as torchdeq's defaults; `memory` overrides Broyden's)."""
    import imex_deq as deq

    kwargs = {"termination": stop_mode}
    if stop_mode == "rel":
        kwargs["rtol"] = tol
    else:
        kwargs["atol"] = tol
    if name == "fixed_point_iter":
        return deq.FixedPointIteration(**kwargs)
    if name == "anderson":
        return deq.Anderson(history=ANDERSON_HISTORY, **kwargs)
    if name == "broyden":
        # torchdeq keeps every rank-one update (LBFGS_thres = max_iter).
        return deq.Broyden(memory=max_iter if memory is None else memory, **kwargs)
    raise ValueError(name)


# ----------------------------------------------------------------------------------------
# JAX side
# ----------------------------------------------------------------------------------------


def jax_modules():
    """Define (once) and return the Equinox modules of the JAX model."""
    global _JAX_MODULES
    if _JAX_MODULES is not None:
        return _JAX_MODULES
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import imex_deq as deq

    class DenseF(eqx.Module):
        """f(z, e) = relu(W1 z) + relu(W2 e)."""

        w1: jax.Array
        w2: jax.Array

        def __call__(self, z, e):
            return jax.nn.relu(self.w1 @ z) + jax.nn.relu(self.w2 @ e)

    class Explicit(eqx.Module):
        """The explicit network: f applied once, from z = 0."""

        f: DenseF

        def __call__(self, e, *, backward_counter=None):
            z0 = jnp.zeros_like(e)
            z = self.f(z0, e)
            if backward_counter is not None:
                z = deq._adjoint.tally_backward_nfe(z, backward_counter, 1)
            one = jnp.array(1)
            info = deq.DEQInfo(z0, z, jnp.array(jnp.nan, e.dtype), one, one, deq.RESULTS.successful)
            return z, info

    _JAX_MODULES = (DenseF, Explicit)
    return _JAX_MODULES


_JAX_MODULES = None


def jax_core_factory(kind: str, **options) -> Callable:
    """`make(f) -> layer` for the JAX side; the layer maps one embedded sample e to
    `(z, DEQInfo)` and accepts `backward_counter`.

    kinds: "deq" (options: solver, adjoint, max_steps), "neural_ode" (options: rtol, atol,
    t1, adjoint ("backsolve" | "checkpoint")), "explicit".
    """
    import diffrax as dfx

    import imex_deq as deq

    _, Explicit = jax_modules()
    if kind == "deq":
        solver = options["solver"]
        adjoint = options.get("adjoint", deq.ImplicitAdjoint())
        max_steps = options.get("max_steps", 50)
        return lambda f: deq.DEQ(f, solver, adjoint=adjoint, max_steps=max_steps)
    if kind == "neural_ode":
        which = options.get("adjoint", "backsolve")
        ode_adjoint = (
            dfx.BacksolveAdjoint() if which == "backsolve" else dfx.RecursiveCheckpointAdjoint()
        )
        return lambda f: deq.NeuralODE(
            f,
            t1=options.get("t1", 1.0),
            ode_solver=options.get("ode_solver", dfx.Dopri5()),
            rtol=options["rtol"],
            atol=options["atol"],
            max_steps=options.get("max_steps", 4096),
            adjoint=ode_adjoint,
        )
    if kind == "explicit":
        return lambda f: Explicit(f)
    raise ValueError(kind)


def jax_params(weights: dict[str, np.ndarray]) -> dict:
    import jax.numpy as jnp

    return {k: jnp.asarray(weights[k]) for k in PARAM_NAMES}


def jax_forward(make_core: Callable, params: dict, xs, counters):
    """Batched forward: `(logits, z, e, info)`; info fields are per sample.

    `counters` holds ONE backward counter PER SAMPLE (shape (batch,)), vmapped with the
    data. The documented pattern, one unbatched scalar counter closed over by the vmap,
    under-counts whenever the backward NFE does not depend on batched data (a Python int
    such as PhantomAdjoint's `steps`): JAX's vmap of a custom_vjp does not sum an
    unbatched constant cotangent over the batch, so it reads the NFE of ONE sample.
    Per-sample counters are exact for every adjoint; their gradients are summed."""
    import jax

    DenseF, _ = jax_modules()
    layer = make_core(DenseF(params["w1"], params["w2"]))

    def one(x, counter):
        e = jax.nn.relu(params["we"] @ x + params["be"])
        z, info = layer(e, backward_counter=counter)
        return params["wh"] @ z + params["bh"], z, e, info

    return jax.vmap(one)(xs, counters)


def jax_loss(make_core: Callable, params: dict, counters, xs, ys):
    import jax.numpy as jnp
    import optax

    logits, z, e, info = jax_forward(make_core, params, xs, counters)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ys))
    return loss, (z, e, info)


def jax_grad_fn(make_core: Callable) -> Callable:
    """jitted `(params, xs, ys) -> (loss, grads, z, e, info, backward_nfe_total)`."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    @eqx.filter_jit
    def grad(params, xs, ys):
        counters = jnp.zeros(xs.shape[:1], jnp.float32)
        (loss, (z, e, info)), (g, g_counter) = jax.value_and_grad(
            lambda p, c: jax_loss(make_core, p, c, xs, ys), argnums=(0, 1), has_aux=True
        )(params, counters)
        return loss, g, z, e, info, jnp.sum(g_counter)

    return grad


def jax_train_step(make_core: Callable, learning_rate: float = 1e-3):
    """`(init_opt_state, step)`; step is ONE eqx.filter_jit'd function doing solve, loss,
    adjoint and the Adam update: `step(params, opt_state, xs, ys) -> (params, opt_state,
    stats)` with stats = dict(loss, fwd_nfe (per sample), bwd_nfe_total, converged (per
    sample), residual (per sample), z, e)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import imex_deq as deq

    optimiser = optax.adam(learning_rate)

    @eqx.filter_jit
    def step(params, opt_state, xs, ys):
        counters = jnp.zeros(xs.shape[:1], jnp.float32)
        (loss, (z, e, info)), (g, g_counter) = jax.value_and_grad(
            lambda p, c: jax_loss(make_core, p, c, xs, ys), argnums=(0, 1), has_aux=True
        )(params, counters)
        updates, opt_state = optimiser.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {
            "loss": loss,
            "fwd_nfe": info.nfe,
            "bwd_nfe_total": jnp.sum(g_counter),
            "converged": info.result == deq.RESULTS.successful,
            "residual": info.residual,
            "z": z,
            "e": e,
        }
        return params, opt_state, stats

    return optimiser.init, step


# ----------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------


class NFECounter:
    """Counts evaluations of f (Python calls) and VJPs through f (backward calls of an
    identity autograd.Function wrapped around f's output, so every vector-Jacobian product
    through f — torchdeq's IFT solver steps, torchdiffeq's adjoint dynamics, plain backprop
    — is counted once)."""

    def __init__(self):
        self.evals = 0
        self.vjps = 0
        self._fn = None

    def reset(self):
        self.evals = 0
        self.vjps = 0

    def wrap_output(self, out):
        import torch

        if self._fn is None:
            counter = self

            class CountVJP(torch.autograd.Function):
                @staticmethod
                def forward(ctx, t):
                    return t.view_as(t)

                @staticmethod
                def backward(ctx, grad):
                    counter.vjps += 1
                    return grad

            self._fn = CountVJP
        self.evals += 1
        if torch.is_grad_enabled() and out.requires_grad:
            return self._fn.apply(out)
        return out


def torch_modules():
    global _TORCH_MODULES
    if _TORCH_MODULES is not None:
        return _TORCH_MODULES
    import torch
    from torch import nn

    class TorchF(nn.Module):
        """f(z, e) = relu(W1 z) + relu(W2 e), counting evaluations and VJPs."""

        def __init__(self, width):
            super().__init__()
            self.w1 = nn.Linear(width, width, bias=False)
            self.w2 = nn.Linear(width, width, bias=False)
            self.counter = NFECounter()

        def forward(self, z, e):
            out = torch.relu(self.w1(z)) + torch.relu(self.w2(e))
            return self.counter.wrap_output(out)

    class ODEFunc(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f
            self.e = None

        def forward(self, t, z):
            return self.f(z, self.e)

    class DEQCore(nn.Module):
        """torchdeq DEQ, configured to do what imex-deq's ImplicitAdjoint does: exact
        implicit gradient (ift=True; torchdeq's default is the one-step phantom gradient),
        same solver forwards and for the adjoint system, same stopping rule."""

        def __init__(self, cfg: DEQConfig):
            super().__init__()
            from torchdeq import get_deq

            self.cfg = cfg
            self.deq = get_deq(
                core="sliced",  # torchdeq's default core; one solve, then the grad function
                f_solver=cfg.solver,
                b_solver=cfg.solver,
                f_max_iter=cfg.f_max_iter,
                b_max_iter=cfg.b_max_iter,
                f_tol=cfg.f_tol,
                b_tol=cfg.b_tol,
                f_stop_mode=cfg.stop_mode,  # torchdeq default is "abs"
                b_stop_mode=cfg.stop_mode,
                ift=True,  # exact IFT gradient; default is 1-step phantom gradient
            )
            self.last_info = None

        def forward(self, f, e):
            z0 = torch.zeros_like(e)
            z_out, info = self.deq(lambda z: f(z, e), z0)
            self.last_info = info
            return z_out[-1]

    class ODECore(nn.Module):
        """torchdiffeq odeint_adjoint on [0, t1], dopri5; gradients reach W1, W2 and the
        embedding e (passed as an explicit adjoint parameter, since f closes over it)."""

        def __init__(self, cfg: ODEConfig):
            super().__init__()
            self.cfg = cfg

        def forward(self, f, e):
            from torchdiffeq import odeint_adjoint

            func = ODEFunc(f)
            func.e = e
            t = torch.tensor([0.0, self.cfg.t1], dtype=e.dtype)
            params = tuple(p for p in (f.w1.weight, f.w2.weight, e) if p.requires_grad)
            ys = odeint_adjoint(
                func,
                torch.zeros_like(e),
                t,
                rtol=self.cfg.rtol,
                atol=self.cfg.atol,
                method="dopri5",
                adjoint_params=params,
            )
            return ys[-1]

    class ExplicitCore(nn.Module):
        def forward(self, f, e):
            return f(torch.zeros_like(e), e)

    class TorchNet(nn.Module):
        def __init__(self, weights: dict[str, np.ndarray], core: nn.Module):
            super().__init__()
            width, d_in = weights["we"].shape
            classes = weights["wh"].shape[0]
            self.embed = nn.Linear(d_in, width)
            self.f = TorchF(width)
            self.head = nn.Linear(width, classes)
            self.core = core
            with torch.no_grad():
                for name, param in self.named_weights().items():
                    param.copy_(torch.from_numpy(weights[name]))

        def named_weights(self) -> dict:
            return {
                "we": self.embed.weight,
                "be": self.embed.bias,
                "w1": self.f.w1.weight,
                "w2": self.f.w2.weight,
                "wh": self.head.weight,
                "bh": self.head.bias,
            }

        def forward(self, x):
            e = torch.relu(self.embed(x))
            z = self.core(self.f, e)
            return self.head(z), z, e

    _TORCH_MODULES = {
        "TorchF": TorchF,
        "DEQCore": DEQCore,
        "ODECore": ODECore,
        "ExplicitCore": ExplicitCore,
        "TorchNet": TorchNet,
    }
    return _TORCH_MODULES


_TORCH_MODULES = None


def torch_core(kind: str, cfg=None):
    m = torch_modules()
    if kind == "deq":
        return m["DEQCore"](cfg)
    if kind == "neural_ode":
        return m["ODECore"](cfg)
    if kind == "explicit":
        return m["ExplicitCore"]()
    raise ValueError(kind)


def torch_step(net, opt, x, y) -> dict:
    """One training step; returns loss, NFE counts, z and e. Forward NFE: f evaluations
    during the forward pass; backward NFE: VJPs through f during backward (plus, reported
    apart, f re-evaluations during backward)."""
    import torch

    counter = net.f.counter
    counter.reset()
    opt.zero_grad(set_to_none=True)
    logits, z, e = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    fwd = counter.evals
    counter.reset()
    loss.backward()
    bwd_vjps, bwd_evals = counter.vjps, counter.evals
    opt.step()
    return {
        "loss": float(loss.detach()),
        "fwd_nfe": fwd,
        "bwd_vjps": bwd_vjps,
        "bwd_evals": bwd_evals,
        "z": z.detach().numpy(),
        "e": e.detach().numpy(),
    }


# ----------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Parity:
    name: str
    z_rel: float
    grad_rel: dict[str, float]
    residual_peer: float  # max shared residual of the peer's z
    residual_imex: float
    tol: float
    ok: bool
    why: str = ""

    def line(self) -> str:
        grads = " ".join(f"{k}={v:.1e}" for k, v in self.grad_rel.items())
        status = "OK" if self.ok else f"FAIL ({self.why})"
        return (
            f"parity {self.name}: z* rel diff {self.z_rel:.2e}; grad rel diff {grads}; "
            f"max shared residual peer {self.residual_peer:.1e} / imex {self.residual_imex:.1e}"
            f" -> {status}"
        )


def parity_check(
    name: str,
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    torch_kind: str,
    torch_cfg,
    jax_make_core: Callable,
    tol: float = 1e-4,
    residual_mode: str | None = "rel",
) -> Parity:
    """Same weights, same batch, one forward+backward on each side (no optimiser step);
    compare z* and every parameter gradient by relative difference, and report the shared
    residual of both sides' z*. `residual_mode=None` for rows with no fixed point."""
    import jax
    import torch

    net = torch_modules()["TorchNet"](weights, torch_core(torch_kind, torch_cfg))
    net.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    logits, z_t, e_t = net(xt)
    loss = torch.nn.functional.cross_entropy(logits, yt)
    loss.backward()
    g_t = {k: p.grad.detach().numpy() for k, p in net.named_weights().items()}

    grad = jax_grad_fn(jax_make_core)
    _, g_j, z_j, e_j, _, _ = jax.block_until_ready(grad(jax_params(weights), x, y))
    z_t = z_t.detach().numpy()
    e_t = e_t.detach().numpy()
    z_rel = rel_diff(z_t, z_j)
    grad_rel = {k: rel_diff(g_t[k], np.asarray(g_j[k])) for k in PARAM_NAMES}
    if residual_mode is not None:
        r_peer = float(shared_residual(weights, z_t, e_t, residual_mode).max())
        r_imex = float(
            shared_residual(weights, np.asarray(z_j), np.asarray(e_j), residual_mode).max()
        )
    else:
        r_peer = r_imex = float("nan")
    reasons = []
    if not np.isfinite(z_rel) or z_rel >= tol:
        reasons.append(f"z* differs by {z_rel:.2e} >= {tol:g}")
    bad = [k for k, v in grad_rel.items() if not np.isfinite(v) or v >= tol]
    if bad:
        reasons.append("gradients differ for " + ", ".join(f"{k} ({grad_rel[k]:.2e})" for k in bad))
    return Parity(name, z_rel, grad_rel, r_peer, r_imex, tol, not reasons, "; ".join(reasons))


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def write_results(path: str, payload: dict, started: float) -> None:
    """Write a benchmark's JSON results (with its total run time) and say so on stderr."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump({**payload, "total_s": time.perf_counter() - started}, fh, indent=2)
    log(f"wrote {path} in {time.perf_counter() - started:.0f}s total")
