"""Image classification data sets as NumPy arrays: MNIST-style IDX folders, sklearn digits, and
the `load_dataset` spec that names any of them (or CIFAR-10)."""

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ._cifar import load_cifar10
from ._idx import IMAGES_MAGIC, LABELS_MAGIC, DataError, read_idx
from ._normalised import Dataset, make_dataset

ENV_VAR = "IMEX_DEQ_DATA"
"""Environment variable naming a folder that holds `fashion-mnist/` (checked first)."""

DEBIAN_PACKAGE = "dataset-fashion-mnist"
"""Debian package that ships Fashion-MNIST."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where `apt-get install -y dataset-fashion-mnist` puts the four IDX files."""

IDX_FILES: dict[str, tuple[str, int]] = {
    "train_images": ("train-images-idx3-ubyte", IMAGES_MAGIC),
    "train_labels": ("train-labels-idx1-ubyte", LABELS_MAGIC),
    "test_images": ("t10k-images-idx3-ubyte", IMAGES_MAGIC),
    "test_labels": ("t10k-labels-idx1-ubyte", LABELS_MAGIC),
}
"""The four files of an MNIST-style folder (each may also end in `.gz`) and their magic numbers."""

SPEC_CHOICES = ("digits", "fashion-mnist", "mnist=PATH", "cifar10=PATH")
"""Data set specs accepted by `load_dataset`."""


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    return [folder / f"{stem}.gz", folder / stem]


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in _idx_candidates(folder, stem) if p.is_file()), None)


def _missing_files(folder: Path) -> list[Path]:
    """Every candidate path of each of the four files that has no candidate present."""
    return [
        path
        for stem, _ in IDX_FILES.values()
        if _find_idx_file(folder, stem) is None
        for path in _idx_candidates(folder, stem)
    ]


def _check_pair(images: np.ndarray, labels: np.ndarray, img: Path, lab: Path) -> None:
    if images.ndim != 3:
        raise DataError(f"{img}: expected 3 dimensions (N, H, W), found shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lab}: expected 1 dimension (N,), found shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"image/label count mismatch: {img} has {images.shape[0]} images but "
            f"{lab} has {labels.shape[0]} labels"
        )


def _check_labels(labels: np.ndarray, path: Path, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: label {int(labels[first])} at index {first} is out of range "
            f"[0, {num_classes})"
        )


def load_idx_folder(folder: str | os.PathLike[str], name: str, num_classes: int = 10) -> Dataset:
    """Load an MNIST-style folder of four IDX files.

    The files are `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each optionally gzipped with a
    `.gz` suffix (the `.gz` file is preferred when both exist).

    **Arguments:**

    - `folder`: the folder holding the files.
    - `name`: the name given to the `Dataset`.
    - `num_classes`: labels must lie in `[0, num_classes)`.

    **Returns:**

    A `Dataset` with images shaped `(N, H, W, 1)`, standardised with the training mean and std.

    **Raises:**

    `DataError` for a missing folder or file (listing the paths looked at), a malformed
    file, an image/label count mismatch, differing train/test image sizes, or labels out of
    range.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{name}: data folder not found: looked for directory {folder}")
    found = {key: _find_idx_file(folder, stem) for key, (stem, _) in IDX_FILES.items()}
    paths = {key: path for key, path in found.items() if path is not None}
    if len(paths) < len(IDX_FILES):
        looked = "\n".join(f"  - {p}" for p in _missing_files(folder))
        raise DataError(f"{name}: missing IDX files in {folder}; looked for:\n{looked}")
    arrays = {key: read_idx(paths[key], expect=IDX_FILES[key][1]) for key in IDX_FILES}
    for split in ("train", "test"):
        img, lab = f"{split}_images", f"{split}_labels"
        _check_pair(arrays[img], arrays[lab], paths[img], paths[lab])
        _check_labels(arrays[lab], paths[lab], num_classes)
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise DataError(
            f"image size mismatch: {paths['train_images']} has {train_hw} images but "
            f"{paths['test_images']} has {test_hw}"
        )
    return make_dataset(
        name,
        arrays["train_images"][..., None].astype(np.float32) / 255.0,
        arrays["train_labels"],
        arrays["test_images"][..., None].astype(np.float32) / 255.0,
        arrays["test_labels"],
        num_classes,
    )


def load_mnist(folder: str | os.PathLike[str]) -> Dataset:
    """Load MNIST from a folder of its four IDX files (nothing is downloaded).

    **Arguments:**

    - `folder`: the folder holding `train-images-idx3-ubyte[.gz]` and the other three files.

    **Returns:**

    A `Dataset` named `"mnist"`.
    """
    return load_idx_folder(folder, "mnist")


def _dpkg_folders() -> list[Path]:
    """Folders holding Fashion-MNIST according to `dpkg -L` (empty if dpkg or the package is absent)."""
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return []
    try:
        out = subprocess.run(
            [dpkg, "-L", DEBIAN_PACKAGE],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    marker = IDX_FILES["train_images"][0]
    folders = [Path(line.strip()).parent for line in out.stdout.splitlines() if marker in line]
    return list(dict.fromkeys(folders))


def _fashion_mnist_candidates() -> list[tuple[Path, str]]:
    """Candidate folders, in search order, each with a note on where it came from."""
    candidates: list[tuple[Path, str]] = []
    root = os.environ.get(ENV_VAR)
    if root:
        candidates.append((Path(root) / "fashion-mnist", f"${ENV_VAR}/fashion-mnist"))
    candidates.append((DEBIAN_FASHION_MNIST_DIR, f"Debian package {DEBIAN_PACKAGE}"))
    candidates.extend((folder, f"dpkg -L {DEBIAN_PACKAGE}") for folder in _dpkg_folders())
    return candidates


def load_fashion_mnist() -> Dataset:
    """Load Fashion-MNIST from local files (nothing is downloaded).

    Looks, in order, in `$IMEX_DEQ_DATA/fashion-mnist` (when the variable is set), in
    `/usr/share/datasets/fashion-mnist` (where the Debian package `dataset-fashion-mnist`
    installs it), and in the folders that `dpkg -L dataset-fashion-mnist` lists. The first
    folder holding all four IDX files is used.

    **Returns:**

    A `Dataset` named `"fashion-mnist"` (60000 training and 10000 test 28x28 images).

    **Raises:**

    `DataError` listing every place looked at when no folder has the files.
    """
    looked: list[str] = []
    for folder, origin in _fashion_mnist_candidates():
        if not folder.is_dir():
            looked.append(f"  - {folder} ({origin}): no such directory")
            continue
        missing = _missing_files(folder)
        if not missing:
            return load_idx_folder(folder, "fashion-mnist")
        names = ", ".join(dict.fromkeys(p.name.removesuffix(".gz") for p in missing))
        looked.append(f"  - {folder} ({origin}): missing {names}")
    if ENV_VAR not in os.environ:
        looked.append(f"  - ${ENV_VAR} is not set")
    raise DataError(
        "fashion-mnist: data not found; looked in:\n"
        + "\n".join(looked)
        + f"\nInstall it with `apt-get install -y {DEBIAN_PACKAGE}`, or set {ENV_VAR} to a "
        "folder containing fashion-mnist/ with the four IDX files."
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits (1797 images, 10 classes; nothing is downloaded).

    Pixel values 0..16 are scaled to [0, 1]; the train/test split is stratified by class and
    seeded.

    **Arguments:**

    - `test_fraction`: the fraction of samples held out for testing, in (0, 1).
    - `seed`: the seed of the split.

    **Returns:**

    A `Dataset` named `"digits"` with images shaped `(N, 8, 8, 1)`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return make_dataset(
        "digits", x_train[..., None], y_train, x_test[..., None], y_test, num_classes=10
    )


def _check_limit(limit: int | None, what: str) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {limit!r}")


def _limit(data: np.ndarray, limit: int | None) -> np.ndarray:
    return data if limit is None else data[:limit].copy()


def load_dataset(
    spec: str, *, limit_train: int | None = None, limit_test: int | None = None
) -> Dataset:
    """Load a data set from its command-line spec.

    **Arguments:**

    - `spec`: `"digits"`, `"fashion-mnist"`, `"mnist=PATH"` (a folder of MNIST IDX files), or
      `"cifar10=PATH"` (a folder of CIFAR-10 batches; see `load_cifar10`).
    - `limit_train`, `limit_test`: keep only the first N training / test samples (all of
      them when N exceeds the size). Normalisation statistics come from the full training set,
      so a limited run sees the same inputs as a full one.

    **Returns:**

    The `Dataset`.

    **Raises:**

    `ValueError` for an unknown spec or a bad limit; `DataError` when the files are missing
    or malformed.
    """
    _check_limit(limit_train, "limit_train")
    _check_limit(limit_test, "limit_test")
    key, sep, arg = spec.strip().partition("=")
    if key == "digits" and not sep:
        data = load_digits()
    elif key == "fashion-mnist" and not sep:
        data = load_fashion_mnist()
    elif key == "mnist" and sep and arg:
        data = load_mnist(arg)
    elif key == "cifar10" and sep and arg:
        data = load_cifar10(arg)
    else:
        choices = ", ".join(repr(c) for c in SPEC_CHOICES)
        raise ValueError(f"unknown dataset spec {spec!r}; valid choices: {choices}")
    if limit_train is None and limit_test is None:
        return data
    return dataclasses.replace(
        data,
        x_train=_limit(data.x_train, limit_train),
        y_train=_limit(data.y_train, limit_train),
        x_test=_limit(data.x_test, limit_test),
        y_test=_limit(data.y_test, limit_test),
    )
