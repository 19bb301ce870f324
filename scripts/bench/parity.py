"""Parity of imex-deq with its PyTorch peers: the same NumPy weights and batch through both
libraries, one forward and backward each, compared. Imports jax and torch at import time:
import it only after `threads.configure_threads`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import torch

from .models_jax import jax_grad_fn, jax_params
from .models_torch import TorchNet
from .problem import PARAM_NAMES, rel_diff, shared_residual


@dataclasses.dataclass
class Parity:
    name: str
    z_rel: float
    grad_rel: dict[str, float]
    residual_peer: float  # max shared residual of the peer's z
    residual_imex: float
    tol: float
    ok: bool
    why: str = ""

    def line(self) -> str:
        grads = " ".join(f"{k}={v:.1e}" for k, v in self.grad_rel.items())
        status = "OK" if self.ok else f"FAIL ({self.why})"
        return (
            f"parity {self.name}: z* rel diff {self.z_rel:.2e}; grad rel diff {grads}; "
            f"max shared residual peer {self.residual_peer:.1e} / imex {self.residual_imex:.1e}"
            f" -> {status}"
        )


def parity_check(
    name: str,
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    torch_core,
    jax_make_core: Callable,
    tol: float = 1e-4,
    residual_mode: str | None = "rel",
) -> Parity:
    """Same weights, same batch, one forward+backward on each side (no optimiser step):
    `torch_core` (a `models_torch` core module) against `jax_make_core` (a `models_jax`
    core). Compares z* and every parameter gradient by relative difference, and reports the
    shared residual of both sides' z*. `residual_mode=None` for rows with no fixed point."""
    net = TorchNet(weights, torch_core)
    net.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    logits, z_t, e_t = net(xt)
    loss = torch.nn.functional.cross_entropy(logits, yt)
    loss.backward()
    g_t = {k: p.grad.detach().numpy() for k, p in net.named_weights().items()}

    grad = jax_grad_fn(jax_make_core)
    _, g_j, z_j, e_j, _, _ = jax.block_until_ready(grad(jax_params(weights), x, y))
    z_t = z_t.detach().numpy()
    e_t = e_t.detach().numpy()
    z_rel = rel_diff(z_t, z_j)
    grad_rel = {k: rel_diff(g_t[k], np.asarray(g_j[k])) for k in PARAM_NAMES}
    if residual_mode is not None:
        r_peer = float(shared_residual(weights, z_t, e_t, residual_mode).max())
        r_imex = float(
            shared_residual(weights, np.asarray(z_j), np.asarray(e_j), residual_mode).max()
        )
    else:
        r_peer = r_imex = float("nan")
    reasons = []
    if not np.isfinite(z_rel) or z_rel >= tol:
        reasons.append(f"z* differs by {z_rel:.2e} >= {tol:g}")
    bad = [k for k, v in grad_rel.items() if not np.isfinite(v) or v >= tol]
    if bad:
        reasons.append("gradients differ for " + ", ".join(f"{k} ({grad_rel[k]:.2e})" for k in bad))
    return Parity(name, z_rel, grad_rel, r_peer, r_imex, tol, not reasons, "; ".join(reasons))
