"""Shared pieces of the benchmark scripts (`scripts/bench_solvers.py`,
`scripts/bench_peers.py`) and of `tests/test_bench_parity.py`, one concern per module:

- `threads`: thread count, CPU affinity, the machine line (call `configure_threads` before
  anything imports jax or torch);
- `problem`: the MNIST-dense problem in NumPy (weights, batch, the shared residual);
- `configs`: the stopping rules both libraries are configured with;
- `models_jax`, `models_torch`: the same model in each library (each imports its library
  at import time, so import them only after `threads.configure_threads`);
- `parity`: same weights and batch through both, compared;
- `timing`, `report`: timers, progress lines and the JSON results file.

Only the public API of imex-deq is used (`imex_deq`, `imex_deq.experiments`).
"""
