"""fastvae::continuous_bernoulli_log_likelihood: log p(x | logits) of the continuous Bernoulli with its
gradient computed in the forward pass.

log p = x*l - softplus(l) + log C(l);  dlogp/dl = x - sigmoid(l) + 1/l - 1/sinh(l),  dlogp/dx = l
(stable forms in reference.py). The custom op, its autograd and its composite are those of
every likelihood from logits (fastvae.ops.logits_likelihood), the Bernoulli's included.
"""

from __future__ import annotations

from fastvae.ops.continuous_bernoulli.reference import grad_logits, log_prob
from fastvae.ops.logits_likelihood import logits_likelihood_op

continuous_bernoulli_log_likelihood_fused = logits_likelihood_op(
    "continuous_bernoulli_log_likelihood", "continuous_bernoulli", "continuous_bernoulli_forward", log_prob, grad_logits
)
