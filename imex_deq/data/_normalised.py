"""The `Dataset` container and the standardisation every loader applies."""

import dataclasses

import numpy as np

from ._idx import DataError


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A normalised image classification data set.

    **Fields:**

    - `x_train`, `x_test`: float32 images shaped `(N, H, W, C)`, scaled to [0, 1] and then
      standardised as `(x - mean) / std`.
    - `y_train`, `y_test`: int32 labels shaped `(N,)`, in `[0, num_classes)`.
    - `name`: a short name, e.g. `"fashion-mnist"`.
    - `num_classes`: the number of classes.
    - `image_shape`: `(H, W, C)`.
    - `mean`, `std`: the statistics of the [0, 1]-scaled training images used above: plain
      floats for single-channel images (MNIST, Fashion-MNIST, digits), and a tuple of `C`
      floats, one per channel, for colour images standardised per channel (CIFAR-10). Either
      way `x * np.asarray(std) + np.asarray(mean)` undoes the standardisation.
    """

    x_train: np.ndarray = dataclasses.field(repr=False)
    y_train: np.ndarray = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    y_test: np.ndarray = dataclasses.field(repr=False)
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])


def _statistics(name: str, x_train: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and std in float64: scalars, or one per channel (last axis)."""
    if per_channel:
        # One channel at a time keeps the float64 temporaries of np.std a channel in size.
        channels = [x_train[..., c] for c in range(x_train.shape[-1])]
        mean = np.array([np.mean(x, dtype=np.float64) for x in channels])
        std = np.array([np.std(x, dtype=np.float64) for x in channels])
    else:
        mean = np.asarray(np.mean(x_train, dtype=np.float64))
        std = np.asarray(np.std(x_train, dtype=np.float64))
    constant = np.flatnonzero(~(std > 0.0))
    if constant.size:
        where = f"channel {int(constant[0])} of the " if per_channel else ""
        raise DataError(
            f"{name}: {where}training images are constant (std = {float(std.flat[constant[0]])}); "
            "cannot normalise"
        )
    return mean, std


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = x.astype(np.float32)  # a copy; the arithmetic below is in place to save memory
    out -= mean.astype(np.float32)
    out /= std.astype(np.float32)
    return out


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    per_channel: bool = False,
) -> Dataset:
    """Standardise [0, 1]-scaled `(N, H, W, C)` images with the training statistics.

    **Arguments:**

    - `name`, `num_classes`: as in `Dataset`.
    - `x_train`, `x_test`: images in [0, 1] shaped `(N, H, W, C)`.
    - `y_train`, `y_test`: integer labels shaped `(N,)`.
    - `per_channel`: one mean and std per channel (stored as tuples) instead of one over all
      pixels (stored as floats).

    **Returns:**

    The `Dataset`.

    **Raises:**

    `DataError` when the training images (or one channel of them) are constant.
    """
    mean, std = _statistics(name, x_train, per_channel)
    return Dataset(
        x_train=_standardise(x_train, mean, std),
        y_train=y_train.astype(np.int32),
        x_test=_standardise(x_test, mean, std),
        y_test=y_test.astype(np.int32),
        name=name,
        num_classes=num_classes,
        image_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
        mean=tuple(float(m) for m in mean) if per_channel else float(mean),
        std=tuple(float(s) for s in std) if per_channel else float(std),
    )
