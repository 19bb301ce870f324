"""CIFAR-10 from a folder holding either of its standard distributions: binary or Python batches."""

import dataclasses
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._idx import DataError
from ._normalised import Dataset, make_dataset

try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

NUM_CLASSES = 10
CHANNELS, HEIGHT, WIDTH = 3, 32, 32
PIXEL_BYTES = CHANNELS * HEIGHT * WIDTH
RECORD_BYTES = 1 + PIXEL_BYTES
"""A binary record: one label byte, then the image channel by channel (red, green, blue)."""

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BINARY_SUBFOLDER = "cifar-10-batches-bin"
PYTHON_SUBFOLDER = "cifar-10-batches-py"

_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,  # pickled by NumPy < 2
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
"""The only globals a CIFAR-10 Python batch refers to: what rebuilds its NumPy array."""

Batch = tuple[np.ndarray, np.ndarray]
"""Images as uint8 `(N, 3, 32, 32)` and labels as int64 `(N,)`."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and NumPy arrays; refuses every other global."""

    def __init__(self, file, path: Path):
        # The files were pickled by Python 2: its byte strings must stay bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise DataError(
                f"{self._path}: refused to unpickle the global {module}.{name}; a CIFAR-10 "
                f"Python batch needs only {allowed}"
            ) from None


def _label_out_of_range(path: Path, label: int, index: int) -> DataError:
    return DataError(f"{path}: label {label} at index {index} is out of range [0, {NUM_CLASSES})")


def _read_binary_batch(path: Path) -> Batch:
    raw = path.read_bytes()
    if not raw or len(raw) % RECORD_BYTES:
        raise DataError(
            f"{path}: size {len(raw)} bytes is not a positive multiple of the {RECORD_BYTES}-byte "
            f"record (1 label byte + {PIXEL_BYTES} pixel bytes); the file is truncated or not a "
            "CIFAR-10 binary batch"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise _label_out_of_range(path, int(labels[bad[0]]), int(bad[0]))
    return records[:, 1:].reshape(-1, CHANNELS, HEIGHT, WIDTH), labels


def _unpickle(path: Path) -> object:
    try:
        with path.open("rb") as file:
            return _BatchUnpickler(file, path).load()
    except DataError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways; each means the same here
        raise DataError(
            f"{path}: not a readable CIFAR-10 Python batch ({type(err).__name__}: {err})"
        ) from err


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array shaped {value.shape}"
    return f"a {type(value).__name__}"


def _read_python_batch(path: Path) -> Batch:
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {_describe(batch)}")
    missing = [key for key in (b"data", b"labels") if key not in batch]
    if missing:
        found = ", ".join(repr(key) for key in batch) or "none"
        raise DataError(
            f"{path}: missing key {' and '.join(repr(k) for k in missing)} (found keys: {found})"
        )
    data, labels = batch[b"data"], batch[b"labels"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == PIXEL_BYTES
    ):
        raise DataError(
            f"{path}: b'data' must be a uint8 array shaped (N, {PIXEL_BYTES}), "
            f"found {_describe(data)}"
        )
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{path}: b'labels' must be a list of ints, found {_describe(labels)}")
    if len(labels) != data.shape[0]:
        raise DataError(
            f"{path}: image/label count mismatch: b'data' has {data.shape[0]} images but "
            f"b'labels' has {len(labels)} labels"
        )
    # Checked before the conversion, which would overflow on a huge label.
    bad = next((i for i, v in enumerate(labels) if not 0 <= v < NUM_CLASSES), None)
    if bad is not None:
        raise _label_out_of_range(path, labels[bad], bad)
    return data.reshape(-1, CHANNELS, HEIGHT, WIDTH), np.array(labels, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class _Distribution:
    """One of the two ways CIFAR-10 is shipped: file suffix and batch reader."""

    kind: str
    suffix: str
    subfolder: str
    read: Callable[[Path], Batch]

    def files(self) -> list[str]:
        return [name + self.suffix for name in (*TRAIN_BATCHES, TEST_BATCH)]


BINARY = _Distribution("binary", ".bin", BINARY_SUBFOLDER, _read_binary_batch)
PYTHON = _Distribution("Python", "", PYTHON_SUBFOLDER, _read_python_batch)


def _locate(folder: Path) -> tuple[_Distribution, Path]:
    """The first folder and distribution, binary first, that has any CIFAR-10 batch file."""
    if not folder.is_dir():
        raise DataError(f"cifar10: data folder not found: looked for directory {folder}")
    looked = []
    for dist in (BINARY, PYTHON):
        for where in (folder, folder / dist.subfolder):
            present = [name for name in dist.files() if (where / name).is_file()]
            if present:
                absent = [name for name in dist.files() if name not in present]
                if absent:
                    raise DataError(
                        f"cifar10: the {dist.kind} version in {where} is missing "
                        f"{', '.join(absent)}"
                    )
                return dist, where
            looked.append(f"  - {where}: {', '.join(dist.files())} ({dist.kind} version)")
    raise DataError(f"cifar10: no CIFAR-10 batches in {folder}; looked for:\n" + "\n".join(looked))


def _to_hwc(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def _scaled(images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out /= np.float32(255.0)  # in place: a full-size float32 copy fewer
    return out


def read_cifar10(folder: str | os.PathLike[str]) -> tuple[Batch, Batch]:
    """The raw training and test sets: uint8 images `(N, 32, 32, 3)` and int64 labels `(N,)`."""
    dist, where = _locate(Path(folder))
    train = [dist.read(where / (name + dist.suffix)) for name in TRAIN_BATCHES]
    x_test, y_test = dist.read(where / (TEST_BATCH + dist.suffix))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (_to_hwc(x_train), y_train), (_to_hwc(x_test), y_test)


def load_cifar10(folder: str | os.PathLike[str]) -> Dataset:
    """Load CIFAR-10 from a folder of its batch files (nothing is downloaded).

    Either standard distribution works: the binary version (`data_batch_1.bin` …
    `data_batch_5.bin` and `test_batch.bin`) or the Python version (`data_batch_1` …
    `data_batch_5` and `test_batch`, pickled dicts), in `folder` itself or in the subfolder
    the archive unpacks to (`cifar-10-batches-bin/` or `cifar-10-batches-py/`). The binary
    version is preferred wherever both are present. The first place holding any batch file is
    used, and must hold all six. The Python batches are read by an unpickler that admits no
    global but NumPy's array reconstruction, so a tampered file cannot make it call anything
    else.

    **Arguments:**

    - `folder`: the folder holding the batches, or the folder holding their subfolder.

    **Returns:**

    A `Dataset` named `"cifar10"` (50000 training and 10000 test images shaped `(32, 32, 3)`,
    channels last), each channel scaled to [0, 1] and standardised with the training set's
    mean and std of that channel (`mean` and `std` are tuples of three floats).

    **Raises:**

    `DataError` for a missing folder, a folder with neither version, a missing batch file,
    a binary file whose size is not a whole number of 3073-byte records, a pickle holding
    anything but the expected dict (a refused global, wrong keys, wrong array shape or
    dtype), or a label outside [0, 10).
    """
    (x_train, y_train), (x_test, y_test) = read_cifar10(folder)
    return make_dataset(
        "cifar10",
        _scaled(x_train),
        y_train,
        _scaled(x_test),
        y_test,
        NUM_CLASSES,
        per_channel=True,
    )
