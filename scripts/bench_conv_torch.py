"""The multiscale DEQ cell written in PyTorch with the weights of an `imex_deq.nn` cell, for
`bench_conv.py --torch` (needs the `bench` extra). PyTorch computes channels-first
`(N, C, H, W)`; imex-deq channels-last, so inputs and outputs are transposed for the parity
check, outside the timed calls."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import torch
import torch.nn.functional as F
from bench import timing

from imex_deq import nn


def _conv_weight(conv) -> torch.Tensor:
    """The effective `(out, in, kh, kw)` weight of an `nn.Conv2d`, weight-normalised or not."""
    if isinstance(conv, eqx.nn.WeightNorm):
        v = conv.layer.weight
        weight = v * conv.g / conv._norm(v)
    else:
        weight = conv.weight
    return torch.from_numpy(np.array(weight))


def _conv_spec(conv) -> tuple[torch.Tensor, int, int]:
    layer = conv.layer if isinstance(conv, eqx.nn.WeightNorm) else conv
    return _conv_weight(conv), layer.stride[0], layer.padding[0][0]


def _group_norm(norm: nn.GroupNorm):
    weight = torch.from_numpy(np.array(norm.weight))
    bias = torch.from_numpy(np.array(norm.bias))
    return lambda x: F.group_norm(x, norm.groups, weight, bias, norm.eps)


def _conv_norm(layer: nn.ConvNorm):
    weight, stride, padding = _conv_spec(layer.conv)
    norm = _group_norm(layer.norm)

    def apply(x):
        y = norm(F.conv2d(x, weight, stride=stride, padding=padding))
        return torch.relu(y) if layer.activation else y

    return apply


def _residual_block(block: nn.ResidualBlock):
    w1, _, p1 = _conv_spec(block.conv1)
    w2, _, p2 = _conv_spec(block.conv2)
    norm1, norm2, norm3 = (_group_norm(n) for n in (block.norm1, block.norm2, block.norm3))

    def apply(z, injection):
        h = torch.relu(norm1(F.conv2d(z, w1, padding=p1)))
        h = F.conv2d(h, w2, padding=p2)
        if injection is not None:
            h = h + injection
        return norm3(torch.relu(norm2(h) + z))

    return apply


def _fusion(layer):
    if layer is None:
        return None
    if isinstance(layer, nn.Downsample):
        steps = [_conv_norm(step) for step in layer.layers]

        def down(y, size):
            for step in steps:
                y = step(y)
            return y

        return down
    proj, factor = _conv_norm(layer.proj), 2**layer.levels

    def up(y, size):
        y = proj(y).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        return y[:, :, : size[0], : size[1]]

    return up


def torch_cell(cell: nn.MultiscaleDEQCell):
    """`f(z, x)` on channels-first tensors: z a tuple per branch, x the first branch's
    injection; no dropout (the benchmark's cells have none)."""
    blocks = [_residual_block(b) for b in cell.blocks]
    fuse = [[_fusion(layer) for layer in row] for row in cell.fuse]
    post = [_conv_norm(p) for p in cell.post_fuse] if cell.post_fuse is not None else None

    def f(z, x):
        injections = (x,) + (None,) * (len(z) - 1)
        ys = [block(zi, inj) for block, zi, inj in zip(blocks, z, injections)]
        out = []
        for j, row in enumerate(fuse):
            total = ys[j]
            for i, layer in enumerate(row):
                if layer is not None:
                    total = total + layer(ys[i], z[j].shape[2:])
            total = torch.relu(total)
            out.append(post[j](total) if post is not None else total)
        return tuple(out)

    return f


def _channels_first(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(array), (0, 3, 1, 2))))


def _relative(ours, theirs) -> float:
    ours = np.concatenate([np.transpose(np.asarray(a), (0, 3, 1, 2)).ravel() for a in ours])
    theirs = np.concatenate([t.detach().numpy().ravel() for t in theirs])
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _median_ms(fn, steps: int) -> float:
    fn()  # warm-up
    return timing.median_ms([timing.timed(fn)[1] for _ in range(steps)])


def torch_cell_timings(cell, z, injection, cotangent, steps: int, threads: int) -> dict:
    """Parity of f and its VJP in z against the JAX cell, then PyTorch's timings."""
    torch.set_num_threads(threads)
    f = torch_cell(cell)
    tz = tuple(_channels_first(a) for a in z)
    tx = _channels_first(injection)
    tv = tuple(_channels_first(a) for a in cotangent)
    out = f(tz, tx)
    jax_out = jax.vmap(cell)(z, injection)
    f_diff = _relative(jax_out, out)

    def torch_vjp():
        leaves = tuple(a.clone().requires_grad_(True) for a in tz)
        return torch.autograd.grad(f(leaves, tx), leaves, tv)

    _, pullback = jax.vjp(lambda z: jax.vmap(cell)(z, injection), z)
    vjp_diff = _relative(pullback(cotangent)[0], torch_vjp())
    if max(f_diff, vjp_diff) > 1e-4:
        raise AssertionError(f"PyTorch cell differs: f {f_diff:.2e}, VJP {vjp_diff:.2e}")

    def torch_f():
        with torch.no_grad():
            return f(tz, tx)

    return {
        "torch_f_ms": _median_ms(torch_f, steps),
        "torch_vjp_ms": _median_ms(torch_vjp, steps),
        "parity": f"{f_diff:.1e}, {vjp_diff:.1e}",
        "torch": torch.__version__,
    }
