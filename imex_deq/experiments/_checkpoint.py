"""Atomic checkpoints: model + optimizer state + JSON metadata in one file."""

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import equinox as eqx

_HEADER = struct.Struct("<Q")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match the model."""


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a
    mix: a temporary file beside it is written and fsync'ed, renamed over `path`, and the
    folder is fsync'ed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict) -> None:
    """Write `meta` and `tree`'s arrays to `path` atomically (`write_atomically`)."""
    encoded = json.dumps(meta).encode()
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(len(encoded)))
    buffer.write(encoded)
    eqx.tree_serialise_leaves(buffer, tree)
    write_atomically(path, buffer.getvalue())


def _meta_length(path: Path, head: bytes) -> int:
    """The length of the JSON metadata, from the first bytes of the checkpoint at `path`;
    a file too short for the header is a `CheckpointError`."""
    if len(head) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(head)} bytes)")
    return _HEADER.unpack_from(head)[0]


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint written by `save_checkpoint` (e.g. its
    `global_step`), without reading its arrays."""
    path = _existing(path)
    with open(path, "rb") as handle:
        encoded = handle.read(_meta_length(path, handle.read(_HEADER.size)))
    try:
        return json.loads(encoded)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} has damaged metadata: {error}") from error


def load_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Read a checkpoint written by `save_checkpoint` into the structure of `template`
    (build it with `eqx.filter_eval_shape`). Returns `(tree, meta)`."""
    path = _existing(path)
    data = path.read_bytes()
    length = _meta_length(path, data)
    try:
        meta = json.loads(data[_HEADER.size : _HEADER.size + length])
        tree = eqx.tree_deserialise_leaves(io.BytesIO(data[_HEADER.size + length :]), template)
    except Exception as error:  # re-raised below with the file named
        raise CheckpointError(
            f"checkpoint {path} does not match this model/optimizer or is damaged: {error}"
        ) from error
    return tree, meta
