"""Per-example (or per-patient) clipped gradient sums: the clipping half of a DP-SGD step
done with ``torch.func`` where Opacus's optimiser does not apply.

A distributed-DP node sends the clipped sum of one Poisson batch plus its share of the
noise (``federation.node.updates``) rather than taking an optimiser step, and the
inversion audit (``audit.inversion``) attacks exactly that vector; both call this module,
so what the audit attacks is what a node sends. Central training clips inside Opacus's
``DPOptimizer`` (``privacy.dpsgd``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def clipped_gradient_sum(net: nn.Module, weights: dict[str, torch.Tensor],
                         images: torch.Tensor, labels: torch.Tensor,
                         max_grad_norm: float, groups: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Sum of the per-example cross-entropy gradients with respect to ``weights`` (names
    relative to ``net``), each clipped to L2 norm ``max_grad_norm``: flattened, float64,
    in the order of ``weights``. ``groups`` (one id per image): each group's (patient's)
    gradients are summed first and the sum is clipped."""

    def sample_loss(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, w, (x.unsqueeze(0),)),
                                           y.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(weights, images, labels)
    flat = torch.cat([grads[k].reshape(images.shape[0], -1) for k in weights], dim=1).double()
    if groups is not None:
        _, inverse = torch.unique(groups, return_inverse=True)
        flat = flat.new_zeros((int(inverse.max()) + 1, flat.shape[1])).index_add_(0, inverse,
                                                                                  flat)
    norms = flat.norm(dim=1, keepdim=True)
    return (flat * (max_grad_norm / norms.clamp(min=max_grad_norm))).sum(dim=0)


def clipped_sum_in_chunks(net: nn.Module, weights: dict[str, torch.Tensor],
                          images: torch.Tensor, labels: torch.Tensor, max_grad_norm: float,
                          groups: torch.Tensor | None = None, chunk: int = 512
                          ) -> tuple[torch.Tensor, float]:
    """:func:`clipped_gradient_sum` over a batch of any size, ``chunk`` rows at a time
    (more only for one patient larger than that: a patient is never cut, ``groups`` sorted
    so that a patient's images are together), and the batch's mean loss."""
    total = torch.zeros(sum(w.numel() for w in weights.values()), dtype=torch.float64)
    losses = []
    for part in _chunks(groups, images.shape[0], chunk):
        x, y = images[part], labels[part]
        total += clipped_gradient_sum(net, weights, x, y, max_grad_norm,
                                      None if groups is None else groups[part])
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(net(x), y)) * x.shape[0])
    return total, sum(losses) / max(images.shape[0], 1)


def _chunks(groups: torch.Tensor | None, n: int, size: int) -> list[slice]:
    """Slices of at most ``size`` rows (more only for one patient larger than that), never
    cutting a group: each patient's gradient is summed whole before it is clipped."""
    if groups is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    starts = [0, *(torch.nonzero(groups[1:] != groups[:-1]).view(-1) + 1).tolist()]
    out, begin = [], 0
    for start, stop in zip(starts, [*starts[1:], n], strict=True):
        if stop - begin > size and start > begin:
            out.append(slice(begin, start))
            begin = start
    out.append(slice(begin, n))
    return out
