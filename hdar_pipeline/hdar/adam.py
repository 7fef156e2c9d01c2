"""A minimal Adam for the few tensors of an instance optimisation.

The same update as :class:`torch.optim.Adam` with its defaults (betas 0.9, 0.999, eps 1e-8, no weight
decay, no amsgrad). It exists because constructing the first :class:`torch.optim.Optimizer` in a process
imports ``torch._dynamo`` (about 3 s on a 2-core CPU), which a command-line registration of a few seconds
should not pay. Training keeps :class:`torch.optim.Adam` (its state dict goes into checkpoints).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["Adam"]


class Adam:
    """Adam on a list of leaf tensors with ``requires_grad``.

    Parameters
    ----------
    params : sequence of Tensor
    lr : float
    betas : (float, float)
    eps : float
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bias1 = 1.0 - b1 ** self.t
        bias2_sqrt = (1.0 - b2 ** self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bias1)
