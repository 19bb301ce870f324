"""Data-parallel training: the batch split over a "data" mesh axis, the model replicated.

One jitted training step serves both the single-device and the data-parallel case: the
inputs' shardings tell XLA how to partition it (the batch is split across devices, the
parameters and optimizer state are copies, the gradient mean becomes an all-reduce). No
`shard_map`, so the solvers' while loops need no change.

```python
mesh = make_data_mesh()                  # every device, one "data" axis
model, opt_state = replicate(mesh, (model, opt_state))
x, y = shard_batch(mesh, x), shard_batch(mesh, y)
model, opt_state, metrics = trainer.step(model, opt_state, x, y, key)
```

The batch size must be a multiple of the number of devices.

**Several hosts.** Call `initialize_distributed()` (or pass `--distributed` to the CLI,
`TrainConfig(distributed=True)`) before anything else touches JAX, on every host. It calls
`jax.distributed.initialize`, which reads

- `JAX_COORDINATOR_ADDRESS`: `host:port` of process 0 (e.g. `10.0.0.1:1234`),

and this function adds

- `JAX_NUM_PROCESSES`: the number of processes (hosts), and
- `JAX_PROCESS_ID`: this process's index, `0 .. JAX_NUM_PROCESSES - 1`.

Leave all three unset on a cluster JAX detects by itself (SLURM, Open MPI, Cloud TPU).
The mesh then spans every device of every host. Each host runs the same program on the
same data order (same seed) and feeds only its own slice of each global batch:
`host_slice(x)` picks it, `shard_batch` assembles the global array from the local pieces.
Only process 0 writes logs and checkpoints (`is_main_process()`); every process reads
them to resume, so `out_dir` must be on a shared filesystem.
"""

import os

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

DATA_AXIS = "data"


def _distributed_is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    return jax.process_count() > 1


def initialize_distributed() -> None:
    """Join a multi-host JAX run (see the module docstring for the environment variables).

    A no-op if this process has already joined one. Must run before any JAX computation.
    """
    if _distributed_is_initialized():
        return
    num = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=None if num is None else int(num),
        process_id=None if pid is None else int(pid),
    )


def is_main_process() -> bool:
    """True on process 0 (the one that writes files), and in every single-process run."""
    return jax.process_index() == 0


def make_data_mesh(devices=None) -> Mesh:
    """A one-axis mesh named `"data"` over `devices` (default: all devices, which are the
    local devices unless `initialize_distributed` joined several hosts), with an `Auto`
    axis type so that XLA partitions the jitted step and `eqx.filter_shard` accepts it."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
    """Raise `ValueError` unless `batch_size` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"data_parallel: batch_size={batch_size} must be a multiple of the "
            f"{n} devices of the mesh."
        )


def host_slice(x: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch that every process holds in full: all of it
    in a single-process run, rows `[i * n / P, (i + 1) * n / P)` of n on process i of P."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return x
    rows = x.shape[0] // count
    return x[index * rows : (index + 1) * rows]


def shard_batch(mesh: Mesh, x: PyTree) -> PyTree:
    """Place a batch (an array or a PyTree of arrays, leading axis = batch) split along its
    first axis over the `"data"` axis (`NamedSharding(mesh, P("data"))`).

    Single process: `x` is the whole batch. Several processes: `x` is this process's
    slice (`host_slice`), and the result is the global batch assembled from all of them.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def put(leaf):
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree_util.tree_map(put, x)


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Copy every array of `tree` (a model, an optimizer state, ...) onto every device of
    the mesh (`NamedSharding(mesh, P())`); non-array leaves pass through."""
    return eqx.filter_shard(tree, NamedSharding(mesh, P()))


def to_host(x: jax.Array) -> np.ndarray:
    """A NumPy copy of a (possibly sharded, possibly multi-host) array."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
