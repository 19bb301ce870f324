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


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict) -> None:
    """Write `meta` and `tree`'s arrays to `path` atomically: a temporary file beside it is
    written, flushed and fsync'ed, then renamed over `path`, and the folder is fsync'ed. A
    crash at any point leaves either the old checkpoint or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = json.dumps(meta).encode()
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(_HEADER.pack(len(encoded)))
        handle.write(encoded)
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Read a checkpoint written by `save_checkpoint` into the structure of `template`
    (build it with `eqx.filter_eval_shape`). Returns `(tree, meta)`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    (length,) = _HEADER.unpack_from(data)
    try:
        meta = json.loads(data[_HEADER.size : _HEADER.size + length])
        tree = eqx.tree_deserialise_leaves(io.BytesIO(data[_HEADER.size + length :]), template)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"checkpoint {path} does not match this model/optimizer or is damaged: {error}"
        ) from error
    return tree, meta
