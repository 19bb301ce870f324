"""Convolutional building blocks (one sample, channels-first `(C, H, W)`)."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ._dropout import apply_mask
from ._weight_norm import weight_norm as _weight_norm


def _conv_nhwc(x, kernel, stride, padding, dilation, groups, kernel_spec="HWIO"):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=("NHWC", kernel_spec, "NHWC"),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _ungrouped_conv(x, kernel, stride, padding, dilation):
    return _conv_nhwc(x, kernel, stride, padding, dilation, 1)


@_ungrouped_conv.defjvp
def _ungrouped_conv_jvp(stride, padding, dilation, primals, tangents):
    # Reverse mode transposes the tangent map. JAX's transpose of a convolution in x swaps
    # the kernel's I and O dimension numbers (HWIO -> HWOI), a layout XLA CPU runs on its
    # slow generic path inside loops: 6x the forward's cost in every adjoint iteration.
    # Stating the x-tangent with an I/O-swapped copy of the kernel (HWOI) makes that
    # transpose a canonical HWIO convolution; the primal stays canonical too.
    x, kernel = primals
    dx, dkernel = tangents
    swapped = jnp.transpose(kernel, (0, 1, 3, 2))
    tangent = _conv_nhwc(dx, swapped, stride, padding, dilation, 1, kernel_spec="HWOI")
    tangent = tangent + _conv_nhwc(x, dkernel, stride, padding, dilation, 1)
    return _ungrouped_conv(x, kernel, stride, padding, dilation), tangent


class Conv2d(eqx.nn.Conv2d):
    """[`equinox.nn.Conv2d`][] (same parameters, same `(C, H, W)` input and output) that
    computes in channels-last layout.

    XLA's CPU backend runs a channels-first convolution inside a loop body (every DEQ
    solver and adjoint loop) on a slow generic path, about 7x slower than outside a loop
    (jax-ml/jax#12868); channels-last convolutions take the fast path everywhere. For
    ungrouped convolutions the input gradient is also a canonical channels-last
    convolution (JAX's own transpose rule lands on the slow path); forward-mode
    derivatives (`jax.jvp`, used by `NewtonKrylov`) of it are slower instead.
    """

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        if x.ndim != 3:
            raise ValueError(f"Conv2d expects one (C, H, W) sample, got shape {x.shape}.")
        if self.padding_mode != "ZEROS":
            raise ValueError(f"Conv2d supports zero padding only, got {self.padding_mode}.")
        x = jnp.transpose(x, (1, 2, 0))[None]
        kernel = jnp.transpose(self.weight, (2, 3, 1, 0))
        padding = tuple(tuple(pair) for pair in self.padding)
        stride, dilation = tuple(self.stride), tuple(self.dilation)
        if self.groups == 1:
            y = _ungrouped_conv(x, kernel, stride, padding, dilation)[0]
        else:
            y = _conv_nhwc(x, kernel, stride, padding, dilation, self.groups)[0]
        if self.use_bias:
            y = y + self.bias[:, 0, 0][None, None, :]
        return jnp.transpose(y, (2, 0, 1))


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
    norm: eqx.nn.GroupNorm
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
        self.norm = eqx.nn.GroupNorm(groups, out_channels)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        """**Arguments:**

        - `x`: a `(in_channels, H, W)` array.

        **Returns:**

        A `(out_channels, H', W')` array (`H' = ceil(H / stride)`).
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
    norm1: eqx.nn.GroupNorm
    conv2: Conv
    norm2: eqx.nn.GroupNorm
    norm3: eqx.nn.GroupNorm

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
        self.norm1 = eqx.nn.GroupNorm(groups, hidden)
        self.conv2 = conv(hidden, channels, 3, weight_norm=weight_norm, key=k2)
        self.norm2 = eqx.nn.GroupNorm(groups, channels)
        self.norm3 = eqx.nn.GroupNorm(groups, channels)

    def __call__(
        self, z: Array, injection: Array | None = None, dropout_mask: Array | None = None
    ) -> Array:
        """**Arguments:**

        - `z`: the `(channels, H, W)` state.
        - `injection`: the input injection, broadcastable to `z`; `None` for none.
        - `dropout_mask`: a fixed [`VariationalDropout`][] mask applied to the
            second convolution's output (e.g. shape `(channels, 1, 1)`); `None` for none.

        **Returns:**

        A `(channels, H, W)` array.
        """
        h = jax.nn.relu(self.norm1(self.conv1(z)))
        h = apply_mask(self.conv2(h), dropout_mask)
        if injection is not None:
            h = h + injection
        h = self.norm2(h)
        return self.norm3(jax.nn.relu(h + z))
