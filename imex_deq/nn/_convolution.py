"""Channels-last convolutions whose derivative rules land on XLA CPU's fast paths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def conv_nhwc(x, kernel, stride, padding, dilation, groups, kernel_spec="HWIO"):
    """`lax.conv_general_dilated` on an `(N, H, W, C)` batch."""
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
def ungrouped_conv(x, kernel, stride, padding, dilation):
    return conv_nhwc(x, kernel, stride, padding, dilation, 1)


def _ungrouped_conv_jvp(stride, padding, dilation, primals, tangents):
    # Reverse mode transposes this tangent map. JAX's transpose of a convolution in x swaps
    # the kernel's I and O dimension numbers (HWIO -> HWOI), a layout XLA CPU runs on its
    # slow generic path inside loops: 6x the forward's cost in every adjoint iteration.
    # Stating the x-tangent with an I/O-swapped copy of the kernel (HWOI) makes that
    # transpose a canonical HWIO convolution. Symbolic zeros skip the kernel part inside
    # solver and adjoint loops, where the weights are constants.
    x, kernel = primals
    dx, dkernel = tangents
    y = ungrouped_conv(x, kernel, stride, padding, dilation)
    tangent = jnp.zeros_like(y)
    if not isinstance(dx, SymbolicZero):
        swapped = jnp.transpose(kernel, (0, 1, 3, 2))
        tangent += conv_nhwc(dx, swapped, stride, padding, dilation, 1, kernel_spec="HWOI")
    if not isinstance(dkernel, SymbolicZero):
        tangent += conv_nhwc(x, dkernel, stride, padding, dilation, 1)
    return y, tangent


ungrouped_conv.defjvp(_ungrouped_conv_jvp, symbolic_zeros=True)


def pair_packable(x_shape, kernel_shape, stride, padding, dilation, groups) -> bool:
    """Whether `pair_packed_conv` computes this convolution, and pays: a stride-1,
    ungrouped 3x3 convolution, 'same' in width, of an even-width input, with at most 8
    output channels. XLA CPU convolves 8 output channels at about a third of the rate
    it reaches at 16 (128 x 28 x 28, 8 -> 8: 4.9 ms, where 16 -> 16 at twice the
    FLOPs takes 7.5 ms)."""
    return (
        kernel_shape[:2] == (3, 3)
        and kernel_shape[3] <= 8
        and groups == 1
        and stride == (1, 1)
        and dilation == (1, 1)
        and padding[1] == (1, 1)
        and x_shape[-2] % 2 == 0
    )


def _pair_selector() -> np.ndarray:
    """`S[a, p, q, k] = 1` where tap `a` of the packed kernel, input pixel `p` and output
    pixel `q` of a pair meet at tap `k` of the 3-wide kernel."""
    selector = np.zeros((3, 2, 2, 3), np.float32)
    for a in range(3):
        for p in range(2):
            for q in range(2):
                offset = 2 * (a - 1) + p - q  # input column minus output column
                if abs(offset) <= 1:
                    selector[a, p, q, offset + 1] = 1.0
    return selector


def _pair_kernel(kernel):
    """An HWIO `(3, 3, I, O)` kernel as the `(3, 3, 2I, 2O)` kernel of pixel pairs."""
    selector = jnp.asarray(_pair_selector(), kernel.dtype)
    packed = jnp.einsum("apqk,hkio->hapiqo", selector, kernel)
    h, a, p, i, q, o = packed.shape
    return packed.reshape(h, a, p * i, q * o)


def _as_pairs(x):
    """`(N, H, W, C)` -> `(N, H, W / 2, 2C)`: each pair of neighbouring columns as one."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w // 2, 2 * c)


def _same_in_width(height_padding):
    """'Same' padding in width, one column each side: a packed column on pairs, a
    pixel unpacked (the packed kernel's outermost taps are zero where they reach past it)."""
    return (tuple(height_padding), (1, 1))


def _from_pairs(y):
    n, h, half_w, two_c = y.shape
    return y.reshape(n, h, 2 * half_w, two_c // 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def pair_packed_conv(x, kernel, height_padding):
    """A 3x3 stride-1 convolution ('same' in width) computed on pixel pairs.

    Neighbouring columns are packed into the channels (a free reshape), so a narrow
    `I -> O` convolution becomes a `2I -> 2O` one with a sparse `(3, 3, 2I, 2O)` kernel:
    twice the FLOPs, at the rate XLA CPU reaches for wider channels (128 x 28 x 28,
    8 -> 8: 4.9 -> 3.7 ms forward, VJP in x 5.0 -> 3.7 ms). Its weight gradient is taken
    on the unpacked convolution, which is cheaper there.
    """
    padding = _same_in_width(height_padding)
    return _from_pairs(conv_nhwc(_as_pairs(x), _pair_kernel(kernel), (1, 1), padding, (1, 1), 1))


def _pair_packed_conv_jvp(height_padding, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = pair_packed_conv(x, kernel, height_padding)
    padding = _same_in_width(height_padding)
    tangent = jnp.zeros_like(y)
    if not isinstance(dx, SymbolicZero):
        # As in ungrouped_conv: an I/O-swapped kernel makes the transpose canonical HWIO.
        swapped = jnp.transpose(_pair_kernel(kernel), (0, 1, 3, 2))
        packed = conv_nhwc(_as_pairs(dx), swapped, (1, 1), padding, (1, 1), 1, kernel_spec="HWOI")
        tangent += _from_pairs(packed)
    if not isinstance(dkernel, SymbolicZero):
        tangent += conv_nhwc(x, dkernel, (1, 1), padding, (1, 1), 1)
    return y, tangent


pair_packed_conv.defjvp(_pair_packed_conv_jvp, symbolic_zeros=True)
