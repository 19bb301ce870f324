"""The convolutional path, measured side by side in one run, one thread each side.

Rows (batch 128 unless --batch says otherwise; medians of --steps timed calls after a
warm-up call). The compile column is the ahead-of-time trace + lower + XLA compile of the
jitted step, without executing it; XLA compiles on every core the process may use (run
under `taskset -c N` for a one-core figure), while the steps run on --threads threads:

1. The explicit MNIST-conv network (stem, f(0, x) once, head) against a plain Equinox CNN
   of about the same parameter count (3x3 convs 1->16, 16->32 stride 2, 32->32 stride 2,
   ReLU, flatten, Linear 1568->10): one Adam training step each. Target: <= 1.5x.
   With `--torch`, the same two networks with the same weights in PyTorch (parity of the
   logits checked first): how much of the ratio is the network and how much XLA.
2. The MNIST-conv cell f(z, x) and its vector-Jacobian product in z (a forward pass plus
   the backward pass, as `torch.autograd.grad` does it) against the same cell written in
   PyTorch with the same weights, after a parity check (`--torch`, needs the `bench` extra).
3. DEQ training steps (Vanilla and Skip Reg., Anderson, implicit adjoint) of mnist_conv and
   cifar_small, with forward NFE (mean and batch max) and backward NFE.
4. Compile time of the cifar_large DEQ training step (`--cifar-large`).

5. `--compile-only`: only the compile times of those steps, tracing and XLA apart
   (`--repeats N`: each compiled N times, medians and range; compile times vary by a
   few seconds between runs on a shared machine).

Usage: python scripts/bench_conv.py [--steps 10] [--threads 1] [--torch] [--cifar-large]
       [--compile-only [--repeats 3]]
Prints a markdown table; writes results/bench_conv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed calls per row")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads for XLA and PyTorch")
    p.add_argument("--rtol", type=float, default=1e-2, help="DEQ relative tolerance")
    p.add_argument("--max-steps", type=int, default=30, help="DEQ forward iteration cap")
    p.add_argument("--torch", action="store_true", help="compare the cell with PyTorch")
    p.add_argument("--cifar-large", action="store_true", help="time the cifar_large compile")
    p.add_argument("--skip-deq", action="store_true", help="leave out the DEQ rows")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile each step (trace + lower and XLA compile apart); with --threads 2 "
        "XLA compiles on both cores",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --compile-only: compile every step this many times (medians and range)",
    )
    p.add_argument("--out", default="results/bench_conv.json")
    return p.parse_args(argv)


ARGS = parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import threads, timing

threads.configure_threads(ARGS.threads)  # before jax is imported

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import imex_deq as ideq
from imex_deq import experiments as presets
from imex_deq import nn
from imex_deq.experiments import build_conv_model


def timed(fn, *args, steps: int) -> tuple[float, float]:
    """(first-call seconds, median seconds of `steps` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = [timing.timed(lambda: jax.block_until_ready(fn(*args)))[1] for _ in range(steps)]
    return first, statistics.median(times)


class PlainCNN(eqx.Module):
    """What a user would write first: Equinox convolutions, channels-first, no norms."""

    convs: tuple[eqx.nn.Conv2d, ...]
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.convs = (
            eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1),
            eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2),
            eqx.nn.Conv2d(32, 32, 3, stride=2, padding=1, key=k3),
        )
        self.linear = eqx.nn.Linear(32 * 7 * 7, 10, key=k4)

    def __call__(self, image):
        x = jnp.moveaxis(image, -1, 0)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.linear(jnp.ravel(x))


def make_step(forward, optimizer):
    """A jitted Adam step on cross-entropy; `forward(model, images, counter)` returns
    `(logits, info_or_None)`."""

    def loss(model_and_counter, x, y):
        model, counter = model_and_counter
        logits, info = forward(model, x, counter)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        if info is not None and isinstance(model.layer, ideq.SkipRegDEQ):
            ce = ce + ideq.skip_loss(info, 1.0)
        return ce, info

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        (_, info), (grads, counter_grad) = eqx.filter_value_and_grad(loss, has_aux=True)(
            (model, jnp.zeros(())), x, y
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        nfe = (jnp.zeros(()), jnp.zeros(())) if info is None else (info.nfe.mean(), info.nfe.max())
        return model, opt_state, nfe, counter_grad / x.shape[0]

    return step


def plain_forward(model, x, counter):
    return jax.vmap(model)(x), None


def classifier_forward(model, x, counter):
    keys = jax.random.split(jax.random.PRNGKey(1), x.shape[0])  # dropout masks (CIFAR cells)
    logits, info, _ = jax.vmap(
        lambda image, key: model.forward(image, key=key, backward_counter=counter)
    )(x, keys)
    return logits, info


def compile_training_step(model, forward, x, y):
    """The compiled Adam step, its optimiser state, and the seconds taken to trace and
    lower it and for XLA to compile it (nothing is executed)."""
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(forward, optimizer)
    start = time.perf_counter()
    lowered = step.lower(model, opt_state, x, y)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    timings = {"lower_s": lowered_at - start, "xla_s": time.perf_counter() - lowered_at}
    timings["compile_s"] = timings["lower_s"] + timings["xla_s"]
    return compiled, opt_state, timings


def time_training_step(model, forward, x, y, steps):
    compiled, opt_state, timings = compile_training_step(model, forward, x, y)
    if steps == 0:
        return {"params": nn.count_parameters(model), **timings}
    _, step_s = timed(compiled, model, opt_state, x, y, steps=steps)
    _, _, (nfe_mean, nfe_max), backward_nfe = compiled(model, opt_state, x, y)
    return {
        "params": nn.count_parameters(model),
        "step_ms": 1e3 * step_s,
        **timings,
        "nfe_mean": float(nfe_mean),
        "nfe_max": float(nfe_max),
        "backward_nfe": float(backward_nfe),
    }


def compile_rows(args, key):
    """Only compile every step the table times: `{row name: timings}`."""
    config = presets.mnist_conv()
    x, y = images(config, args.batch, key)
    explicit = build_conv_model("explicit", ideq.Anderson(), config=config, key=key)
    rows = {
        "plain CNN": time_training_step(PlainCNN(key), plain_forward, x, y, 0),
        "explicit mnist_conv": time_training_step(explicit, classifier_forward, x, y, 0),
    }
    for name, d in deq_rows(args, key, steps=0).items():
        rows[f"DEQ {name}"] = d
    if args.cifar_large:
        rows["DEQ cifar_large vanilla, batch 8"] = cifar_large_compile(args, key, steps=0)
    return rows


def repeated_compile_rows(args, key):
    """`compile_rows` `args.repeats` times: per row the median of each timing, and the
    range of the total."""
    runs = [compile_rows(args, key) for _ in range(args.repeats)]
    rows = {}
    for name in runs[0]:
        totals = [run[name]["compile_s"] for run in runs]
        rows[name] = {
            key: statistics.median(run[name][key] for run in runs)
            for key in ("lower_s", "xla_s", "compile_s")
        }
        rows[name].update(min_s=min(totals), max_s=max(totals), all_s=totals)
    return rows


def render_compile(rows) -> str:
    lines = [
        "| training step | trace + lower (s) | XLA compile (s) | total (s) | range (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, d in rows.items():
        lines.append(
            f"| {name} | {d['lower_s']:.1f} | {d['xla_s']:.1f} | {d['compile_s']:.1f} "
            f"| {d['min_s']:.1f}–{d['max_s']:.1f} |"
        )
    return "\n".join(lines)


def images(config, batch, key):
    h, w = config.image_size
    x = jax.random.normal(key, (batch, h, w, config.in_channels))
    y = jax.random.randint(key, (batch,), 0, config.num_classes)
    return x, y


def explicit_rows(args, key):
    config = presets.mnist_conv()
    x, y = images(config, args.batch, key)
    plain = time_training_step(PlainCNN(key), plain_forward, x, y, args.steps)
    explicit_model = build_conv_model("explicit", ideq.Anderson(), config=config, key=key)
    explicit = time_training_step(explicit_model, classifier_forward, x, y, args.steps)
    if args.torch:
        from bench_conv_torch import torch_step_timings

        shapes = config.state_shapes
        explicit.update(
            torch_step_timings(
                PlainCNN(key), explicit_model, shapes, x, y, args.steps, args.threads
            )
        )
    return plain, explicit


def cell_and_inputs(config, batch, key):
    model = build_conv_model("vanilla", ideq.Anderson(), config=config, key=key)
    x, _ = images(config, batch, key)
    injection = jax.vmap(model.embed)(x)
    z = jax.vmap(model.layer.f)(jax.vmap(model.layer.zero_state)(injection), injection)
    return model.layer.f, z, injection


def cell_rows(args, key):
    cell, z, injection = cell_and_inputs(presets.mnist_conv(), args.batch, key)
    f = eqx.filter_jit(lambda cell, z, x: jax.vmap(cell)(z, x))
    # A random cotangent: the GroupNorm at the end maps a constant one to a zero VJP.
    cotangent = jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype), z)

    @eqx.filter_jit
    def vjp(cell, z, x, v):
        _, pullback = jax.vjp(lambda z: jax.vmap(cell)(z, x), z)
        return pullback(v)[0]

    _, f_s = timed(f, cell, z, injection, steps=args.steps)
    _, vjp_s = timed(vjp, cell, z, injection, cotangent, steps=args.steps)
    row = {"f_ms": 1e3 * f_s, "vjp_ms": 1e3 * vjp_s}
    if args.torch:
        from bench_conv_torch import torch_cell_timings

        row.update(torch_cell_timings(cell, z, injection, cotangent, args.steps, args.threads))
    return row


def deq_rows(args, key, steps=None):
    steps = args.steps if steps is None else steps
    rows = {}
    for name in ("mnist_conv", "cifar_small"):
        config = getattr(presets, name)()
        x, y = images(config, args.batch, key)
        for variant in ("vanilla", "skip-reg"):
            solver = ideq.Anderson(rtol=args.rtol)
            model = build_conv_model(
                variant, solver, config=config, key=key, max_steps=args.max_steps
            )
            rows[f"{name} {variant}"] = time_training_step(model, classifier_forward, x, y, steps)
            print(f"  {name} {variant}: {rows[f'{name} {variant}']}", file=sys.stderr)
    return rows


def cifar_large_compile(args, key, steps=1):
    config = presets.cifar_large()
    x, y = images(config, 8, key)
    model = build_conv_model("vanilla", ideq.Anderson(rtol=args.rtol), config=config, key=key)
    return time_training_step(model, classifier_forward, x, y, steps=steps)


def main(args):
    key = jax.random.PRNGKey(0)
    started = time.time()
    print(f"jax {jax.__version__}, {threads.machine_line(args.threads)}", file=sys.stderr)
    results = {"args": vars(args), "jax": jax.__version__}
    if args.compile_only:
        results["compile"] = repeated_compile_rows(args, key)
        print(render_compile(results["compile"]))
        write_json(results, started, args.out)
        return
    plain, explicit = explicit_rows(args, key)
    results.update(plain=plain, explicit=explicit)
    results["cell"] = cell_rows(args, key)
    if not args.skip_deq:
        results["deq"] = deq_rows(args, key)
    if args.cifar_large:
        results["cifar_large"] = cifar_large_compile(args, key)
    print(render(results))
    write_json(results, started, args.out)


def write_json(results, started, path):
    results["wall_s"] = time.time() - started
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def render(r) -> str:
    lines = [
        "| row | imex-deq | reference | ratio | compile (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    p, e = r["plain"], r["explicit"]
    lines.append(
        f"| explicit mnist_conv step ({e['params']:,} params) vs plain CNN ({p['params']:,}) "
        f"| {e['step_ms']:.1f} ms | {p['step_ms']:.1f} ms | {e['step_ms'] / p['step_ms']:.2f}x "
        f"| {e['compile_s']:.1f} / {p['compile_s']:.1f} |"
    )
    if "torch_explicit_step_ms" in e:
        te, tp = e["torch_explicit_step_ms"], e["torch_plain_step_ms"]
        lines.append(
            f"| PyTorch, same networks and weights: explicit step vs plain CNN step "
            f"| {te:.1f} ms | {tp:.1f} ms | {te / tp:.2f}x | |"
        )
        lines.append(
            f"| explicit mnist_conv step, imex-deq vs PyTorch | {e['step_ms']:.1f} ms "
            f"| {te:.1f} ms | {e['step_ms'] / te:.2f}x | |"
        )
        lines.append(
            f"| plain CNN step, Equinox vs PyTorch | {p['step_ms']:.1f} ms "
            f"| {tp:.1f} ms | {p['step_ms'] / tp:.2f}x | |"
        )
    c = r["cell"]
    torch_f = c.get("torch_f_ms")
    lines.append(
        f"| mnist_conv cell f | {c['f_ms']:.1f} ms | "
        + (f"{torch_f:.1f} ms (PyTorch) | {c['f_ms'] / torch_f:.2f}x |" if torch_f else "— | — |")
        + " |"
    )
    torch_vjp = c.get("torch_vjp_ms")
    lines.append(
        f"| mnist_conv cell VJP (forward + backward) | {c['vjp_ms']:.1f} ms | "
        + (
            f"{torch_vjp:.1f} ms (PyTorch) | {c['vjp_ms'] / torch_vjp:.2f}x |"
            if torch_vjp
            else "— | — |"
        )
        + " |"
    )
    lines.append(
        f"| mnist_conv cell VJP / f | {c['vjp_ms'] / c['f_ms']:.2f}x | "
        + (f"{torch_vjp / torch_f:.2f}x (PyTorch) | — |" if torch_vjp else "— | — |")
        + " |"
    )
    if "parity" in c:
        lines.append(f"| parity (max relative difference of f, VJP) | {c['parity']} | | | |")
    for name, d in r.get("deq", {}).items():
        lines.append(
            f"| DEQ step {name} (Anderson; fwd NFE {d['nfe_mean']:.1f} mean, "
            f"{d['nfe_max']:.0f} max; bwd NFE {d['backward_nfe']:.1f}) | {d['step_ms']:.0f} ms "
            f"| {p['step_ms']:.1f} ms (plain CNN) | {d['step_ms'] / p['step_ms']:.1f}x "
            f"| {d['compile_s']:.1f} |"
        )
    if "cifar_large" in r:
        d = r["cifar_large"]
        lines.append(
            f"| cifar_large DEQ step, batch 8 ({d['params']:,} params) | {d['step_ms']:.0f} ms "
            f"| | | {d['compile_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)
