"""The 3x3 convolutions of the MNIST-conv model alone, one thread, batch 128, side by side:
XLA's convolution as `imex_deq.nn.Conv2d` ran it before pixel pairs (`ungrouped_conv`),
on pixel pairs (`pair_packed_conv`, for <= 8 output channels), and PyTorch's
channels-last convolution (`--torch`, the `bench` extra). Rows: forward, the VJP in x
(what solver and adjoint loops take) and the gradient in x and the kernel (a training
step's), in ms, with GFLOP/s of the forward.

`--cifar`: cifar_small's 3x3 convolutions instead, pixel pairs timed on every one (the
layer takes them only where `pair_packable` says they pay).

Usage: python scripts/bench_conv_shapes.py [--steps 15] [--torch] [--cifar]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="timed calls per cell")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--torch", action="store_true", help="add PyTorch's channels-last conv")
    p.add_argument(
        "--cifar",
        action="store_true",
        help="cifar_small's 3x3 convolutions instead, pixel pairs tried on every one",
    )
    return p.parse_args(argv)


ARGS = parse_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import threads

threads.configure_threads(1)  # before jax is imported

import jax
import jax.numpy as jnp

from imex_deq.nn._convolution import pair_packable, pair_packed_conv, ungrouped_conv

# (spatial size, in channels, out channels): the stem's and the cell's 3x3 convolutions.
SHAPES = [(28, 1, 8), (28, 8, 8), (28, 16, 8), (28, 8, 16), (14, 16, 16)]
CIFAR_SHAPES = [(32, 3, 24), (32, 24, 24), (32, 24, 120), (32, 120, 24), (16, 24, 120)]
SAME = ((1, 1), (1, 1))


def median_ms(fn, *args, steps):
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def xla_timings(conv, x, kernel, cotangent, steps):
    forward = jax.jit(conv)
    vjp_x = jax.jit(lambda x, k, v: jax.vjp(lambda x: conv(x, k), x)[1](v)[0])
    grad = jax.jit(jax.grad(lambda x, k, v: jnp.sum(conv(x, k) * v), argnums=(0, 1)))
    return (
        median_ms(forward, x, kernel, steps=steps),
        median_ms(vjp_x, x, kernel, cotangent, steps=steps),
        median_ms(grad, x, kernel, cotangent, steps=steps),
    )


def torch_timings(x, kernel, cotangent, steps):
    import numpy as np
    import torch

    torch.set_num_threads(1)

    def channels_last(a):  # (N, H, W, C) -> a channels-last (N, C, H, W) tensor
        return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)

    tx = channels_last(x).requires_grad_()
    tk = torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1).contiguous().requires_grad_()
    tv = channels_last(cotangent)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tk, padding=1)

    def vjp_x():
        y = torch.nn.functional.conv2d(tx, tk, padding=1)
        return torch.autograd.grad(y, tx, tv)

    def grad():
        y = torch.nn.functional.conv2d(tx, tk, padding=1)
        return torch.autograd.grad(y, (tx, tk), tv)

    def ms(fn):
        for _ in range(2):
            fn()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return ms(forward), ms(vjp_x), ms(grad)


def main(args):
    print(f"jax {jax.__version__}, {threads.machine_line(1)}", file=sys.stderr)
    plain = lambda x, k: ungrouped_conv(x, k, (1, 1), SAME, (1, 1))
    pairs = lambda x, k: pair_packed_conv(x, k, (1, 1))
    print("| conv (batch 128) | formulation | forward ms | GFLOP/s | VJP in x ms | gradient ms |")
    print("|---|---|---:|---:|---:|---:|")
    for size, c_in, c_out in CIFAR_SHAPES if args.cifar else SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(size * c_in + c_out), 3)
        x = jax.random.normal(keys[0], (args.batch, size, size, c_in))
        kernel = jax.random.normal(keys[1], (3, 3, c_in, c_out))
        cotangent = jax.random.normal(keys[2], (args.batch, size, size, c_out))
        gflop = 2 * args.batch * size * size * 9 * c_in * c_out / 1e9
        rows = [("XLA", xla_timings(plain, x, kernel, cotangent, args.steps))]
        if args.cifar or pair_packable(x.shape, kernel.shape, (1, 1), SAME, (1, 1), 1):
            rows.append(("XLA, pixel pairs", xla_timings(pairs, x, kernel, cotangent, args.steps)))
        if args.torch:
            rows.append(("PyTorch", torch_timings(x, kernel, cotangent, args.steps)))
        for name, (forward, vjp_x, grad) in rows:
            print(
                f"| {size}x{size}, {c_in} -> {c_out} | {name} | {forward:.2f} | "
                f"{gflop / forward * 1e3:.0f} | {vjp_x:.2f} | {grad:.2f} |"
            )


if __name__ == "__main__":
    main(ARGS)
