"""The paper's CIFAR-10 augmentation: random crop after zero padding, random horizontal flip."""

import numpy as np


def augment_batch(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4) -> np.ndarray:
    """Randomly crop and horizontally flip each image of a batch.

    Each image is padded with `padding` zeros on every side, a window of the original size is
    cut from it at a uniformly random offset, and the window is mirrored left to right with
    probability 1/2. The pad value is 0 in whatever space the images are in: for a standardised
    `Dataset` that is the training mean (per channel for CIFAR-10), not black.

    **Arguments:**

    - `images`: a batch shaped `(B, H, W, C)`, any dtype.
    - `rng`: the generator that draws the offsets and flips (three draws of `B` values).
    - `padding`: the pixels added on each side, a non-negative integer (4 in the paper).

    **Returns:**

    A new array of the same shape and dtype as `images`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be shaped (B, H, W, C), got shape {images.shape}")
    if isinstance(padding, bool) or not isinstance(padding, int | np.integer) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    batch, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    top = rng.integers(0, 2 * padding + 1, size=batch)
    left = rng.integers(0, 2 * padding + 1, size=batch)
    flip = rng.random(batch) < 0.5
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    samples = np.arange(batch)[:, None, None]
    return padded[samples, rows[:, :, None], cols[:, None, :]]
