"""Next-token cross-entropy with the optional z-loss of Wortsman et al. (arXiv 2309.14322).

z-loss adds ``weight * mean(logsumexp(logits)^2)``: it pulls the softmax normaliser log Z toward 0 so that the
output logits cannot drift to large values (one cause of late divergence). With the weight at 0 the loss is
exactly ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, {"ce": ..., "z_loss": ...})`` for logits [..., V] and targets [...]; means over non-ignored tokens.

    ``z_loss`` in the dict is the weighted term that was added (0 when off); both dict values are detached.
    """
    logits = logits.float().reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    if z_loss == 0.0:
        ce = F.cross_entropy(logits, targets, ignore_index=ignore_index)
        return ce, {"ce": ce.detach(), "z_loss": torch.zeros((), device=ce.device)}
    # One logsumexp serves both terms: ce = lse - logit[target], z = lse^2.
    keep = targets != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    count = keep.sum().clamp(min=1)
    ce = ((lse - target_logit) * keep).sum() / count
    z = z_loss * (lse.square() * keep).sum() / count
    return ce + z, {"ce": ce.detach(), "z_loss": z.detach()}
