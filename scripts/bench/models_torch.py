"""The MNIST-dense model on the PyTorch side (torchdeq, torchdiffeq), built from
`problem`'s NumPy weights, with counters of f evaluations and VJPs through f. Imports torch
at import time: import this module only after `threads.configure_threads`; torchdeq and
torchdiffeq are imported where a core needs them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .configs import DEQConfig, ODEConfig


class _CountVJP(torch.autograd.Function):
    """Identity; its backward adds one to `counter.vjps`."""

    @staticmethod
    def forward(ctx, t, counter):
        ctx.counter = counter
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class NFECounter:
    """Counts evaluations of f (Python calls) and VJPs through f (backward calls of an
    identity autograd.Function wrapped around f's output, so every vector-Jacobian product
    through f — torchdeq's IFT solver steps, torchdiffeq's adjoint dynamics, plain backprop
    — is counted once)."""

    def __init__(self):
        self.evals = 0
        self.vjps = 0

    def reset(self):
        self.evals = 0
        self.vjps = 0

    def wrap_output(self, out):
        self.evals += 1
        if torch.is_grad_enabled() and out.requires_grad:
            return _CountVJP.apply(out, self)
        return out


class TorchF(nn.Module):
    """f(z, e) = relu(W1 z) + relu(W2 e), counting evaluations and VJPs."""

    def __init__(self, width):
        super().__init__()
        self.w1 = nn.Linear(width, width, bias=False)
        self.w2 = nn.Linear(width, width, bias=False)
        self.counter = NFECounter()

    def forward(self, z, e):
        out = torch.relu(self.w1(z)) + torch.relu(self.w2(e))
        return self.counter.wrap_output(out)


class ODEFunc(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f
        self.e = None

    def forward(self, t, z):
        return self.f(z, self.e)


class DEQCore(nn.Module):
    """torchdeq DEQ, configured to do what imex-deq's ImplicitAdjoint does: exact
    implicit gradient (ift=True; torchdeq's default is the one-step phantom gradient),
    same solver forwards and for the adjoint system, same stopping rule."""

    def __init__(self, cfg: DEQConfig):
        super().__init__()
        from torchdeq import get_deq

        self.cfg = cfg
        self.deq = get_deq(
            core="sliced",  # torchdeq's default core; one solve, then the grad function
            f_solver=cfg.solver,
            b_solver=cfg.solver,
            f_max_iter=cfg.f_max_iter,
            b_max_iter=cfg.b_max_iter,
            f_tol=cfg.f_tol,
            b_tol=cfg.b_tol,
            f_stop_mode=cfg.stop_mode,  # torchdeq default is "abs"
            b_stop_mode=cfg.stop_mode,
            ift=True,  # exact IFT gradient; default is 1-step phantom gradient
        )
        self.last_info = None

    def forward(self, f, e):
        z0 = torch.zeros_like(e)
        z_out, info = self.deq(lambda z: f(z, e), z0)
        self.last_info = info
        return z_out[-1]


class ODECore(nn.Module):
    """torchdiffeq odeint_adjoint on [0, t1], dopri5; gradients reach W1, W2 and the
    embedding e (passed as an explicit adjoint parameter, since f closes over it)."""

    def __init__(self, cfg: ODEConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, f, e):
        from torchdiffeq import odeint_adjoint

        func = ODEFunc(f)
        func.e = e
        t = torch.tensor([0.0, self.cfg.t1], dtype=e.dtype)
        params = tuple(p for p in (f.w1.weight, f.w2.weight, e) if p.requires_grad)
        ys = odeint_adjoint(
            func,
            torch.zeros_like(e),
            t,
            rtol=self.cfg.rtol,
            atol=self.cfg.atol,
            method="dopri5",
            adjoint_params=params,
        )
        return ys[-1]


class ExplicitCore(nn.Module):
    def forward(self, f, e):
        return f(torch.zeros_like(e), e)


class TorchNet(nn.Module):
    def __init__(self, weights: dict[str, np.ndarray], core: nn.Module):
        super().__init__()
        width, d_in = weights["we"].shape
        classes = weights["wh"].shape[0]
        self.embed = nn.Linear(d_in, width)
        self.f = TorchF(width)
        self.head = nn.Linear(width, classes)
        self.core = core
        with torch.no_grad():
            for name, param in self.named_weights().items():
                param.copy_(torch.from_numpy(weights[name]))

    def named_weights(self) -> dict:
        return {
            "we": self.embed.weight,
            "be": self.embed.bias,
            "w1": self.f.w1.weight,
            "w2": self.f.w2.weight,
            "wh": self.head.weight,
            "bh": self.head.bias,
        }

    def forward(self, x):
        e = torch.relu(self.embed(x))
        z = self.core(self.f, e)
        return self.head(z), z, e


def torch_step(net, opt, x, y) -> dict:
    """One training step; returns loss, NFE counts, z and e. Forward NFE: f evaluations
    during the forward pass; backward NFE: VJPs through f during backward (plus, reported
    apart, f re-evaluations during backward)."""
    counter = net.f.counter
    counter.reset()
    opt.zero_grad(set_to_none=True)
    logits, z, e = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    fwd = counter.evals
    counter.reset()
    loss.backward()
    bwd_vjps, bwd_evals = counter.vjps, counter.evals
    opt.step()
    return {
        "loss": float(loss.detach()),
        "fwd_nfe": fwd,
        "bwd_vjps": bwd_vjps,
        "bwd_evals": bwd_evals,
        "z": z.detach().numpy(),
        "e": e.detach().numpy(),
    }
