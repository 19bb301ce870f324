"""Tests of `imex_deq.data`: IDX reading, data set loading, and deterministic batching."""

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from imex_deq.data import (
    DataError,
    Dataset,
    _datasets,
    iterate_batches,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_folder,
    load_mnist,
    num_batches,
    read_idx,
)

DTYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    code = DTYPE_CODES[array.dtype.type] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_folder(
    folder: Path,
    *,
    n_train: int = 12,
    n_test: int = 5,
    hw: tuple[int, int] = (4, 3),
    gz: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / (f"{stem}.gz" if gz else stem), array, gz=gz)
    return arrays


@pytest.fixture
def no_fashion_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide the Debian package and dpkg so only `$IMEX_DEQ_DATA` is searched."""
    absent = tmp_path / "no-debian" / "fashion-mnist"
    monkeypatch.setattr(_datasets, "DEBIAN_FASHION_MNIST_DIR", absent)
    monkeypatch.setattr(_datasets, "_dpkg_folders", list)
    monkeypatch.delenv("IMEX_DEQ_DATA", raising=False)
    return absent


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.arange(7, dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
        np.arange(-3, 3, dtype=np.int32),
        np.linspace(-1, 1, 10, dtype=np.float32).reshape(5, 2),
    ],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), array, gz=gz)
    out = read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[...] = 0


def test_read_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.uint8)
    path = write_idx(tmp_path / "labels-without-suffix", array, gz=True)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_expected_magic_ok(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "img", np.zeros((2, 3, 3), np.uint8), gz=False)
    assert read_idx(path, expect=0x00000803).shape == (2, 3, 3)


def test_read_idx_wrong_expected_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(
        DataError, match=r"labels: wrong magic number: found 0x00000801, expected 0x00000803"
    ):
        read_idx(path, expect=0x00000803)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(DataError, match=r"junk\.bin: wrong magic number: found 0x504B0304"):
        read_idx(path)


def test_read_idx_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8), code=0x0A))
    with pytest.raises(DataError, match=r"odd: unsupported IDX dtype code 0x0A"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated_data(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((10, 2, 2), np.uint8))[:-5]
    path = tmp_path / ("trunc.gz" if gz else "trunc")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(
        DataError, match=r"trunc(\.gz)?: truncated file: expected 40 bytes of data .* found 35"
    ):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    with pytest.raises(DataError, match=r"short: truncated file: expected 16 bytes of header"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"xx")
    with pytest.raises(DataError, match=r"long: 2 unexpected trailing bytes"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:-12])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated gzip data"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.gz: file not found"):
        read_idx(tmp_path / "nope.gz")


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --- IDX folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_folder(tmp_path: Path, gz: bool) -> None:
    arrays = write_folder(tmp_path / "mnist", gz=gz)
    data = load_idx_folder(tmp_path / "mnist", "toy")
    assert isinstance(data, Dataset)
    assert (data.name, data.num_classes, data.image_shape) == ("toy", 10, (4, 3, 1))
    assert data.x_train.shape == (12, 4, 3, 1) and data.x_test.shape == (5, 4, 3, 1)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    assert (data.num_train, data.num_test) == (12, 5)
    scaled = arrays["train-images-idx3-ubyte"] / 255.0
    assert data.mean == pytest.approx(scaled.mean())
    assert data.std == pytest.approx(scaled.std())
    np.testing.assert_allclose(
        data.x_train[..., 0], (scaled - data.mean) / data.std, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        data.x_test[..., 0] * data.std + data.mean,
        arrays["t10k-images-idx3-ubyte"] / 255.0,
        atol=1e-5,
    )
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert abs(float(data.x_train.mean())) < 1e-5
    assert float(data.x_train.std()) == pytest.approx(1.0, abs=1e-4)


def test_load_mnist(tmp_path: Path) -> None:
    write_folder(tmp_path / "m")
    data = load_mnist(tmp_path / "m")
    assert data.name == "mnist"
    assert data.x_train.shape == (12, 4, 3, 1)


def test_load_idx_folder_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "absent"
    with pytest.raises(DataError, match=rf"data folder not found: .*{re.escape(str(folder))}"):
        load_idx_folder(folder, "mnist")


def test_load_idx_folder_missing_file(tmp_path: Path) -> None:
    write_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing IDX files") as info:
        load_idx_folder(tmp_path, "mnist")
    message = str(info.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in message
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in message
    assert "train-images" not in message


def test_load_idx_folder_count_mismatch(tmp_path: Path) -> None:
    write_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), gz=True)
    with pytest.raises(
        DataError,
        match=r"count mismatch: .*train-images-idx3-ubyte\.gz has 12 images but "
        r".*train-labels-idx1-ubyte\.gz has 11 labels",
    ):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_swapped_files(tmp_path: Path) -> None:
    arrays = write_folder(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", arrays["t10k-labels-idx1-ubyte"], gz=True)
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz: wrong magic number: found 0x00000801"
    ):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_label_out_of_range(tmp_path: Path) -> None:
    write_folder(tmp_path)
    labels = np.array([0, 1, 2, 12, 3], np.uint8)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, gz=True)
    with pytest.raises(DataError, match=r"label 12 at index 3 is out of range \[0, 10\)"):
        load_idx_folder(tmp_path, "mnist")


def test_load_idx_folder_size_mismatch(tmp_path: Path) -> None:
    write_folder(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 4, 4), np.uint8), gz=True)
    with pytest.raises(DataError, match=r"image size mismatch"):
        load_idx_folder(tmp_path, "mnist")


# --- Fashion-MNIST search ------------------------------------------------------------------


def test_fashion_mnist_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fashion_sources: Path
) -> None:
    write_folder(tmp_path / "root" / "fashion-mnist", n_train=9)
    monkeypatch.setenv("IMEX_DEQ_DATA", str(tmp_path / "root"))
    data = load_fashion_mnist()
    assert data.name == "fashion-mnist"
    assert data.x_train.shape == (9, 4, 3, 1)


def test_fashion_mnist_env_takes_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_folder(tmp_path / "fashion-mnist", n_train=7)
    monkeypatch.setenv("IMEX_DEQ_DATA", str(tmp_path))
    assert load_fashion_mnist().num_train == 7


def test_fashion_mnist_falls_back_to_dpkg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fashion_sources: Path
) -> None:
    write_folder(tmp_path / "elsewhere", n_train=8)
    monkeypatch.setattr(_datasets, "_dpkg_folders", lambda: [tmp_path / "elsewhere"])
    assert load_fashion_mnist().num_train == 8


def test_fashion_mnist_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fashion_sources: Path
) -> None:
    (tmp_path / "root" / "fashion-mnist").mkdir(parents=True)
    monkeypatch.setenv("IMEX_DEQ_DATA", str(tmp_path / "root"))
    with pytest.raises(DataError, match="fashion-mnist: data not found") as info:
        load_fashion_mnist()
    message = str(info.value)
    assert str(tmp_path / "root" / "fashion-mnist") in message
    assert "missing train-images-idx3-ubyte" in message
    assert str(no_fashion_sources) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "IMEX_DEQ_DATA" in message


def test_fashion_mnist_not_found_env_unset(no_fashion_sources: Path) -> None:
    with pytest.raises(DataError, match=r"\$IMEX_DEQ_DATA is not set") as info:
        load_fashion_mnist()
    assert str(no_fashion_sources) in str(info.value)


def test_dpkg_folders_is_a_list() -> None:
    folders = _datasets._dpkg_folders()
    assert all(isinstance(f, Path) for f in folders)


def _debian_fashion_mnist_or_skip() -> Path:
    folder = _datasets.DEBIAN_FASHION_MNIST_DIR
    if not folder.is_dir():
        pytest.skip(
            f"Fashion-MNIST not installed at {folder}; "
            "run `apt-get install -y dataset-fashion-mnist`"
        )
    return folder


def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _debian_fashion_mnist_or_skip()
    monkeypatch.delenv("IMEX_DEQ_DATA", raising=False)
    if shutil.which("dpkg"):
        assert folder in _datasets._dpkg_folders()
    data = load_fashion_mnist()
    assert data.name == "fashion-mnist"
    assert data.x_train.shape == (60000, 28, 28, 1)
    assert data.x_test.shape == (10000, 28, 28, 1)
    assert data.image_shape == (28, 28, 1)
    assert data.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(data.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.y_test), np.full(10, 1000))
    assert data.mean == pytest.approx(0.2860, abs=1e-3)
    assert data.std == pytest.approx(0.3530, abs=1e-3)
    assert abs(float(data.x_train.mean(dtype=np.float64))) < 1e-4
    assert float(data.x_train.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-4)


# --- digits and specs ----------------------------------------------------------------------


def test_load_digits() -> None:
    data = load_digits()
    assert (data.name, data.num_classes, data.image_shape) == ("digits", 10, (8, 8, 1))
    assert data.num_train + data.num_test == 1797
    assert data.num_test == 360
    assert data.x_train.shape == (data.num_train, 8, 8, 1)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    assert 0.0 < data.mean < 1.0
    assert abs(float(data.x_train.mean(dtype=np.float64))) < 1e-5
    assert float(data.x_train.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-4)
    raw_min = (0.0 - data.mean) / data.std
    assert float(data.x_train.min()) == pytest.approx(raw_min, abs=1e-5)
    counts = np.bincount(data.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_load_digits_seeded() -> None:
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_load_digits_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_digits(test_fraction=fraction)


def test_load_dataset_digits_with_limits() -> None:
    full = load_dataset("digits")
    small = load_dataset(" digits ", limit_train=100, limit_test=20)
    assert small.x_train.shape == (100, 8, 8, 1) and small.y_test.shape == (20,)
    np.testing.assert_array_equal(small.x_train, full.x_train[:100])
    np.testing.assert_array_equal(small.y_test, full.y_test[:20])
    assert (small.mean, small.std) == (full.mean, full.std)
    assert load_dataset("digits", limit_train=10**6).num_train == full.num_train


def test_load_dataset_mnist_path(tmp_path: Path) -> None:
    write_folder(tmp_path / "m", gz=False)
    data = load_dataset(f"mnist={tmp_path / 'm'}", limit_test=2)
    assert data.name == "mnist"
    assert (data.num_train, data.num_test) == (12, 2)


def test_load_dataset_fashion_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path / "fashion-mnist", n_train=6)
    monkeypatch.setenv("IMEX_DEQ_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").num_train == 6


@pytest.mark.parametrize(
    "spec", ["cifar10", "cifar10=", "mnist", "mnist=", "digits=3", "", "fashion"]
)
def test_load_dataset_bad_spec(spec: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"unknown dataset spec {re.escape(repr(spec))}; valid choices: 'digits', "
        r"'fashion-mnist', 'mnist=PATH', 'cifar10=PATH'$",
    ):
        load_dataset(spec)


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_load_dataset_bad_limit(limit: object) -> None:
    with pytest.raises(ValueError, match="limit_train must be a positive integer"):
        load_dataset("digits", limit_train=limit)  # type: ignore[arg-type]


def test_load_dataset_missing_mnist_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        load_dataset(f"mnist={tmp_path / 'missing'}")


# --- batching ------------------------------------------------------------------------------


def _data(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n, dtype=np.int32)


def test_batches_deterministic() -> None:
    x, y = _data()
    a = list(iterate_batches(x, y, 5, seed=1, epoch=3))
    b = list(iterate_batches(x, y, 5, seed=1, epoch=3))
    assert len(a) == num_batches(23, 5) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0], 2 * ya)


def test_batches_differ_across_epochs_and_seeds() -> None:
    x, y = _data()

    def order(seed: int, epoch: int) -> np.ndarray:
        return np.concatenate([yb for _, yb in iterate_batches(x, y, 23, seed=seed, epoch=epoch)])

    assert not np.array_equal(order(0, 0), order(0, 1))
    assert not np.array_equal(order(0, 0), order(1, 0))
    assert not np.array_equal(order(0, 0), np.arange(23))


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_cover_each_sample_once(drop_last: bool) -> None:
    x, y = _data()
    batches = list(iterate_batches(x, y, 5, seed=0, epoch=2, drop_last=drop_last))
    assert len(batches) == num_batches(23, 5, drop_last)
    seen = np.concatenate([yb for _, yb in batches])
    assert len(seen) == len(np.unique(seen))
    if drop_last:
        assert [len(yb) for _, yb in batches] == [5, 5, 5, 5]
        assert len(seen) == 20
    else:
        assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
        np.testing.assert_array_equal(np.sort(seen), np.arange(23))


def test_batches_resume() -> None:
    x, y = _data()
    full = list(iterate_batches(x, y, 4, seed=7, epoch=5))
    resumed = list(iterate_batches(x, y, 4, seed=7, epoch=5, start_batch=3))
    assert len(resumed) == len(full) - 3
    for (_, ya), (_, yb) in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(ya, yb)


def test_batches_no_shuffle() -> None:
    x, y = _data(6)
    batches = list(iterate_batches(x, y, 2, seed=0, epoch=0, shuffle=False))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), np.arange(6))


def test_num_batches() -> None:
    assert num_batches(10, 3) == 3
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(9, 3, drop_last=False) == 3
    assert num_batches(10, 10) == 1


@pytest.mark.parametrize(
    ("batch_size", "message"),
    [(0, "batch_size must be positive, got 0"), (24, "batch_size 24 is larger than .* 23")],
)
def test_batches_bad_batch_size(batch_size: int, message: str) -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=message):
        iterate_batches(x, y, batch_size, seed=0, epoch=0)
    with pytest.raises(ValueError, match=message):
        num_batches(23, batch_size)


def test_batches_bad_arguments() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="different lengths: 23 and 22"):
        iterate_batches(x, y[:-1], 4, seed=0, epoch=0)
    with pytest.raises(ValueError, match="must be non-negative"):
        iterate_batches(x, y, 4, seed=-1, epoch=0)
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 5\]"):
        iterate_batches(x, y, 4, seed=0, epoch=0, start_batch=6)
