"""The multiscale DEQ cell, and the whole explicit MNIST-conv classifier, written in PyTorch
with the weights of an `imex_deq.nn` model, for `bench_conv.py --torch` (needs the `bench`
extra). PyTorch computes channels-first `(N, C, H, W)`; imex-deq channels-last, so inputs and
outputs are transposed for the parity checks, outside the timed calls.

Every converter takes `params`: `None` for fixed weights, or a list that collects the
weights as leaf tensors to train (a weight-normalised convolution trains its effective
weight: PyTorch is spared the normalisation, a few thousand multiplies)."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import torch
import torch.nn.functional as F
from bench import timing

from imex_deq import nn


def _tensor(array, params: list | None) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))
    if params is not None:
        params.append(tensor.requires_grad_(True))
    return tensor


def _conv_weight(conv, params) -> torch.Tensor:
    """The effective `(out, in, kh, kw)` weight of an `nn.Conv2d`, weight-normalised or not."""
    if isinstance(conv, eqx.nn.WeightNorm):
        v = conv.layer.weight
        weight = v * conv.g / conv._norm(v)
    else:
        weight = conv.weight
    return _tensor(weight, params)


def _conv_spec(conv, params) -> tuple[torch.Tensor, int, int]:
    layer = conv.layer if isinstance(conv, eqx.nn.WeightNorm) else conv
    return _conv_weight(conv, params), layer.stride[0], layer.padding[0][0]


def _group_norm(norm: nn.GroupNorm, params):
    weight, bias = _tensor(norm.weight, params), _tensor(norm.bias, params)
    return lambda x: F.group_norm(x, norm.groups, weight, bias, norm.eps)


def _conv_norm(layer: nn.ConvNorm, params):
    weight, stride, padding = _conv_spec(layer.conv, params)
    norm = _group_norm(layer.norm, params)

    def apply(x):
        y = norm(F.conv2d(x, weight, stride=stride, padding=padding))
        return torch.relu(y) if layer.activation else y

    return apply


def _residual_block(block: nn.ResidualBlock, params):
    w1, _, p1 = _conv_spec(block.conv1, params)
    w2, _, p2 = _conv_spec(block.conv2, params)
    norm1, norm2, norm3 = (_group_norm(n, params) for n in (block.norm1, block.norm2, block.norm3))

    def apply(z, injection):
        h = torch.relu(norm1(F.conv2d(z, w1, padding=p1)))
        h = F.conv2d(h, w2, padding=p2)
        if injection is not None:
            h = h + injection
        return norm3(torch.relu(norm2(h) + z))

    return apply


def _fusion(layer, params):
    if layer is None:
        return None
    if isinstance(layer, nn.Downsample):
        steps = [_conv_norm(step, params) for step in layer.layers]

        def down(y, size):
            for step in steps:
                y = step(y)
            return y

        return down
    proj, factor = _conv_norm(layer.proj, params), 2**layer.levels

    def up(y, size):
        y = proj(y).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        return y[:, :, : size[0], : size[1]]

    return up


def torch_cell(cell: nn.MultiscaleDEQCell, params: list | None = None):
    """`f(z, x)` on channels-first tensors: z a tuple per branch, x the first branch's
    injection; no dropout (the benchmark's cells have none)."""
    blocks = [_residual_block(b, params) for b in cell.blocks]
    fuse = [[_fusion(layer, params) for layer in row] for row in cell.fuse]
    post = [_conv_norm(p, params) for p in cell.post_fuse] if cell.post_fuse is not None else None

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
    return torch.from_numpy(np.array(np.transpose(np.asarray(array), (0, 3, 1, 2)), order="C"))


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


def torch_classifier(model, state_shapes, params: list):
    """The explicit classifier (stem, f(0, x) once, head) on channels-first images, its
    weights collected in `params`."""
    stem = [_conv_norm(layer, params) for layer in model.embed.layers]
    f = torch_cell(model.layer.f, params)
    head = model.head
    projections = (
        None if head.projections is None else [_conv_norm(p, params) for p in head.projections]
    )
    downs = [_conv_norm(d, params) for d in head.downs]
    final = _conv_norm(head.final, params)
    linears = [head.hidden] if head.hidden is not None else []
    linears = [
        (_tensor(l.weight, params), _tensor(l.bias, params)) for l in linears + [head.output]
    ]

    def forward(images):
        x = images
        for layer in stem:
            x = layer(x)
        zeros = tuple(images.new_zeros((len(images), c, h, w)) for h, w, c in state_shapes)
        z = f(zeros, x)
        if projections is not None:
            z = [p(zi) for p, zi in zip(projections, z)]
        y = z[0]
        for down, zi in zip(downs, z[1:]):
            y = down(y) + zi
        y = final(y)
        # imex-deq flattens (H, W, C); the same order here, so the Linear weights carry over.
        features = y.permute(0, 2, 3, 1).flatten(1) if head.flatten else y.mean((2, 3))
        for i, (weight, bias) in enumerate(linears):
            features = F.linear(features, weight, bias)
            if i < len(linears) - 1:
                features = torch.relu(features)
        return features

    return forward


def torch_plain_cnn(plain, params: list):
    """`bench_conv.PlainCNN` with its weights: convolutions with bias, ReLU, flatten, Linear."""
    convs = [
        (_tensor(c.weight, params), _tensor(c.bias.reshape(-1), params), c.stride[0])
        for c in plain.convs
    ]
    weight, bias = _tensor(plain.linear.weight, params), _tensor(plain.linear.bias, params)

    def forward(images):
        x = images
        for w, b, stride in convs:
            x = torch.relu(F.conv2d(x, w, b, stride=stride, padding=1))
        return F.linear(x.flatten(1), weight, bias)

    return forward


def _adam_step_ms(forward, params, images, labels, steps: int) -> float:
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(images), labels).backward()
        optimizer.step()

    return _median_ms(step, steps)


def torch_step_timings(
    plain, explicit, state_shapes, x, y, steps: int, threads: int, rounds: int = 3
) -> dict:
    """One Adam training step of the plain CNN and of the explicit classifier in PyTorch,
    same weights, after a parity check of both networks' logits against JAX's; the two
    timed in `rounds` alternating rounds (median of the rounds' medians)."""
    torch.set_num_threads(threads)
    images, labels = _channels_first(x), torch.from_numpy(np.array(y)).long()
    networks, row = {}, {}
    for name, model, convert in (
        ("plain", plain, torch_plain_cnn),
        ("explicit", explicit, lambda m, p: torch_classifier(m, state_shapes, p)),
    ):
        params: list = []
        forward = convert(model, params)
        with torch.no_grad():
            theirs = forward(images).numpy()
        ours = np.asarray(jax.vmap(model)(x))
        difference = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
        if difference > 1e-4:
            raise AssertionError(f"PyTorch {name} network differs: logits {difference:.2e}")
        networks[name] = (forward, params)
        row[f"torch_{name}_parity"] = difference
    rounds_ms = {name: [] for name in networks}
    for _ in range(rounds):
        for name, (forward, params) in networks.items():
            rounds_ms[name].append(_adam_step_ms(forward, params, images, labels, steps))
    for name, times in rounds_ms.items():
        row[f"torch_{name}_step_ms"] = float(np.median(times))
        row[f"torch_{name}_rounds_ms"] = times
    return row
