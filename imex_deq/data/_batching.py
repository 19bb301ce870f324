"""Deterministic mini-batches: the order depends only on `(seed, epoch)`, so runs resume exactly."""

from collections.abc import Iterator

import numpy as np

from ._augment import augment_batch


def _check_batch_size(n: int, batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the number of samples {n}")


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches `iterate_batches` yields per epoch.

    **Arguments:**

    - `n`: the number of samples.
    - `batch_size`: samples per batch, in `[1, n]`.
    - `drop_last`: whether a final incomplete batch is dropped.

    **Returns:**

    `n // batch_size` when `drop_last`, otherwise `ceil(n / batch_size)`.
    """
    _check_batch_size(n, batch_size)
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch, from `np.random.default_rng((seed, epoch))`."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    return np.random.default_rng((seed, epoch)).permutation(n)


def batch_augment_rng(*, seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator that augments one batch: `np.random.default_rng((seed, epoch, batch))`."""
    return np.random.default_rng((seed, epoch, batch))


def iterate_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = True,
    start_batch: int = 0,
    augment: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the mini-batches of one epoch.

    The order is a permutation drawn from `np.random.default_rng((seed, epoch))`, so the
    batches of epoch `e` are the same in every run with the same seed, and a run resumed at
    epoch `e`, batch `i` (via `start_batch=i`) continues with exactly the batches it would
    have seen. Augmentation is seeded the same way, per batch, so a resumed run also sees the
    same augmented images. Arguments are checked when this is called, not when iteration starts.

    **Arguments:**

    - `x`, `y`: inputs and targets with the same leading dimension `n`.
    - `batch_size`: samples per batch, in `[1, n]`.
    - `seed`, `epoch`: non-negative integers that fix the order.
    - `shuffle`: if `False`, batches follow the stored order.
    - `drop_last`: drop a final batch smaller than `batch_size`.
    - `start_batch`: skip the first `start_batch` batches of the epoch.
    - `augment`: apply `augment_batch` (random crop after padding 4 zeros, random horizontal
      flip) to each `xb`, which must then be images shaped `(B, H, W, C)`; batch `i` uses the
      generator `np.random.default_rng((seed, epoch, i))`.

    **Returns:**

    An iterator of `(xb, yb)` NumPy arrays; each sample appears at most once per epoch, and
    exactly once unless `drop_last` drops the remainder.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y have different lengths: {n} and {len(y)}")
    total = num_batches(n, batch_size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in [0, {total}], got {start_batch}")
    if augment and x.ndim != 4:
        raise ValueError(f"augment needs images shaped (N, H, W, C), got x of shape {x.shape}")
    if augment and (seed < 0 or epoch < 0):
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    order = epoch_permutation(n, seed=seed, epoch=epoch) if shuffle else np.arange(n)
    batches = _batches(x, y, order, batch_size, range(start_batch, total))
    return _augmented(batches, seed, epoch, start_batch) if augment else batches


def _batches(
    x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int, indices: range
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in indices:
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield x[idx], y[idx]


def _augmented(
    batches: Iterator[tuple[np.ndarray, np.ndarray]], seed: int, epoch: int, start_batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i, (xb, yb) in enumerate(batches, start=start_batch):
        yield augment_batch(xb, batch_augment_rng(seed=seed, epoch=epoch, batch=i)), yb
