"""Tests of CIFAR-10 loading (binary and Python batches, on miniature files written here) and of
the crop-and-flip augmentation, alone and inside `iterate_batches`."""

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from imex_deq.data import (
    DataError,
    Dataset,
    augment_batch,
    iterate_batches,
    load_cifar10,
    load_dataset,
)
from imex_deq.data._cifar import read_cifar10

TRAIN_SIZES = (7, 6, 7, 5, 7)
"""Images in the five miniature training batches."""

N_TEST = 5
N_TRAIN = sum(TRAIN_SIZES)
BATCH_NAMES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


# --- writing miniature CIFAR-10 folders -------------------------------------------------------


def pattern_images(n: int, offset: int) -> np.ndarray:
    """uint8 images shaped (n, 3, 32, 32), channel-major as stored, with a known formula."""
    i, c, h, w = np.meshgrid(
        np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((offset + 11 * i + 80 * c + 3 * h + w) % 256).astype(np.uint8)


def make_batches(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Five training batches and a test batch of channel-major images and labels."""
    rng = np.random.default_rng(seed)
    batches, offset = [], seed
    for n in (*TRAIN_SIZES, N_TEST):
        batches.append((pattern_images(n, offset), rng.integers(0, 10, n).astype(np.uint8)))
        offset += 11 * n
    return batches


def binary_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    return records.astype(np.uint8).tobytes()


def write_binary(folder: Path, batches: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in zip(BATCH_NAMES, batches, strict=True):
        (folder / f"{name}.bin").write_bytes(binary_bytes(images, labels))
    return folder


def _py2_str(data: bytes) -> bytes:
    """A Python 2 `str` (SHORT_BINSTRING or BINSTRING): `bytes` when read with encoding="bytes"."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + len(data).to_bytes(4, "little") + data


def _py2_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    return b"J" + value.to_bytes(4, "little", signed=True)


def py2_array(array: np.ndarray, module: bytes = b"numpy.core.multiarray") -> bytes:
    """A uint8 array as Python 2 with NumPy 1 pickled it (protocol 2)."""
    shape = b"(" + b"".join(_py2_int(d) for d in array.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
        b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    )
    state = b"(K\x01" + shape + dtype + b"\x89" + _py2_str(array.tobytes()) + b"tb"
    return (
        b"c" + module + b"\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
    ) + state


def py2_batch(
    images: np.ndarray, labels: np.ndarray, module: bytes = b"numpy.core.multiarray"
) -> bytes:
    """A batch pickled like the real `cifar-10-batches-py` files: a Python 2 dict."""
    items = [
        (_py2_str(b"batch_label"), _py2_str(b"miniature batch")),
        (_py2_str(b"labels"), b"](" + b"".join(_py2_int(int(v)) for v in labels) + b"e"),
        (_py2_str(b"data"), py2_array(images.reshape(len(images), -1), module)),
        (_py2_str(b"filenames"), b"](" + b"".join(_py2_str(b"x.png") for _ in labels) + b"e"),
    ]
    return b"\x80\x02}(" + b"".join(k + v for k, v in items) + b"u."


def write_python(folder: Path, batches: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in zip(BATCH_NAMES, batches, strict=True):
        (folder / name).write_bytes(py2_batch(images, labels))
    return folder


def hwc(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 2, 3, 1)


def expected_split(batches, train: bool) -> tuple[np.ndarray, np.ndarray]:
    chosen = batches[:5] if train else batches[5:]
    return (
        hwc(np.concatenate([x for x, _ in chosen])),
        np.concatenate([y for _, y in chosen]).astype(np.int64),
    )


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("write", [write_binary, write_python], ids=["binary", "python"])
def test_read_values_labels_and_layout(tmp_path: Path, write) -> None:
    batches = make_batches()
    write(tmp_path, batches)
    (x_train, y_train), (x_test, y_test) = read_cifar10(tmp_path)
    assert x_train.shape == (N_TRAIN, 32, 32, 3) and x_test.shape == (N_TEST, 32, 32, 3)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert x_train.flags.c_contiguous
    assert y_train.dtype == y_test.dtype == np.int64
    np.testing.assert_array_equal(x_train, expected_split(batches, True)[0])
    np.testing.assert_array_equal(y_train, expected_split(batches, True)[1])
    np.testing.assert_array_equal(x_test, expected_split(batches, False)[0])
    np.testing.assert_array_equal(y_test, expected_split(batches, False)[1])
    # Channels last: pixel (h, w) of image i holds (red, green, blue) from the formula.
    i, h, w = 3, 5, 17
    assert x_train[i, h, w].tolist() == [(11 * i + 80 * c + 3 * h + w) % 256 for c in range(3)]


@pytest.mark.parametrize("write", [write_binary, write_python], ids=["binary", "python"])
def test_load_cifar10(tmp_path: Path, write) -> None:
    batches = make_batches()
    write(tmp_path, batches)
    data = load_cifar10(tmp_path)
    assert isinstance(data, Dataset)
    assert (data.name, data.num_classes, data.image_shape) == ("cifar10", 10, (32, 32, 3))
    assert (data.num_train, data.num_test) == (N_TRAIN, N_TEST)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    x_train, y_train = expected_split(batches, True)
    x_test, y_test = expected_split(batches, False)
    np.testing.assert_array_equal(data.y_train, y_train)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert isinstance(data.mean, tuple) and isinstance(data.std, tuple)
    scaled = x_train / 255.0
    # The statistics are those of the float32 [0, 1]-scaled images, hence rtol 1e-6.
    np.testing.assert_allclose(data.mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(data.std, scaled.std(axis=(0, 1, 2)), rtol=1e-6)
    mean, std = np.asarray(data.mean), np.asarray(data.std)
    np.testing.assert_allclose(data.x_train * std + mean, scaled, atol=1e-5)
    np.testing.assert_allclose(data.x_test * std + mean, x_test / 255.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.mean(axis=(0, 1, 2), dtype=np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=(0, 1, 2), dtype=np.float64), 1, atol=1e-4)


def test_normalisation_uses_training_statistics_per_channel(tmp_path: Path) -> None:
    batches = make_batches()
    test_images = np.zeros((N_TEST, 3, 32, 32), np.uint8)
    test_images[:, 0], test_images[:, 1], test_images[:, 2] = 255, 0, 128
    batches[5] = (test_images, batches[5][1])
    write_binary(tmp_path, batches)
    data = load_cifar10(tmp_path)
    train = expected_split(batches, True)[0] / 255.0
    channel_mean = train.mean(axis=(0, 1, 2))
    channel_std = train.std(axis=(0, 1, 2))
    # The miniature channels differ (the formula adds 80 per channel), so a pooled statistic
    # would not match every channel.
    assert np.ptp(channel_mean) > 0.01
    for c, value in enumerate((1.0, 0.0, 128 / 255)):
        expected = (value - channel_mean[c]) / channel_std[c]
        np.testing.assert_allclose(data.x_test[..., c], expected, rtol=1e-5)


def test_binary_preferred_over_python(tmp_path: Path) -> None:
    write_python(tmp_path, make_batches(seed=1))
    write_binary(tmp_path, make_batches(seed=2))
    (x_train, y_train), _ = read_cifar10(tmp_path)
    np.testing.assert_array_equal(x_train, expected_split(make_batches(seed=2), True)[0])
    np.testing.assert_array_equal(y_train, expected_split(make_batches(seed=2), True)[1])


def test_binary_subfolder_preferred_over_python_folder(tmp_path: Path) -> None:
    write_python(tmp_path, make_batches(seed=1))
    write_binary(tmp_path / "cifar-10-batches-bin", make_batches(seed=2))
    (_, y_train), _ = read_cifar10(tmp_path)
    np.testing.assert_array_equal(y_train, expected_split(make_batches(seed=2), True)[1])


@pytest.mark.parametrize(
    ("write", "subfolder"),
    [(write_binary, "cifar-10-batches-bin"), (write_python, "cifar-10-batches-py")],
    ids=["binary", "python"],
)
def test_subfolder(tmp_path: Path, write, subfolder: str) -> None:
    batches = make_batches()
    write(tmp_path / subfolder, batches)
    for folder in (tmp_path, tmp_path / subfolder):
        (x_train, _), (_, y_test) = read_cifar10(folder)
        np.testing.assert_array_equal(x_train, expected_split(batches, True)[0])
        np.testing.assert_array_equal(y_test, expected_split(batches, False)[1])


@pytest.mark.parametrize("protocol", [3, 4])
def test_python_batches_pickled_by_python3(tmp_path: Path, protocol: int) -> None:
    batches = make_batches()
    for name, (images, labels) in zip(BATCH_NAMES, batches, strict=True):
        batch = {b"data": images.reshape(len(images), -1), b"labels": labels.tolist()}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (x_train, _), _ = read_cifar10(tmp_path)
    np.testing.assert_array_equal(x_train, expected_split(batches, True)[0])


def test_python_batch_pickled_under_numpy2_module_name(tmp_path: Path) -> None:
    batches = make_batches()
    write_python(tmp_path, batches)
    pickled = py2_batch(*batches[0], module=b"numpy._core.multiarray")
    (tmp_path / "data_batch_1").write_bytes(pickled)
    (x_train, _), _ = read_cifar10(tmp_path)
    np.testing.assert_array_equal(x_train, expected_split(batches, True)[0])


# --- the restricted unpickler ----------------------------------------------------------------


class RunsACommand:
    """Unpickling this with plain `pickle.load` would run `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (lambda marker: RunsACommand(marker), r"(os|posix|nt)\.system"),
        (lambda marker: CallsEval(), r"builtins\.eval"),
    ],
    ids=["os.system", "eval"],
)
def test_unpickler_refuses_other_globals(tmp_path: Path, payload, refused: str) -> None:
    write_python(tmp_path, make_batches())
    marker = tmp_path / "it-ran"
    batch = {b"data": payload(marker), b"labels": [1, 2]}
    (tmp_path / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=3))
    with pytest.raises(
        DataError, match=rf"data_batch_4: refused to unpickle the global {refused}; "
    ) as info:
        read_cifar10(tmp_path)
    assert "numpy.ndarray" in str(info.value)
    assert not marker.exists()


# --- errors ----------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "absent"
    with pytest.raises(
        DataError, match=rf"cifar10: data folder not found: .*{re.escape(str(folder))}"
    ):
        load_cifar10(folder)


def test_folder_with_neither_format(tmp_path: Path) -> None:
    (tmp_path / "readme.html").write_text("not a batch")
    with pytest.raises(DataError, match="cifar10: no CIFAR-10 batches in") as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    for place in ("", "/cifar-10-batches-bin", "/cifar-10-batches-py"):
        assert f"{tmp_path}{place}:" in message
    assert "data_batch_1.bin" in message and "test_batch (Python version)" in message


@pytest.mark.parametrize(
    ("write", "missing"),
    [(write_binary, "data_batch_3.bin"), (write_python, "test_batch")],
    ids=["binary", "python"],
)
def test_missing_batch_file(tmp_path: Path, write, missing: str) -> None:
    write(tmp_path, make_batches())
    (tmp_path / missing).unlink()
    kind = "binary" if missing.endswith(".bin") else "Python"
    with pytest.raises(
        DataError,
        match=rf"cifar10: the {kind} version in {re.escape(str(tmp_path))} is missing "
        rf"{missing}$",
    ):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(("cut", "size"), [(-1, 7 * 3073 - 1), (100, 7 * 3073 + 100)])
def test_binary_wrong_size(tmp_path: Path, cut: int, size: int) -> None:
    batches = make_batches()
    write_binary(tmp_path, batches)
    data = binary_bytes(*batches[2])
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(data[:cut] if cut < 0 else data + bytes(cut))
    with pytest.raises(
        DataError,
        match=rf"data_batch_3\.bin: size {size} bytes is not a positive multiple of the "
        r"3073-byte record",
    ):
        load_cifar10(tmp_path)


def test_binary_empty_file(tmp_path: Path) -> None:
    write_binary(tmp_path, make_batches())
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"test_batch\.bin: size 0 bytes"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("write", [write_binary, write_python], ids=["binary", "python"])
def test_label_out_of_range(tmp_path: Path, write) -> None:
    batches = make_batches()
    batches[1][1][4] = 10
    write(tmp_path, batches)
    with pytest.raises(
        DataError, match=r"data_batch_2(\.bin)?: label 10 at index 4 is out of range \[0, 10\)"
    ):
        load_cifar10(tmp_path)


def test_python_negative_label(tmp_path: Path) -> None:
    write_python(tmp_path, make_batches())
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, -1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=3))
    with pytest.raises(DataError, match=r"test_batch: label -1 at index 1 is out of range"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]},
            r"b'data' must be a uint8 array shaped \(N, 3072\), found a uint8 .* \(2, 3071\)",
        ),
        (
            {b"data": np.zeros(3072, np.uint8), b"labels": [0]},
            r"b'data' must be .* found a uint8 array shaped \(3072,\)",
        ),
        (
            {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
            r"b'data' must be .* found a float32 array",
        ),
        ({b"data": [0, 1], b"labels": [0, 1]}, r"b'data' must be .* found a list"),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1.0]},
            r"b'labels' must be a list of ints, found a list",
        ),
        (
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]},
            r"image/label count mismatch: b'data' has 2 images but b'labels' has 3 labels",
        ),
        (
            {b"images": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]},
            r"missing key b'data' \(found keys: b'images', b'labels'\)",
        ),
        (
            {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]},
            r"missing key b'data' and b'labels' \(found keys: 'data', 'labels'\)",
        ),
        ([np.zeros((2, 3072), np.uint8), [0, 1]], r"expected a pickled dict, found a list"),
    ],
    ids=[
        "short-rows",
        "1d",
        "float",
        "list-data",
        "float-label",
        "count",
        "wrong-key",
        "str-keys",
        "not-dict",
    ],
)
def test_python_malformed_batch(tmp_path: Path, batch: object, message: str) -> None:
    write_python(tmp_path, make_batches())
    (tmp_path / "data_batch_5").write_bytes(pickle.dumps(batch, protocol=3))
    with pytest.raises(DataError, match=rf"data_batch_5: {message}"):
        load_cifar10(tmp_path)


def test_python_truncated_pickle(tmp_path: Path) -> None:
    batches = make_batches()
    write_python(tmp_path, batches)
    (tmp_path / "data_batch_1").write_bytes(py2_batch(*batches[0])[:-300])
    with pytest.raises(DataError, match=r"data_batch_1: not a readable CIFAR-10 Python batch"):
        load_cifar10(tmp_path)


# --- load_dataset ----------------------------------------------------------------------------


def test_load_dataset_cifar10_spec(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar-10-batches-bin", make_batches())
    data = load_dataset(f" cifar10={tmp_path} ", limit_train=10)
    assert data.name == "cifar10"
    assert (data.num_train, data.num_test) == (10, N_TEST)
    assert data.x_train.shape == (10, 32, 32, 3)
    assert data.mean == load_cifar10(tmp_path).mean


@pytest.mark.parametrize("spec", ["cifar10", "cifar10=", "cifar=x"])
def test_load_dataset_bad_cifar_spec(spec: str) -> None:
    with pytest.raises(ValueError, match=r"valid choices: .*'mnist=PATH', 'cifar10=PATH'"):
        load_dataset(spec)


def test_load_dataset_missing_cifar_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10: data folder not found"):
        load_dataset(f"cifar10={tmp_path / 'missing'}")


# --- augmentation ----------------------------------------------------------------------------


def random_images(b: int = 16, h: int = 6, w: int = 5, c: int = 3, seed: int = 0) -> np.ndarray:
    """Images with values in [1, 255], so every 0 in an augmented image is padding."""
    return np.random.default_rng(seed).integers(1, 256, (b, h, w, c)).astype(np.uint8)


def window_of(padded: np.ndarray, out: np.ndarray) -> list[tuple[int, int, bool]]:
    """Every (top, left, flipped) whose window of `padded` equals `out`."""
    h, w = out.shape[:2]
    matches = []
    for top in range(padded.shape[0] - h + 1):
        for left in range(padded.shape[1] - w + 1):
            window = padded[top : top + h, left : left + w]
            for flipped in (False, True):
                if np.array_equal(window[:, ::-1] if flipped else window, out):
                    matches.append((top, left, flipped))
    return matches


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_shape_and_dtype(dtype) -> None:
    images = random_images().astype(dtype)
    out = augment_batch(images, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == dtype
    assert out is not images


def test_augment_is_a_window_of_the_padded_image() -> None:
    images = random_images(b=64)
    out = augment_batch(images, np.random.default_rng(1), padding=2)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    found = [window_of(padded[i], out[i]) for i in range(len(images))]
    assert all(len(m) == 1 for m in found)
    offsets = {(top, left) for ((top, left, _),) in found}
    flips = {flipped for ((_, _, flipped),) in found}
    assert len(offsets) > 10
    assert flips == {False, True}
    assert np.any(out == 0) and np.any(out[:, 2:-2, 2:-2] != 0)


def test_augment_flip_really_flips() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.float32).reshape(1, 4, 5, 3)
    out = augment_batch(np.repeat(image, 32, axis=0), np.random.default_rng(2), padding=0)
    mirrored = image[0, :, ::-1, :]
    assert mirrored[0, 0].tolist() == image[0, 0, 4].tolist()
    same = [np.array_equal(o, image[0]) for o in out]
    flipped = [np.array_equal(o, mirrored) for o in out]
    assert all(a != b for a, b in zip(same, flipped, strict=True))
    assert 0 < sum(flipped) < 32


def test_augment_default_padding_is_four_zeros() -> None:
    images = np.full((200, 8, 8, 1), 9.0, np.float32)
    out = augment_batch(images, np.random.default_rng(3))
    zero_rows = (out == 0).all(axis=(2, 3)).sum(axis=1)
    assert set(zero_rows.tolist()) <= set(range(5)) and max(zero_rows) == 4
    assert set(np.unique(out).tolist()) == {0.0, 9.0}


def test_augment_deterministic() -> None:
    images = random_images()
    a = augment_batch(images, np.random.default_rng(5))
    b = augment_batch(images, np.random.default_rng(5))
    c = augment_batch(images, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("images", "padding", "message"),
    [
        (np.zeros((4, 6, 5)), 4, r"images must be shaped \(B, H, W, C\), got shape \(4, 6, 5\)"),
        (np.zeros((1, 2, 2, 1)), -1, "padding must be a non-negative integer, got -1"),
        (np.zeros((1, 2, 2, 1)), 1.5, "padding must be a non-negative integer, got 1.5"),
    ],
)
def test_augment_bad_arguments(images: np.ndarray, padding, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        augment_batch(images, np.random.default_rng(0), padding=padding)


def test_iterate_batches_augment() -> None:
    x, y = random_images(b=30, seed=4), np.arange(30, dtype=np.int32)
    plain = list(iterate_batches(x, y, 8, seed=3, epoch=2))
    augmented = list(iterate_batches(x, y, 8, seed=3, epoch=2, augment=True))
    assert len(plain) == len(augmented) == 3
    for i, ((xp, yp), (xa, ya)) in enumerate(zip(plain, augmented, strict=True)):
        np.testing.assert_array_equal(yp, ya)
        assert not np.array_equal(xp, xa)
        expected = augment_batch(xp, np.random.default_rng((3, 2, i)))
        np.testing.assert_array_equal(xa, expected)


def test_iterate_batches_augment_resumes_exactly() -> None:
    x, y = random_images(b=40, seed=5), np.arange(40, dtype=np.int32)
    full = list(iterate_batches(x, y, 6, seed=1, epoch=4, augment=True))
    resumed = list(iterate_batches(x, y, 6, seed=1, epoch=4, augment=True, start_batch=4))
    again = list(iterate_batches(x, y, 6, seed=1, epoch=4, augment=True))
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    for (xa, _), (xb, _) in zip(full, again, strict=True):
        np.testing.assert_array_equal(xa, xb)


def test_iterate_batches_augment_needs_images() -> None:
    x, y = np.zeros((10, 4), np.float32), np.zeros(10, np.int32)
    with pytest.raises(ValueError, match=r"augment needs images shaped \(N, H, W, C\)"):
        iterate_batches(x, y, 2, seed=0, epoch=0, augment=True)
    images = np.zeros((10, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match="seed and epoch must be non-negative"):
        iterate_batches(images, y, 2, seed=-1, epoch=0, shuffle=False, augment=True)
