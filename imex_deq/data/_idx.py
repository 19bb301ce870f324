"""Reader for the IDX format of MNIST and Fashion-MNIST, gzipped or raw."""

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
"""Magic number of an IDX file of unsigned-byte images (3 dimensions)."""

LABELS_MAGIC = 0x00000801
"""Magic number of an IDX file of unsigned-byte labels (1 dimension)."""

_GZIP_MAGIC = b"\x1f\x8b"

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data set file or folder is missing, malformed, or inconsistent."""


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) contents of `path`."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        if path.suffix == ".gz":
            raise DataError(f"{path}: not a gzip file (the name ends in .gz)")
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip data ({err})") from err


def _parse_magic(path: Path, buf: bytes, expect: int | None) -> tuple[np.dtype, int]:
    """Check the 4-byte magic number; return the element dtype and number of dimensions."""
    if len(buf) < 4:
        raise DataError(
            f"{path}: truncated file: expected at least 4 bytes of header, found {len(buf)}"
        )
    magic = int.from_bytes(buf[:4], "big")
    if expect is not None and magic != expect:
        raise DataError(
            f"{path}: wrong magic number: found 0x{magic:08X}, expected 0x{expect:08X} "
            f"(0x{IMAGES_MAGIC:08X} for images, 0x{LABELS_MAGIC:08X} for labels)"
        )
    if buf[0] != 0 or buf[1] != 0:
        raise DataError(
            f"{path}: wrong magic number: found 0x{magic:08X}, expected 0x0000TTNN "
            f"(e.g. 0x{IMAGES_MAGIC:08X} for images, 0x{LABELS_MAGIC:08X} for labels); "
            "not an IDX file"
        )
    code, ndim = buf[2], buf[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DataError(f"{path}: unsupported IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    return _DTYPES[code], ndim


def read_idx(path: str | os.PathLike[str], *, expect: int | None = None) -> np.ndarray:
    """Read an IDX file (as used by MNIST and Fashion-MNIST) into a NumPy array.

    Gzip compression is detected from the file's contents, so `.gz` and raw files both work.

    **Arguments:**

    - `path`: the file to read.
    - `expect`: the magic number the file must have, e.g. `0x00000803` for images or
      `0x00000801` for labels; `None` accepts any valid IDX magic number.

    **Returns:**

    An array of the shape given in the header (big-endian dimensions), in native byte order.

    **Raises:**

    `DataError` naming the file for a missing file, a wrong magic number, an unsupported
    dtype code, or a truncated (or over-long) file.
    """
    path = Path(path)
    buf = _read_bytes(path)
    dtype, ndim = _parse_magic(path, buf, expect)
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(
            f"{path}: truncated file: expected {header} bytes of header for {ndim} "
            f"dimensions, found {len(buf)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(buf) - header
    if found < expected:
        raise DataError(
            f"{path}: truncated file: expected {expected} bytes of data for shape {shape}, "
            f"found {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} unexpected trailing bytes: expected {expected} bytes "
            f"of data for shape {shape}, found {found}"
        )
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))
