"""The MNIST-dense problem both libraries solve, in NumPy:

    e  = relu(We x + be)                       embedding 784 -> d
    z* = f(z*, e),  f(z, e) = relu(W1 z) + relu(W2 e)   (no biases)
    logits = Wh z* + bh                        head d -> 10

Weights are built once here (PyTorch `nn.Linear` layout: weight is (out, in), y = W x + b)
and loaded into both JAX and PyTorch, so the two libraries solve the same problem; the
residual both are judged by is computed here too, in float64.
"""

from __future__ import annotations

import numpy as np

PARAM_NAMES = ("we", "be", "w1", "w2", "wh", "bh")


def init_weights(
    seed: int = 0,
    d_in: int = 784,
    width: int = 128,
    classes: int = 10,
    spectral_norm: float | None = 0.9,
) -> dict[str, np.ndarray]:
    """float32 weights, PyTorch `nn.Linear` default init (U(±1/sqrt(fan_in))) and layout
    (weight (out, in)). W1 is rescaled to spectral norm `spectral_norm` (None: leave it),
    so f is a contraction with Lipschitz constant <= spectral_norm."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=shape)

    w = {
        "we": uniform((width, d_in), d_in),
        "be": uniform((width,), d_in),
        "w1": uniform((width, width), width),
        "w2": uniform((width, width), width),
        "wh": uniform((classes, width), width),
        "bh": uniform((classes,), width),
    }
    if spectral_norm is not None:
        w["w1"] = w["w1"] * (spectral_norm / np.linalg.norm(w["w1"], 2))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def make_batch(
    seed: int = 0, batch: int = 128, d_in: int = 784, classes: int = 10, source: str = "digits"
) -> tuple[np.ndarray, np.ndarray, str]:
    """`(x, y, description)`. `source="digits"`: scikit-learn's bundled 8x8 digits, each
    pixel repeated 3x3 (24x24) and zero-padded by 2 to MNIST's 28x28, scaled to [0, 1]
    (requires d_in = 784). `source="random"`: U[0, 1) pixels and random labels."""
    rng = np.random.default_rng(seed + 1)
    if source == "digits" and d_in == 784:
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = rng.permutation(len(digits.target))[:batch]
        if len(index) < batch:
            index = rng.choice(len(digits.target), batch, replace=True)
        images = digits.images[index] / 16.0
        images = np.kron(images, np.ones((1, 3, 3)))
        images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        x = images.reshape(batch, 784).astype(np.float32)
        y = digits.target[index].astype(np.int32) % classes
        return x, y, "sklearn digits 8x8 -> 3x3 pixel repeat -> pad to 28x28"
    x = rng.uniform(0.0, 1.0, size=(batch, d_in)).astype(np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int32)
    return x, y, "random U[0,1) inputs, random labels"


def np_embed(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float64) @ w["we"].T.astype(np.float64) + w["be"], 0.0)


def np_f(w: dict[str, np.ndarray], z: np.ndarray, e: np.ndarray) -> np.ndarray:
    w1 = w["w1"].astype(np.float64)
    w2 = w["w2"].astype(np.float64)
    return np.maximum(z.astype(np.float64) @ w1.T, 0.0) + np.maximum(
        e.astype(np.float64) @ w2.T, 0.0
    )


def shared_residual(
    w: dict[str, np.ndarray], z: np.ndarray, e: np.ndarray, mode: str = "rel"
) -> np.ndarray:
    """THE residual both libraries are judged by, per sample, in float64:
    ||f(z) - z|| (mode "abs"), divided by ||f(z)|| (mode "rel")."""
    fz = np_f(w, z, e)
    diff = np.linalg.norm(fz - z.astype(np.float64), axis=-1)
    if mode == "abs":
        return diff
    return diff / np.maximum(np.linalg.norm(fz, axis=-1), 1e-30)


def rel_diff(a, b) -> float:
    """||a - b|| / max(||a||, ||b||), 0 when both are zero."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    if scale == 0.0:
        return 0.0
    return float(np.linalg.norm(a - b) / scale)
