"""Convolutional building blocks (one sample, channels-last `(H, W, C)`)."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._convolution import conv_nhwc, pair_packable, pair_packed_conv, ungrouped_conv
from ._dropout import apply_mask
from ._weight_norm import weight_norm as _weight_norm


class Conv2d(eqx.Module):
    """A 2-D convolution on one channels-last `(H, W, C)` sample.

    Parameters are stored as in [`equinox.nn.Conv2d`][] (`weight` is `(out, in / groups,
    kh, kw)`, so [`equinox.nn.WeightNorm`][] normalises per output channel) and
    initialised the same way. Channels-last is the layout XLA's CPU backend convolves
    fastest, inside solver loops too (channels-first convolutions in a loop body take a
    generic path about 7x slower, jax-ml/jax#12868). For ungrouped convolutions the
    derivative rule is written so that reverse mode (the adjoint's VJPs and the weight
    gradient) also lands on fast paths; forward mode (`jax.jvp`) gives the same values.
    """

    weight: Array
    bias: Array | None
    stride: tuple[int, int] = eqx.field(static=True)
    padding: tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)
    dilation: tuple[int, int] = eqx.field(static=True)
    groups: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        use_bias: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channel counts.
        - `kernel_size`: square kernel size.
        - `stride`, `padding` (zeros; per side or `((top, bottom), (left, right))`),
            `dilation`, `groups`: as in [`equinox.nn.Conv2d`][].
        - `use_bias`: add a per-channel bias.
        - `key`: PRNG key for the initialisation.
        """
        reference = eqx.nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            use_bias=use_bias,
            key=key,
        )
        self.weight = reference.weight
        self.bias = reference.bias[:, 0, 0] if use_bias else None
        self.stride = tuple(reference.stride)
        self.padding = tuple(tuple(pair) for pair in reference.padding)
        self.dilation = tuple(reference.dilation)
        self.groups = groups

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, in_channels)` array.
        - `key`: ignored (for compatibility with Equinox layers).

        **Returns:**

        A `(H', W', out_channels)` array.
        """
        if x.ndim != 3:
            raise ValueError(f"Conv2d expects one (H, W, C) sample, got shape {x.shape}.")
        in_channels = self.weight.shape[1] * self.groups
        if x.shape[-1] != in_channels:
            raise ValueError(
                f"Conv2d expects {in_channels} input channels (channels last), "
                f"got an input of shape {x.shape}."
            )
        kernel = jnp.transpose(self.weight, (2, 3, 1, 0))
        if self._is_pointwise():
            # A 1x1 convolution is a matrix product over channels. As a dot, its gradients
            # need no layout transposes: its VJP ran 2-2.5x faster than the convolution's.
            y = jnp.einsum("hwc,co->hwo", x, kernel[0, 0])
        elif pair_packable(
            x.shape, kernel.shape, self.stride, self.padding, self.dilation, self.groups
        ):
            y = pair_packed_conv(x[None], kernel, self.padding[0])[0]
        elif self.groups == 1:
            y = ungrouped_conv(x[None], kernel, self.stride, self.padding, self.dilation)[0]
        else:
            y = conv_nhwc(x[None], kernel, self.stride, self.padding, self.dilation, self.groups)[0]
        return y if self.bias is None else y + self.bias.reshape(1, 1, -1)

    def _is_pointwise(self) -> bool:
        return (
            self.weight.shape[2:] == (1, 1)
            and self.groups == 1
            and self.stride == (1, 1)
            and self.padding == ((0, 0), (0, 0))
        )


class GroupNorm(eqx.Module):
    """Group normalisation of one channels-last `(H, W, C)` sample, with a per-channel
    affine map (weight 1, bias 0 at initialisation), as `equinox.nn.GroupNorm` does
    for channels-first arrays."""

    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    weight: Array
    bias: Array

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        """**Arguments:**

        - `groups`: number of channel groups; must divide `channels`.
        - `channels`: number of channels.
        - `eps`: added to the variance.
        """
        resolve_groups(channels, groups)
        self.groups = groups
        self.eps = eps
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))

    def _group_mean(self, per_channel: Array) -> Array:
        """Average a `(C,)` vector within each group, broadcast back to `(1, 1, C)`."""
        grouped = per_channel.reshape(self.groups, -1)
        return jnp.repeat(jnp.mean(grouped, axis=1), grouped.shape[1]).reshape(1, 1, -1)

    def __call__(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, C)` array.

        **Returns:**

        The normalised array, same shape.
        """
        if x.ndim != 3 or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(
                f"GroupNorm expects one (H, W, {self.weight.shape[0]}) sample (channels "
                f"last), got shape {x.shape}."
            )
        # Per-channel means first, then per group: XLA CPU reduces over the leading
        # (spatial) axes fast, and an (H * W, groups, C / groups) reduction ~5x slower.
        mean = self._group_mean(jnp.mean(x, axis=(0, 1)))
        centred = x - mean
        variance = self._group_mean(jnp.mean(jnp.square(centred), axis=(0, 1)))
        normalised = centred * jax.lax.rsqrt(variance + self.eps)
        return normalised * self.weight.reshape(1, 1, -1) + self.bias.reshape(1, 1, -1)


Conv = Conv2d | eqx.nn.WeightNorm[Conv2d]


def default_groups(channels: int) -> int:
    """The largest divisor of `channels` that is at most 8 (i.e. `min(8, channels)`
    whenever that divides `channels`)."""
    return max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)


def resolve_groups(channels: int, groups: int | None) -> int:
    """Return the GroupNorm group count for `channels`, validating a user choice.

    **Arguments:**

    - `channels`: number of channels to normalise.
    - `groups`: the requested group count, or `None` for [`default_groups`][].

    **Returns:**

    The group count. Raises `ValueError` if `groups` does not divide `channels`.
    """
    if channels < 1:
        raise ValueError(f"channels={channels} must be positive")
    if groups is None:
        return default_groups(channels)
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"GroupNorm groups={groups} must be a positive divisor of channels={channels}"
        )
    return groups


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    weight_norm: bool = False,
    key: PRNGKeyArray,
) -> Conv:
    """A bias-free 'same'-padded convolution (it is always followed by a GroupNorm).

    **Arguments:**

    - `in_channels`, `out_channels`: channel counts.
    - `kernel_size`: an odd kernel size (1 or 3 here).
    - `stride`: 2 halves the spatial size (rounding up).
    - `weight_norm`: wrap the convolution in weight normalisation.
    - `key`: PRNG key for the initialisation.

    **Returns:**

    A [`Conv2d`][imex_deq.nn.Conv2d], possibly inside an [`equinox.nn.WeightNorm`][].
    """
    layer = Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        use_bias=False,
        key=key,
    )
    return _weight_norm(layer) if weight_norm else layer


class ConvNorm(eqx.Module):
    """Convolution -> GroupNorm -> optional ReLU."""

    conv: Conv
    norm: GroupNorm
    activation: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int | None = None,
        activation: bool = True,
        weight_norm: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`, `kernel_size`, `stride`: as for a convolution.
        - `groups`: GroupNorm groups (must divide `out_channels`); `None` for the default.
        - `activation`: apply a ReLU at the end.
        - `weight_norm`: weight-normalise the convolution.
        - `key`: PRNG key.
        """
        groups = resolve_groups(out_channels, groups)
        self.conv = conv(
            in_channels, out_channels, kernel_size, stride=stride, weight_norm=weight_norm, key=key
        )
        self.norm = GroupNorm(groups, out_channels)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(H, W, in_channels)` array.

        **Returns:**

        A `(H', W', out_channels)` array (`H' = ceil(H / stride)`).
        """
        y = self.norm(self.conv(x))
        return jax.nn.relu(y) if self.activation else y


class ResidualBlock(eqx.Module):
    """MDEQ's residual block with input injection (Bai et al. 2020, Fig. 2).

    ```
    h = ReLU(GN1(conv3x3(z)))            # channels -> expansion * channels
    h = GN2(dropout(conv3x3(h)) + x)     # back to channels, plus injection x
    out = GN3(ReLU(h + z))               # residual
    ```
    """

    channels: int = eqx.field(static=True)
    hidden_channels: int = eqx.field(static=True)
    conv1: Conv
    norm1: GroupNorm
    conv2: Conv
    norm2: GroupNorm
    norm3: GroupNorm

    def __init__(
        self,
        channels: int,
        *,
        expansion: int = 1,
        groups: int | None = None,
        weight_norm: bool = True,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `channels`: input = output channels.
        - `expansion`: width multiplier of the hidden layer (MDEQ's `DEQ_EXPAND`;
            5 in the CIFAR/ImageNet models, 1 in the MNIST one).
        - `groups`: GroupNorm groups for all three norms. Must divide `channels`;
            default `min(8, channels)` (or the largest divisor of `channels` below it).
        - `weight_norm`: weight-normalise both convolutions (as MDEQ does).
        - `key`: PRNG key.
        """
        if expansion < 1:
            raise ValueError(f"expansion={expansion} must be a positive integer")
        groups = resolve_groups(channels, groups)
        hidden = expansion * channels
        k1, k2 = jax.random.split(key)
        self.channels = channels
        self.hidden_channels = hidden
        self.conv1 = conv(channels, hidden, 3, weight_norm=weight_norm, key=k1)
        self.norm1 = GroupNorm(groups, hidden)
        self.conv2 = conv(hidden, channels, 3, weight_norm=weight_norm, key=k2)
        self.norm2 = GroupNorm(groups, channels)
        self.norm3 = GroupNorm(groups, channels)

    def __call__(
        self, z: Array, injection: Array | None = None, dropout_mask: Array | None = None
    ) -> Array:
        """**Arguments:**

        - `z`: the `(H, W, channels)` state.
        - `injection`: the input injection, broadcastable to `z`; `None` for none.
        - `dropout_mask`: a fixed [`VariationalDropout`][] mask applied to the
            second convolution's output (e.g. shape `(1, 1, channels)`); `None` for none.

        **Returns:**

        A `(H, W, channels)` array.
        """
        h = jax.nn.relu(self.norm1(self.conv1(z)))
        h = apply_mask(self.conv2(h), dropout_mask)
        if injection is not None:
            h = h + injection
        h = self.norm2(h)
        return self.norm3(jax.nn.relu(h + z))
