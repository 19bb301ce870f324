"""Tests of `imex_deq.nn`. Shapes and parameter counts use `eqx.filter_eval_shape`
(no allocation, no compilation); only the contraction and weight-norm tests compute."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imex_deq import experiments as presets
from imex_deq import nn

KEY = jax.random.key(0)


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _state(shapes, dtype=jnp.float32):
    return tuple(jax.ShapeDtypeStruct(s, dtype) for s in shapes)


@pytest.mark.parametrize(
    "channels, spatial",
    [((4, 8), (8, 8)), ((4, 8, 8), (8, 8)), ((4, 4, 8), (7, 9))],
)
def test_cell_output_matches_state(channels, spatial):
    shapes = nn.branch_shapes(channels, spatial)
    cell = eqx.filter_eval_shape(nn.MultiscaleDEQCell, channels, expansion=2, key=KEY)
    z = _state(shapes)
    x = jax.ShapeDtypeStruct(shapes[0], jnp.float32)
    out = eqx.filter_eval_shape(lambda c, z, x: c(z, x), cell, z, x)
    assert isinstance(out, tuple)
    assert _shapes(out) == _shapes(z)
    # Per-branch injections and a batch through jax.vmap.
    xs = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    out = eqx.filter_eval_shape(lambda c, z, x: c(z, x), cell, z, xs)
    assert _shapes(out) == _shapes(z)
    zb = _state([(2, *s) for s in shapes])
    xb = jax.ShapeDtypeStruct((2, *shapes[0]), jnp.float32)
    out = eqx.filter_eval_shape(lambda c, z, x: jax.vmap(c)(z, x), cell, zb, xb)
    assert _shapes(out) == _shapes(zb)


def test_cell_rejects_wrong_branch_count():
    cell = eqx.filter_eval_shape(nn.MultiscaleDEQCell, (4, 8), key=KEY)
    z = _state(nn.branch_shapes((4, 8, 8), (8, 8)))
    with pytest.raises(ValueError, match="branches"):
        eqx.filter_eval_shape(lambda c, z: c(z, z[0]), cell, z)


def test_variational_dropout_mask_is_fixed():
    drop = nn.VariationalDropout(0.5)
    k = jax.random.key(3)
    mask = drop.sample_mask((1, 1, 16), k)
    assert jnp.array_equal(mask, drop.sample_mask((1, 1, 16), k))
    assert set(np.unique(np.asarray(mask)).tolist()) <= {0.0, 2.0}
    x = jax.random.normal(jax.random.key(1), (4, 4, 16))
    y1, y2 = drop.apply(x, mask), drop(x, mask)
    assert jnp.array_equal(y1, y2)
    assert jnp.array_equal(y1, x * mask)
    # Inference mode is the identity.
    assert drop(x, None) is x
    assert nn.VariationalDropout(0.0)(x, mask) is x
    assert jnp.array_equal(nn.VariationalDropout(0.0).sample_mask((3,), k), jnp.ones(3))
    with pytest.raises(ValueError, match="p=1"):
        nn.VariationalDropout(1.0)


def test_cell_dropout_masks():
    cell = eqx.filter_eval_shape(nn.MultiscaleDEQCell, (4, 8), dropout=0.25, key=KEY)
    masks = cell.sample_dropout_masks(jax.random.key(1))
    assert [m.shape for m in masks] == [(1, 1, 4), (1, 1, 8)]
    assert all(
        jnp.array_equal(a, b) for a, b in zip(masks, cell.sample_dropout_masks(jax.random.key(1)))
    )
    no_drop = eqx.filter_eval_shape(nn.MultiscaleDEQCell, (4, 8), key=KEY)
    assert no_drop.sample_dropout_masks(jax.random.key(1)) is None


def test_groups_validation():
    with pytest.raises(ValueError, match=r"groups=5.*channels=12"):
        nn.ResidualBlock(12, groups=5, key=KEY)
    with pytest.raises(ValueError, match=r"groups=3.*channels=8"):
        nn.MultiscaleDEQCell((6, 8), groups=3, key=KEY)
    assert nn.default_groups(24) == 8
    assert nn.default_groups(4) == 4
    assert nn.default_groups(12) == 6


def test_misspelt_option_is_type_error():
    with pytest.raises(TypeError):
        nn.ResidualBlock(8, grups=4, key=KEY)
    with pytest.raises(TypeError):
        nn.MultiscaleConfig(channels=(8,), image_size=(8, 8), expansoin=2)


# The papers (Pal et al. 2022 for CIFAR-10; MDEQ, Bai et al. 2020, for ImageNet) report
# 164K, 10.6M and 18M parameters.
# Our stem, cell and Skip predictor follow their code; the classification head walks
# down the branches as theirs (MDEQ/HRNet) does, with 1x1 projections in place of its
# bottleneck blocks. Measured (vanilla model, i.e. without the Skip predictor):
#   cifar_small 154,610 (-6%), cifar_large 10,539,514 (-1%),
#   imagenet_small 16,133,448 (-10%: 1x1 projections are lighter than bottleneck blocks).
@pytest.mark.parametrize(
    "config, paper, band",
    [
        (presets.cifar_small, 164e3, 0.2),
        (presets.cifar_large, 10.6e6, 0.1),
        (presets.imagenet_small, 18e6, 0.2),
    ],
)
def test_parameter_counts(config, paper, band):
    model = eqx.filter_eval_shape(nn.build_multiscale_model, config(), KEY, with_predictor=False)
    count = nn.count_parameters(model)
    assert abs(count - paper) <= band * paper, count
    skip = eqx.filter_eval_shape(nn.build_multiscale_model, config(), KEY)
    assert nn.count_parameters(skip) == count + nn.count_parameters(skip.predictor)


def test_count_parameters_real_arrays():
    block = nn.ResidualBlock(8, weight_norm=False, key=KEY)
    # 2 convs 8*8*9, 3 GroupNorms with weight and bias of 8.
    assert nn.count_parameters(block) == 2 * 8 * 8 * 9 + 3 * 2 * 8
    assert nn.count_parameters({"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros((2, 2))}) == 4


def test_mnist_model_structure():
    config = presets.mnist_conv()
    assert config.state_shapes == ((28, 28, 8), (14, 14, 16))
    model = eqx.filter_eval_shape(nn.build_multiscale_model, config, KEY)
    image = jax.ShapeDtypeStruct((28, 28, 1), jnp.float32)
    injection = eqx.filter_eval_shape(lambda m, x: m.inject(x), model, image)
    assert injection.shape == (28, 28, 8)
    z0 = eqx.filter_eval_shape(lambda m, x: m.zero_state(x), model, injection)
    zp = eqx.filter_eval_shape(lambda m, x: m.predictor(x), model, injection)
    assert jax.tree.structure(zp) == jax.tree.structure(z0)
    assert _shapes(zp) == _shapes(z0)
    assert tuple(a.shape for a in z0) == config.state_shapes
    z1 = eqx.filter_eval_shape(lambda m, z, x: m.cell(z, x), model, zp, injection)
    assert _shapes(z1) == _shapes(z0)
    logits = eqx.filter_eval_shape(lambda m, z: m.classify(z), model, z1)
    assert logits.shape == (10,)


def test_imagenet_state_shapes():
    assert presets.imagenet_small().state_shapes == (
        (56, 56, 32),
        (28, 28, 64),
        (14, 14, 128),
        (7, 7, 256),
    )


def test_weight_norm_matches_layer_at_init():
    conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=KEY)
    wn = nn.weight_norm(conv)
    x = jax.random.normal(jax.random.key(1), (2, 5, 5))
    np.testing.assert_allclose(wn(x), conv(x), rtol=1e-5, atol=1e-5)
    assert wn.g.shape == (3, 1, 1, 1)


def test_tiny_cell_iteration_stays_finite():
    channels, spatial = (4, 8), (8, 8)
    cell = nn.MultiscaleDEQCell(channels, groups=2, dropout=0.25, key=KEY)
    x = jax.random.normal(jax.random.key(1), (*spatial, 4))
    masks = cell.sample_dropout_masks(jax.random.key(2))

    @eqx.filter_jit
    def run(cell, x, masks):
        z0 = tuple(jnp.zeros(s) for s in nn.branch_shapes(channels, spatial))
        z = jax.lax.fori_loop(0, 30, lambda _, z: cell(z, x, masks), z0)
        # The same mask gives the same map: two evaluations agree exactly.
        return z, cell(z, x, masks), cell(z, x, masks)

    z, f1, f2 = run(cell, x, masks)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in z)
    assert all(jnp.array_equal(a, b) for a, b in zip(f1, f2))
    assert max(float(jnp.max(jnp.abs(a))) for a in z) < 1e3


@pytest.mark.parametrize(
    "stride,kernel,bias,width",
    [(1, 3, False, 13), (1, 3, True, 14), (2, 3, True, 13), (1, 1, False, 13), (1, 1, True, 13)],
)
def test_channels_last_conv_matches_equinox(stride, kernel, bias, width):
    options = dict(stride=stride, padding=kernel // 2, use_bias=bias, key=jax.random.PRNGKey(1))
    reference = eqx.nn.Conv2d(5, 7, kernel, **options)
    ours = nn.Conv2d(5, 7, kernel, **options)
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 15, width))
    channels_last = jnp.transpose(x, (1, 2, 0))
    np.testing.assert_allclose(
        ours(channels_last), jnp.transpose(reference(x), (1, 2, 0)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "kernel,stride,dilation,padding,groups",
    [
        (3, 1, 1, 1, 1),
        (3, 2, 1, 1, 1),
        (3, 1, 2, ((0, 2), (2, 1)), 1),
        (3, (2, 1), (1, 2), 2, 1),
        (3, 1, 1, 1, 2),
        (1, 1, 1, 0, 1),  # pointwise: computed as a matrix product
        (1, 2, 1, 0, 1),  # strided 1x1: a convolution again
        (3, 1, 1, ((0, 2), (1, 1)), 1),  # on pixel pairs, asymmetric height padding
    ],
)
def test_channels_last_conv_derivatives_match_equinox(kernel, stride, dilation, padding, groups):
    """Its custom tangent rule (for a fast transpose) and its pointwise matrix-product path
    give the same reverse- and forward-mode derivatives as equinox's channels-first
    convolution, for every parameter and the input."""
    options = dict(stride=stride, dilation=dilation, padding=padding, groups=groups)
    reference = eqx.nn.Conv2d(4, 6, kernel, **options, key=jax.random.PRNGKey(1))
    ours = nn.Conv2d(4, 6, kernel, **options, key=jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 11, 10))
    direction = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    def channels_first(conv):
        if isinstance(conv, nn.Conv2d):
            return lambda x: jnp.transpose(conv(jnp.transpose(x, (1, 2, 0))), (2, 0, 1))
        return conv

    def loss(conv, x):
        return jnp.sum(jnp.sin(channels_first(conv)(x)))

    for ours_grad, reference_grad in zip(
        jax.tree_util.tree_leaves(eqx.filter_grad(loss)(ours, x)),
        jax.tree_util.tree_leaves(eqx.filter_grad(loss)(reference, x)),
    ):
        # Biases are (C,) here and (C, 1, 1) in equinox.
        np.testing.assert_allclose(
            np.ravel(ours_grad), np.ravel(reference_grad), rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        jax.grad(lambda x: loss(ours, x))(x), jax.grad(lambda x: loss(reference, x))(x),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    np.testing.assert_allclose(
        jax.jvp(channels_first(ours), (x,), (direction,))[1],
        jax.jvp(reference, (x,), (direction,))[1],
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip

    def jvp_norm(conv, x):  # second order, as Jacobian regularisation differentiates it
        return jnp.sum(jnp.square(jax.jvp(lambda x: loss(conv, x), (x,), (direction,))[1]))

    for ours_grad, reference_grad in zip(
        jax.tree_util.tree_leaves(eqx.filter_grad(jvp_norm)(ours, x)),
        jax.tree_util.tree_leaves(eqx.filter_grad(jvp_norm)(reference, x)),
    ):
        np.testing.assert_allclose(
            np.ravel(ours_grad), np.ravel(reference_grad), rtol=1e-4, atol=1e-4
        )


def test_narrow_convolutions_run_on_pixel_pairs():
    """The cases the derivative test above checks on pixel pairs are the ones Conv2d
    sends there: 3x3, stride 1, ungrouped, 'same' in width, even width, <= 8 outputs."""
    from imex_deq.nn._convolution import pair_packable

    same = ((1, 1), (1, 1))
    assert pair_packable((1, 11, 10, 4), (3, 3, 4, 6), (1, 1), same, (1, 1), 1)
    assert pair_packable((1, 11, 10, 4), (3, 3, 4, 6), (1, 1), ((0, 2), (1, 1)), (1, 1), 1)
    assert not pair_packable((1, 11, 11, 4), (3, 3, 4, 6), (1, 1), same, (1, 1), 1)
    assert not pair_packable((1, 11, 10, 4), (3, 3, 4, 16), (1, 1), same, (1, 1), 1)
    assert not pair_packable((1, 11, 10, 4), (3, 3, 4, 6), (2, 2), same, (1, 1), 1)
    assert not pair_packable((1, 11, 10, 4), (3, 3, 2, 6), (1, 1), same, (1, 1), 2)


def test_channels_last_conv_rejects_a_batch():
    conv = nn.Conv2d(2, 2, 3, padding=1, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"one \(H, W, C\) sample"):
        conv(jnp.ones((4, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"2 input channels \(channels last\).*\(2, 8, 8\)"):
        conv(jnp.ones((2, 8, 8)))


def test_channels_last_group_norm_matches_equinox():
    ours, reference = nn.GroupNorm(3, 6), eqx.nn.GroupNorm(3, 6)
    ours = eqx.tree_at(lambda g: (g.weight, g.bias), ours, (jnp.arange(6.0), -jnp.arange(6.0)))
    reference = eqx.tree_at(
        lambda g: (g.weight, g.bias), reference, (jnp.arange(6.0), -jnp.arange(6.0))
    )
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 5, 7)) * 3 + 1
    np.testing.assert_allclose(
        ours(jnp.transpose(x, (1, 2, 0))), jnp.transpose(reference(x), (1, 2, 0)),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="groups=4"):
        nn.GroupNorm(4, 6)


def _textbook_group_norm(norm, x):
    """Group normalisation of a `(H, W, C)` sample as first written: autodiff's reference."""
    h, w, c = x.shape
    grouped = x.reshape(h, w, norm.groups, c // norm.groups)
    mean = jnp.mean(grouped, axis=(0, 1, 3), keepdims=True)
    variance = jnp.mean(jnp.square(grouped - mean), axis=(0, 1, 3), keepdims=True)
    normalised = ((grouped - mean) / jnp.sqrt(variance + norm.eps)).reshape(h, w, c)
    return normalised * norm.weight.reshape(1, 1, c) + norm.bias.reshape(1, 1, c)


def test_group_norm_derivatives_match_autodiff():
    """The channels-last GroupNorm (per-channel reductions, then per group) has the
    values and derivatives of the textbook formula: forward and reverse mode, with respect
    to the input alone, the parameters alone and all together, and second order (the
    gradient of a Jacobian-vector product's norm, as Jacobian regularisation takes it, and
    of a vector-Jacobian product's)."""
    keys = jax.random.split(jax.random.PRNGKey(5), 5)
    norm = nn.GroupNorm(2, 6)
    norm = eqx.tree_at(
        lambda g: (g.weight, g.bias),
        norm,
        (jax.random.normal(keys[0], (6,)), jax.random.normal(keys[1], (6,))),
    )
    x = jax.random.normal(keys[2], (5, 4, 6)) * 2 + 0.5
    v = jax.random.normal(keys[3], x.shape)
    u = jax.random.normal(keys[4], x.shape)

    def close(ours, reference):
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

    def both(check):
        close(check(lambda n, x: n(x)), check(_textbook_group_norm))

    both(lambda apply: apply(norm, x))
    both(lambda apply: jax.jvp(lambda n, x: apply(n, x), (norm, x), (norm, v))[1])
    both(lambda apply: jax.jvp(lambda x: apply(norm, x), (x,), (v,))[1])
    both(lambda apply: jax.jvp(lambda n: apply(n, x), (norm,), (norm,))[1])

    def loss(apply, n, x):
        return jnp.sum(jnp.sin(apply(n, x)) * u)

    both(lambda apply: jax.grad(lambda n, x: loss(apply, n, x), argnums=(0, 1))(norm, x))
    both(lambda apply: jax.grad(lambda x: loss(apply, norm, x))(x))
    both(lambda apply: jax.grad(lambda n: loss(apply, n, x))(norm))

    def jvp_norm(apply, n, x):
        return jnp.sum(jnp.square(jax.jvp(lambda x: apply(n, x), (x,), (v,))[1]))

    def vjp_norm(apply, n, x):
        _, pullback = jax.vjp(lambda x: apply(n, x), x)
        return jnp.sum(jnp.square(pullback(u)[0]))

    both(lambda apply: jax.grad(lambda n, x: jvp_norm(apply, n, x), argnums=(0, 1))(norm, x))
    both(lambda apply: jax.grad(lambda n, x: vjp_norm(apply, n, x), argnums=(0, 1))(norm, x))


def test_group_norm_rejects_wrong_shape():
    norm = nn.GroupNorm(2, 6)
    with pytest.raises(ValueError, match=r"one \(H, W, 6\) sample.*\(6, 5, 4\)"):
        norm(jnp.ones((6, 5, 4)))
    with pytest.raises(ValueError, match=r"\(2, 5, 4, 6\)"):
        norm(jnp.ones((2, 5, 4, 6)))
