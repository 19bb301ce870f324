"""Multiscale DEQ (MDEQ, Bai et al. 2020) pieces and the Skip DEQ predictor.

Everything works on ONE sample with channels-last arrays; batch with `jax.vmap`.
The DEQ state is a tuple with one `(H_i, W_i, C_i)` array per branch, where
branch `i + 1` has half the spatial size of branch `i` (rounded up).

Typical composition (the DEQ solver lives elsewhere):

```python
model = build_multiscale_model(experiments.cifar_small(), key)
x_inj = model.inject(image)                  # (H_1, W_1, C_1)
z0 = model.predictor(x_inj)                  # Skip DEQ; or model.zero_state(x_inj)
z_star = solve(model.cell, z0, x_inj)        # fixed point of z = cell(z, x_inj)
logits = model.classify(z_star)
```
"""

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._blocks import ConvNorm, ResidualBlock, resolve_groups
from ._dropout import VariationalDropout

Shape3 = tuple[int, int, int]


def branch_shapes(channels: Sequence[int], spatial: tuple[int, int]) -> tuple[Shape3, ...]:
    """The `(H_i, W_i, C_i)` shape of every branch.

    **Arguments:**

    - `channels`: channels per branch.
    - `spatial`: `(H, W)` of the first branch.

    **Returns:**

    One shape per branch; each branch halves (rounding up, as a stride-2
    3x3 convolution with padding 1 does) the previous branch's spatial size.
    """
    h, w = spatial
    shapes = []
    for c in channels:
        shapes.append((h, w, c))
        h, w = -(-h // 2), -(-w // 2)
    return tuple(shapes)


def _validate_channels(channels: Sequence[int], groups: int | None) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if len(channels) == 0:
        raise ValueError("channels must name at least one branch")
    for c in channels:
        resolve_groups(c, groups)
    return channels


class Downsample(eqx.Module):
    """Branch `i` -> lower-resolution branch `j > i`: one stride-2 3x3 conv per halving.

    As in MDEQ, the intermediate convolutions keep the input's channels and are
    followed by GroupNorm + ReLU; the last one maps to the output channels and is
    followed by GroupNorm only.
    """

    layers: tuple[ConvNorm, ...]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        levels: int,
        *,
        groups: int | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channels of the source and target branch.
        - `levels`: number of halvings (`j - i`), at least 1.
        - `groups`: GroupNorm groups; `None` for the default.
        - `key`: PRNG key.
        """
        if levels < 1:
            raise ValueError(f"levels={levels} must be at least 1")
        keys = jax.random.split(key, levels)
        layers = []
        for k in range(levels):
            last = k == levels - 1
            layers.append(
                ConvNorm(
                    in_channels,
                    out_channels if last else in_channels,
                    3,
                    stride=2,
                    groups=groups,
                    activation=not last,
                    key=keys[k],
                )
            )
        self.layers = tuple(layers)

    def __call__(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, in_channels)` array.

        **Returns:**

        A `(H / 2**levels, W / 2**levels, out_channels)` array (rounded up).
        """
        for layer in self.layers:
            x = layer(x)
        return x


class Upsample(eqx.Module):
    """Branch `j` -> higher-resolution branch `i < j`: 1x1 conv, GroupNorm, nearest up-sampling."""

    proj: ConvNorm
    levels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        levels: int,
        *,
        groups: int | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channels of the source and target branch.
        - `levels`: number of doublings (`j - i`), at least 1.
        - `groups`: GroupNorm groups; `None` for the default.
        - `key`: PRNG key.
        """
        if levels < 1:
            raise ValueError(f"levels={levels} must be at least 1")
        self.proj = ConvNorm(in_channels, out_channels, 1, groups=groups, activation=False, key=key)
        self.levels = levels

    def __call__(self, x: Array, size: tuple[int, int]) -> Array:
        """**Arguments:**

        - `x`: a `(h, w, in_channels)` array.
        - `size`: the target `(H, W)`; `H <= h * 2**levels` (crops odd sizes).

        **Returns:**

        A `(H, W, out_channels)` array; pixel `(a, b)` copies `(a // 2**levels, b // 2**levels)`.
        """
        y = self.proj(x)
        factor = 2**self.levels
        y = jnp.repeat(jnp.repeat(y, factor, axis=0), factor, axis=1)
        return y[: size[0], : size[1]]


def _fusion_layer(
    channels: tuple[int, ...], src: int, dst: int, groups: int | None, key: PRNGKeyArray
) -> Downsample | Upsample | None:
    if src == dst:
        return None
    if src < dst:
        return Downsample(channels[src], channels[dst], dst - src, groups=groups, key=key)
    return Upsample(channels[src], channels[dst], src - dst, groups=groups, key=key)


class MultiscaleDEQCell(eqx.Module):
    """The MDEQ layer `f(z, x)`: a residual block per branch, then multi-resolution fusion.

    ```
    y_i   = ResidualBlock_i(z_i, x_i)                     # x_i: injection (0 if absent)
    out_j = PostFuse_j(ReLU(y_j + sum_{i != j} F_ji(y_i)))
    ```

    `F_ji` is a [`Downsample`][] for `i < j` and an [`Upsample`][] for `i > j`.
    `PostFuse_j` is MDEQ's 1x1 conv + GroupNorm (`post_fuse=True`) or the identity.
    """

    channels: tuple[int, ...] = eqx.field(static=True)
    blocks: tuple[ResidualBlock, ...]
    fuse: tuple[tuple[Downsample | Upsample | None, ...], ...]
    post_fuse: tuple[ConvNorm, ...] | None
    dropout: VariationalDropout

    def __init__(
        self,
        channels: Sequence[int],
        *,
        expansion: int = 1,
        groups: int | None = None,
        weight_norm: bool = True,
        dropout: float = 0.0,
        post_fuse: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: channels per branch `(c_1, c_2, ...)`; branch `i + 1` has half
            the spatial size of branch `i`.
        - `expansion`: hidden-width multiplier of each [`ResidualBlock`][].
        - `groups`: GroupNorm groups everywhere (must divide every channel count);
            `None` for `min(8, c)`.
        - `weight_norm`: weight-normalise the residual blocks' and post-fusion convolutions.
        - `dropout`: [`VariationalDropout`][] rate of the residual blocks.
        - `post_fuse`: apply MDEQ's 1x1 conv + GroupNorm after the fused ReLU.
        - `key`: PRNG key.
        """
        channels = _validate_channels(channels, groups)
        n = len(channels)
        kb, kf, kp = jax.random.split(key, 3)
        self.channels = channels
        self.blocks = tuple(
            ResidualBlock(c, expansion=expansion, groups=groups, weight_norm=weight_norm, key=k)
            for c, k in zip(channels, jax.random.split(kb, n))
        )
        fkeys = jax.random.split(kf, (n, n))
        self.fuse = tuple(
            tuple(_fusion_layer(channels, i, j, groups, fkeys[j, i]) for i in range(n))
            for j in range(n)
        )
        self.post_fuse = (
            tuple(
                ConvNorm(c, c, 1, groups=groups, activation=False, weight_norm=weight_norm, key=k)
                for c, k in zip(channels, jax.random.split(kp, n))
            )
            if post_fuse
            else None
        )
        self.dropout = VariationalDropout(dropout)

    @property
    def dropout_rate(self) -> float:
        """The variational-dropout rate (0 for none)."""
        return self.dropout.p

    def sample_dropout_masks(self, key: PRNGKeyArray) -> tuple[Array, ...] | None:
        """Draw the per-branch variational-dropout masks for one forward solve.

        Draw them before the solve and pass them to every call
        (`cell(z, x, masks)`), so the map stays fixed across iterations. Under
        `jax.vmap`, map over a batch of keys for per-sample masks.

        **Arguments:**

        - `key`: PRNG key.

        **Returns:**

        One `(1, 1, c_i)` channel mask per branch, or `None` when `dropout == 0`.
        """
        if self.dropout.p == 0.0:
            return None
        keys = jax.random.split(key, len(self.channels))
        return tuple(self.dropout.sample_mask((1, 1, c), k) for c, k in zip(self.channels, keys))

    def _injections(self, x: Array | Sequence[Array | None]) -> tuple[Array | None, ...]:
        n = len(self.channels)
        if isinstance(x, (tuple, list)):
            if len(x) != n:
                raise ValueError(f"got {len(x)} injections for {n} branches")
            return tuple(x)
        return (x,) + (None,) * (n - 1)

    def __call__(
        self,
        z: Sequence[Array],
        x: Array | Sequence[Array | None],
        dropout_masks: Sequence[Array] | None = None,
    ) -> tuple[Array, ...]:
        """**Arguments:**

        - `z`: the state, a tuple of `(H_i, W_i, c_i)` arrays.
        - `x`: the injection: one array shaped like `z[0]` (injected into the first
            branch, as MDEQ does), or a tuple with one array (or `None`) per branch.
        - `dropout_masks`: the output of [`MultiscaleDEQCell.sample_dropout_masks`][],
            or `None` (inference / no dropout).

        **Returns:**

        The new state, with the same structure, shapes and dtypes as `z`.
        """
        n = len(self.channels)
        if len(z) != n:
            raise ValueError(f"state has {len(z)} branches, the cell has {n}")
        injections = self._injections(x)
        masks = (None,) * n if dropout_masks is None else tuple(dropout_masks)
        ys = [blk(zi, inj, m) for blk, zi, inj, m in zip(self.blocks, z, injections, masks)]
        out = []
        for j in range(n):
            total = ys[j]
            for i in range(n):
                layer = self.fuse[j][i]
                if isinstance(layer, Upsample):
                    total = total + layer(ys[i], z[j].shape[:2])
                elif layer is not None:
                    total = total + layer(ys[i])
            total = jax.nn.relu(total)
            if self.post_fuse is not None:
                total = self.post_fuse[j](total)
            out.append(total)
        return tuple(out)


class MultiscaleSkipPredictor(eqx.Module):
    """Skip DEQ's explicit predictor `g(x)` of the initial multiscale state.

    `z_1 = ResidualBlock(x)`, then `z_{i+1} = Downsample(z_i)` (one stride-2 conv each),
    following the `shortcut` of Pal et al.'s multiscale Skip DEQ.
    """

    channels: tuple[int, ...] = eqx.field(static=True)
    block: ResidualBlock
    downsamples: tuple[Downsample, ...]

    def __init__(
        self,
        channels: Sequence[int],
        *,
        expansion: int = 1,
        groups: int | None = None,
        weight_norm: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: channels per branch, as for [`MultiscaleDEQCell`][].
        - `expansion`, `groups`, `weight_norm`: as for the first branch's [`ResidualBlock`][].
        - `key`: PRNG key.
        """
        channels = _validate_channels(channels, groups)
        kb, kd = jax.random.split(key)
        self.channels = channels
        self.block = ResidualBlock(
            channels[0], expansion=expansion, groups=groups, weight_norm=weight_norm, key=kb
        )
        dkeys = jax.random.split(kd, max(len(channels) - 1, 1))
        self.downsamples = tuple(
            Downsample(channels[i], channels[i + 1], 1, groups=groups, key=dkeys[i])
            for i in range(len(channels) - 1)
        )

    def __call__(self, x: Array | Sequence[Array | None]) -> tuple[Array, ...]:
        """**Arguments:**

        - `x`: the injection of the first branch (shape `(H, W, c_1)`), or the
            per-branch tuple given to the cell (only its first entry is used).

        **Returns:**

        A tuple of `(H_i, W_i, c_i)` arrays, the same structure as the DEQ state.
        """
        x0 = x[0] if isinstance(x, (tuple, list)) else x
        z = [self.block(x0)]
        for down in self.downsamples:
            z.append(down(z[-1]))
        return tuple(z)


class Stem(eqx.Module):
    """Input stem: two 3x3 conv-GroupNorm-ReLU layers (optionally stride 2) and MDEQ's
    1x1 injection layer, producing the first branch's injection."""

    layers: tuple[ConvNorm, ...]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_channels: int | None = None,
        downsample_times: int = 0,
        groups: int | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: image channels.
        - `out_channels`: channels of the first branch.
        - `hidden_channels`: width of the two 3x3 convolutions (default `out_channels`).
        - `downsample_times`: 0, 1 or 2 stride-2 convolutions (2 for ImageNet: 224 -> 56).
        - `groups`: GroupNorm groups; `None` for the default.
        - `key`: PRNG key.
        """
        if downsample_times not in (0, 1, 2):
            raise ValueError(f"downsample_times={downsample_times} must be 0, 1 or 2")
        hidden = out_channels if hidden_channels is None else hidden_channels
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = (
            ConvNorm(
                in_channels, hidden, 3, stride=1 + (downsample_times >= 1), groups=groups, key=k1
            ),
            ConvNorm(hidden, hidden, 3, stride=1 + (downsample_times >= 2), groups=groups, key=k2),
            ConvNorm(hidden, out_channels, 1, groups=groups, key=k3),
        )

    def __call__(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, in_channels)` image.

        **Returns:**

        The `(H / 2**downsample_times, W / 2**downsample_times, out_channels)` injection.
        """
        for layer in self.layers:
            x = layer(x)
        return x


class ClassificationHead(eqx.Module):
    """MDEQ's head: optionally project every branch to `head_channels[i]` (1x1
    conv-GroupNorm-ReLU); walk down from the highest-resolution branch with stride-2 3x3
    conv-GroupNorm-ReLU layers, adding each lower-resolution branch on the way; one more
    conv-GroupNorm-ReLU to `final_channels`; then either flatten (keeping the spatial
    layout, for small images) or average-pool; an optional hidden Linear + ReLU; and the
    Linear to the logits.

    With `flatten=True` the last layer is a stride-2 3x3 convolution (as in a plain CNN:
    28 x 28 -> 14 x 14 -> 7 x 7 for MNIST), otherwise a 1x1 convolution (MDEQ's final
    layer before pooling).
    """

    projections: tuple[ConvNorm, ...] | None
    downs: tuple[ConvNorm, ...]
    final: ConvNorm
    hidden: eqx.nn.Linear | None
    output: eqx.nn.Linear
    flatten: bool = eqx.field(static=True)

    def __init__(
        self,
        state_shapes: Sequence[Shape3],
        num_classes: int,
        *,
        final_channels: int,
        head_channels: Sequence[int] | None = None,
        flatten: bool = False,
        hidden_features: int | None = None,
        groups: int | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `state_shapes`: the `(H_i, W_i, C_i)` shape of every branch (`branch_shapes`).
        - `num_classes`: number of logits.
        - `final_channels`: channels of the last convolution.
        - `head_channels`: per-branch widths of 1x1 projections applied first (MDEQ's
            bottleneck widths); `None` walks down the state's own channels.
        - `flatten`: flatten the last feature map instead of average-pooling it.
        - `hidden_features`: width of a hidden Linear layer; `None` for none.
        - `groups`: GroupNorm groups; `None` for the default.
        - `key`: PRNG key.
        """
        shapes = tuple(tuple(s) for s in state_shapes)
        kp, kd, kf, kh, ko = jax.random.split(key, 5)
        channels = [c for _, _, c in shapes]
        if head_channels is None:
            self.projections = None
        else:
            head_channels = tuple(head_channels)
            if len(head_channels) != len(shapes):
                raise ValueError(
                    f"head_channels={head_channels} needs one entry per branch {channels}"
                )
            self.projections = tuple(
                ConvNorm(c, h, 1, groups=groups, key=k)
                for c, h, k in zip(channels, head_channels, jax.random.split(kp, len(shapes)))
            )
            channels = list(head_channels)
        self.downs = tuple(
            ConvNorm(channels[i], channels[i + 1], 3, stride=2, groups=groups, key=k)
            for i, k in zip(range(len(shapes) - 1), jax.random.split(kd, max(len(shapes) - 1, 1)))
        )
        kernel, stride = (3, 2) if flatten else (1, 1)
        self.final = ConvNorm(
            channels[-1], final_channels, kernel, stride=stride, groups=groups, key=kf
        )
        self.flatten = flatten
        if flatten:
            h, w, _ = shapes[-1]
            features = -(-h // 2) * -(-w // 2) * final_channels
        else:
            features = final_channels
        if hidden_features is not None:
            self.hidden = eqx.nn.Linear(features, hidden_features, key=kh)
            features = hidden_features
        else:
            self.hidden = None
        self.output = eqx.nn.Linear(features, num_classes, key=ko)

    def __call__(self, z: Sequence[Array]) -> Array:
        """**Arguments:**

        - `z`: the (equilibrium) state, a tuple of `(H_i, W_i, c_i)` arrays.

        **Returns:**

        The `(num_classes,)` logits.
        """
        if self.projections is not None:
            z = [projection(zi) for projection, zi in zip(self.projections, z)]
        y = z[0]
        for down, zi in zip(self.downs, z[1:]):
            y = down(y) + zi
        y = self.final(y)
        features = jnp.ravel(y) if self.flatten else jnp.mean(y, axis=(0, 1))
        if self.hidden is not None:
            features = jax.nn.relu(self.hidden(features))
        return self.output(features)


@dataclasses.dataclass(frozen=True)
class MultiscaleConfig:
    """Hyper-parameters of a multiscale (Skip) DEQ classifier.

    **Fields:**

    - `channels`: channels per branch.
    - `image_size`: `(H, W)` of the input image.
    - `in_channels`: image channels.
    - `num_classes`: number of logits.
    - `expansion`: hidden-width multiplier of the residual blocks (MDEQ: 5).
    - `groups`: GroupNorm groups (`None`: `min(8, c)`).
    - `weight_norm`: weight-normalise the cell's convolutions.
    - `dropout`: variational-dropout rate inside the cell.
    - `post_fuse`: MDEQ's 1x1 conv + GroupNorm after fusion.
    - `downsample_times`: stride-2 convolutions in the stem (0, 1 or 2).
    - `stem_channels`: width of the stem's 3x3 convolutions (`None`: `channels[0]`).
    - `head_channels`: per-branch 1x1 projection widths of the head (`None`: none).
    - `head_final_channels`: channels of the head's last convolution.
    - `head_flatten`: flatten the head's last feature map (keeps the spatial layout;
      for small images) instead of average-pooling it.
    - `head_features`: hidden Linear width of the head (`None`: none).
    """

    channels: tuple[int, ...]
    image_size: tuple[int, int]
    in_channels: int = 3
    num_classes: int = 10
    expansion: int = 1
    groups: int | None = None
    weight_norm: bool = True
    dropout: float = 0.0
    post_fuse: bool = True
    downsample_times: int = 0
    stem_channels: int | None = None
    head_channels: tuple[int, ...] | None = None
    head_final_channels: int = 64
    head_flatten: bool = False
    head_features: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", _validate_channels(self.channels, self.groups))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.head_channels is not None:
            head = tuple(int(h) for h in self.head_channels)
            if len(head) != len(self.channels):
                raise ValueError(f"head_channels={head} needs one entry per branch {self.channels}")
            object.__setattr__(self, "head_channels", head)
        if len(self.image_size) != 2:
            raise ValueError(f"image_size={self.image_size} must be (H, W)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.downsample_times not in (0, 1, 2):
            raise ValueError(f"downsample_times={self.downsample_times} must be 0, 1 or 2")

    @property
    def state_shapes(self) -> tuple[Shape3, ...]:
        """The `(H_i, W_i, C_i)` shape of every branch of the DEQ state."""
        h, w = self.image_size
        for _ in range(self.downsample_times):
            h, w = -(-h // 2), -(-w // 2)
        return branch_shapes(self.channels, (h, w))


class MultiscaleModel(eqx.Module):
    """The pieces of a multiscale (Skip) DEQ classifier; compose them with a DEQ solver.

    `stem` -> injection `x`; `predictor(x)` (or `zero_state(x)`) -> `z0`;
    `cell(z, x)` is the DEQ map; `classify(z*)` -> logits.
    """

    stem: Stem
    cell: MultiscaleDEQCell
    predictor: MultiscaleSkipPredictor | None
    head: ClassificationHead
    config: MultiscaleConfig = eqx.field(static=True)

    def inject(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, in_channels)` image.

        **Returns:**

        The first branch's injection, shaped like the state's first branch.
        """
        return self.stem(x)

    def zero_state(self, injection: Array) -> tuple[Array, ...]:
        """**Arguments:**

        - `injection`: the output of [`MultiscaleModel.inject`][].

        **Returns:**

        The all-zeros state (a vanilla DEQ's initial guess), one array per branch.
        """
        shapes = branch_shapes(self.cell.channels, injection.shape[:2])
        return tuple(jnp.zeros(s, injection.dtype) for s in shapes)

    def classify(self, z: Sequence[Array]) -> Array:
        """**Arguments:**

        - `z`: the equilibrium state.

        **Returns:**

        The `(num_classes,)` logits.
        """
        return self.head(z)


def build_multiscale_model(
    config: MultiscaleConfig, key: PRNGKeyArray, *, with_predictor: bool = True
) -> MultiscaleModel:
    """Build the stem, cell, Skip DEQ predictor and head described by `config`.

    **Arguments:**

    - `config`: a [`MultiscaleConfig`][], e.g. `imex_deq.experiments.cifar_small()`.
    - `key`: PRNG key.
    - `with_predictor`: build the Skip DEQ predictor (`False` for a vanilla DEQ,
        whose `predictor` is then `None`).

    **Returns:**

    A [`MultiscaleModel`][].
    """
    ks, kc, kp, kh = jax.random.split(key, 4)
    c = config
    stem = Stem(
        c.in_channels,
        c.channels[0],
        hidden_channels=c.stem_channels,
        downsample_times=c.downsample_times,
        groups=c.groups,
        key=ks,
    )
    cell = MultiscaleDEQCell(
        c.channels,
        expansion=c.expansion,
        groups=c.groups,
        weight_norm=c.weight_norm,
        dropout=c.dropout,
        post_fuse=c.post_fuse,
        key=kc,
    )
    predictor = (
        MultiscaleSkipPredictor(
            c.channels, expansion=c.expansion, groups=c.groups, weight_norm=c.weight_norm, key=kp
        )
        if with_predictor
        else None
    )
    head = ClassificationHead(
        c.state_shapes,
        c.num_classes,
        final_channels=c.head_final_channels,
        head_channels=c.head_channels,
        flatten=c.head_flatten,
        hidden_features=c.head_features,
        groups=c.groups,
        key=kh,
    )
    return MultiscaleModel(stem=stem, cell=cell, predictor=predictor, head=head, config=c)


def _is_parameter(leaf: object) -> bool:
    if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return bool(jnp.issubdtype(leaf.dtype, jnp.inexact))
    return False


def count_parameters(module: PyTree) -> int:
    """Number of trainable scalars: the total size of the floating-point array leaves.

    Works on real modules and on the `jax.ShapeDtypeStruct` leaves returned by
    `eqx.filter_eval_shape` (so large models can be counted without allocating them).

    **Arguments:**

    - `module`: any PyTree, e.g. an Equinox module.

    **Returns:**

    The parameter count.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(module) if _is_parameter(leaf))
