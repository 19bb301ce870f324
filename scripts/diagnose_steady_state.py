"""Why a DEQ's solves fail: one saved cell, one test batch, every solver side by side.

Loads the checkpoint in RUN_DIR (a finished run, or one still training: its last
checkpoint), or with --initial builds the model as its training starts, and solves
z = f(z, x) on the first --samples test images from the layer's own initial guess with
Anderson, plain fixed-point iteration, `SteadyStateODE` under several step-size
controls, and explicit Euler on dz/dt = f(z, x) − z at fixed steps.
Where Euler at a small step converges and the adaptive ODE solve does not, the
equilibrium is stable for the flow and the step-size control is at fault; with --trace,
plain diffrax integrates sample 0 and prints the accepted times and residuals (a
residual that stays put while t grows is a spurious steady state of the Runge–Kutta map).

The run's settings come from --config (a summary.json; default RUN_DIR's) with --set
KEY=VALUE overrides (JSON values; a run's solver options must match its checkpoint), e.g.
the continuous twin of a finished Anderson run, as its training starts:

    python scripts/diagnose_steady_state.py --initial \\
        --config RUNS/skip-reg-anderson-jac-s0/summary.json --set solver='"continuous"'

Prints a markdown table (relative residual |f(z) − z| / |f(z)|, mean over samples).
"""

from __future__ import annotations

import argparse
import json
import os

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np

import imex_deq as ideq
from imex_deq._solution import residual_norm
from imex_deq.data import load_dataset
from imex_deq.experiments import TrainConfig, load_trained
from imex_deq.experiments._training import build_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", nargs="?", default=None)
    p.add_argument("--initial", action="store_true", help="the model before training")
    p.add_argument("--config", default=None, help="summary.json with the run's settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--trace", action="store_true", help="per-step trace of sample 0")
    return p.parse_args(argv)


def load(args):
    """(config, layer, injections, initial guesses) of the first --samples test images."""
    if args.run_dir is None and not (args.initial and args.config):
        raise SystemExit("give RUN_DIR, or --initial with --config")
    with open(args.config or os.path.join(args.run_dir, "summary.json")) as handle:
        settings = json.load(handle)["config"]
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = json.loads(value)
    config = TrainConfig(
        **{**settings, "out_dir": args.run_dir, "resume": False, "progress": False}
    )
    data = load_dataset(config.dataset)
    model = build_model(config, data) if args.initial else load_trained(config, data)[1]
    injections = jax.vmap(model.embed)(jnp.asarray(data.x_test[: args.samples]))
    guesses = jax.vmap(lambda x: model.layer.initial_guess(model.layer.f, x))(injections)
    return config, model.layer, injections, guesses


def relative_residual(f, z, x) -> np.ndarray:
    """|f(z, x) − z| / |f(z, x)| per sample (the solvers' own "rel" residual)."""
    return np.asarray(jax.vmap(lambda z, x: residual_norm(f(z, x), z, "rel"))(z, x))


def solver_row(label, f, solver, z0, x, max_steps):
    solve = jax.jit(jax.vmap(lambda z, a: ideq.fixed_point(f, solver, z, a, max_steps=max_steps)))
    sol = solve(z0, x)
    converged = np.mean(np.asarray(sol.result == ideq.RESULTS.successful))
    residual = relative_residual(f, sol.value, x)
    nfe = np.asarray(sol.nfe)
    return f"| {label} | {max_steps} | {nfe.mean():.1f} | {nfe.max()} | {residual.mean():.3g} | {100 * converged:.0f} |"


def euler_row(f, z0, x, dt, horizon=10.0):
    steps = round(horizon / dt)

    @jax.jit
    def integrate(z):
        def step(_, z):
            fz = jax.vmap(f)(z, x)
            return jax.tree_util.tree_map(lambda a, b: a + dt * (b - a), z, fz)

        return jax.lax.fori_loop(0, steps, step, z)

    residual = relative_residual(f, integrate(z0), x)
    return f"| explicit Euler, dt {dt}, t = {horizon:g} | {steps} | {steps} | {steps} | {residual.mean():.3g} | — |"


def trace(f, z0, x, ode_rtol, ode_atol, max_steps=40):
    """Plain diffrax (Tsit5, PI control 0.4 / 0.3) on sample 0: accepted times, residuals."""
    z, a = (jax.tree_util.tree_map(lambda leaf: leaf[0], tree) for tree in (z0, x))
    term = dfx.ODETerm(lambda t, z, a: jax.tree_util.tree_map(jnp.subtract, f(z, a), z))
    controller = dfx.PIDController(rtol=ode_rtol, atol=ode_atol, pcoeff=0.4, icoeff=0.3)
    sol = dfx.diffeqsolve(
        term, dfx.Tsit5(), 0.0, 1e3, 1.0, z, a, stepsize_controller=controller,
        saveat=dfx.SaveAt(steps=True), max_steps=max_steps, throw=False,
    )  # fmt: skip
    n = int(np.sum(np.isfinite(np.asarray(sol.ts))))
    picks = list(range(0, n, max(1, n // 8)))
    one = lambda tree, k=None: jax.tree_util.tree_map(
        lambda leaf: (leaf if k is None else leaf[k])[None], tree
    )
    residuals = [float(relative_residual(f, one(sol.ys, k), one(a))[0]) for k in picks]
    print(
        f"trace ode_rtol {ode_rtol}, ode_atol {ode_atol}: accepted "
        f"{int(sol.stats['num_accepted_steps'])}, rejected {int(sol.stats['num_rejected_steps'])}; "
        f"t {np.round(np.asarray(sol.ts, np.float64)[picks], 2).tolist()}; "
        f"relative residual {np.round(residuals, 3).tolist()}"
    )


def main(argv=None):
    args = parse_args(argv)
    config, layer, x, z0 = load(args)
    f, rtol = layer.f, config.rtol
    ode = lambda **control: ideq.SteadyStateODE(rtol=rtol, termination="rel", **control)
    default = ode().ode_control()
    print(
        f"{args.run_dir or 'initial model'}: {args.samples} test images, stop at relative residual {rtol}\n"
    )
    print("| method | step cap | NFE mean | NFE max | relative residual | converged % |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [
        ("Anderson", ideq.Anderson(rtol=rtol, termination="rel"), 20),
        ("fixed-point iteration", ideq.FixedPointIteration(rtol=rtol, termination="rel"), 60),
        (f"Tsit5, default control {default[:2]}", ode(), 20),
        (f"Tsit5, default control {default[:2]}", ode(), 60),
        (
            f"Tsit5, default control {default[:2]}, no stall tightening",
            ode(ode_stall_factor=1.0),
            20,
        ),
        (
            f"Tsit5, default control {default[:2]}, no stall tightening",
            ode(ode_stall_factor=1.0),
            60,
        ),
        (f"Tsit5, control ({rtol}, {rtol / 50:g})", ode(ode_rtol=rtol, ode_atol=rtol / 50), 20),
        ("Tsit5, control (1e-3, 1e-5)", ode(ode_rtol=1e-3, ode_atol=1e-5), 20),
    ]
    for label, solver, max_steps in rows:
        print(solver_row(label, f, solver, z0, x, max_steps), flush=True)
    for dt in (0.05, 0.2, 0.5):
        print(euler_row(f, z0, x, dt), flush=True)
    if args.trace:
        print()
        trace(f, z0, x, *default[:2])
        trace(f, z0, x, 1e-3, 1e-5)


if __name__ == "__main__":
    main()
