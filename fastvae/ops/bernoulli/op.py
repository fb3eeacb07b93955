"""fastvae::bernoulli_log_likelihood: log p(x | logits) with its gradient computed in the forward pass.

log p = x*l - softplus(l);  dlogp/dl = x - sigmoid(l),  dlogp/dx = l.
The custom op, its autograd and its composite are those of every likelihood from logits
(fastvae.ops.logits_likelihood): elbo_loss passes its weight -1/B, and loss.backward() then
hands the forward pass's gradient over with no pass over [B, D].
"""

from __future__ import annotations

import torch

from fastvae.ops.bernoulli.reference import log_prob
from fastvae.ops.logits_likelihood import logits_likelihood_op

bernoulli_log_likelihood_fused = logits_likelihood_op(
    "bernoulli_log_likelihood", "bernoulli", "bernoulli_forward", log_prob, lambda l, x: x - torch.sigmoid(l)
)
bernoulli_log_likelihood_op = bernoulli_log_likelihood_fused.custom_op
bernoulli_log_likelihood_composite = bernoulli_log_likelihood_fused.composite
