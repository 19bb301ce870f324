"""The paper's classifiers as Equinox modules: embedding → DEQ (or neural ODE) → head."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .. import nn
from .._adjoint import AbstractAdjoint, ImplicitAdjoint
from .._deq import AbstractDEQ, DEQInfo
from .._neural_ode import NeuralODE
from .._solvers import AbstractSolver
from ._registry import make_layer as _wrap_layer


class DenseDEQCell(eqx.Module):
    """The paper's MNIST-dense f(z, x) = relu(W₁ z) + relu(W₂ x), no biases."""

    w_z: eqx.nn.Linear
    w_x: eqx.nn.Linear

    def __init__(self, width: int, *, key: PRNGKeyArray):
        kz, kx = jax.random.split(key)
        self.w_z = eqx.nn.Linear(width, width, use_bias=False, key=kz)
        self.w_x = eqx.nn.Linear(width, width, use_bias=False, key=kx)

    def __call__(self, z: Float[Array, " w"], x: Float[Array, " w"]) -> Float[Array, " w"]:
        return jax.nn.relu(self.w_z(z)) + jax.nn.relu(self.w_x(x))


class _DensePredictor(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        return jax.nn.relu(self.linear(x))


class _DenseEmbedding(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, image):
        return jax.nn.relu(self.linear(jnp.ravel(image)))


class Classifier(eqx.Module):
    """`embed(image)` → injection x; `layer(x)` → (z*, info); `head(z*)` → logits."""

    embed: Callable
    layer: AbstractDEQ | NeuralODE
    head: Callable

    def forward(
        self,
        image: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool = False,
        backward_counter: Float[Array, ""] | None = None,
    ) -> tuple[Array, DEQInfo, Array]:
        """Returns `(logits, info, injection)`; the injection feeds Jacobian regularisation.
        `key` draws the layer's dropout mask (needed in training when f has dropout);
        `inference=True` switches dropout off."""
        injection = self.embed(image)
        z_star, info = self.layer(
            injection, key=key, inference=inference, backward_counter=backward_counter
        )
        return self.head(z_star), info, injection

    def __call__(
        self, image: Array, *, key: PRNGKeyArray | None = None, inference: bool = False
    ) -> Array:
        return self.forward(image, key=key, inference=inference)[0]


def build_dense_model(
    variant: str,
    solver: AbstractSolver,
    *,
    in_features: int,
    key: PRNGKeyArray,
    width: int = 128,
    num_classes: int = 10,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 50,
) -> Classifier:
    """The paper's MNIST-dense model: Linear in→128 + ReLU, a DEQ on 128 numbers,
    Linear 128→classes. `variant` is one of `VARIANTS`; the neural ODE integrates the same
    f over t ∈ [0, 1] at the solver's tolerance."""
    k_embed, k_cell, k_pred, k_head = jax.random.split(key, 4)
    f = DenseDEQCell(width, key=k_cell)
    predictor = _DensePredictor(eqx.nn.Linear(width, width, key=k_pred))
    layer = _wrap_layer(
        variant,
        f,
        predictor,
        solver,
        adjoint=ImplicitAdjoint() if adjoint is None else adjoint,
        max_steps=max_steps,
        state_shape=jax.ShapeDtypeStruct((width,), jnp.float32),
    )
    embed = _DenseEmbedding(eqx.nn.Linear(in_features, width, key=k_embed))
    return Classifier(embed, layer, eqx.nn.Linear(width, num_classes, key=k_head))


def build_conv_model(
    variant: str,
    solver: AbstractSolver,
    *,
    config: nn.MultiscaleConfig,
    key: PRNGKeyArray,
    adjoint: AbstractAdjoint | None = None,
    max_steps: int = 50,
) -> Classifier:
    """A multiscale (Skip) DEQ classifier from `imex_deq.nn` (e.g. `mnist_conv()`);
    images arrive channels-last `(H, W, C)`, as every `imex_deq.nn` module takes them."""
    pieces = nn.build_multiscale_model(config, key, with_predictor=variant == "skip")
    state_shape = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in config.state_shapes)
    layer = _wrap_layer(
        variant,
        pieces.cell,
        pieces.predictor,
        solver,
        adjoint=ImplicitAdjoint() if adjoint is None else adjoint,
        max_steps=max_steps,
        state_shape=state_shape,
    )
    return Classifier(pieces.stem, layer, pieces.head)
