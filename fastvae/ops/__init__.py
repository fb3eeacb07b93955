"""torch.library custom ops, one file per fused op (`fastvae::<name>`).

Each op reshapes its inputs to 2-D row views, asks `fastvae.backend` which
implementation runs, and registers a fake (meta) implementation and autograd,
so that torch.compile(fullgraph=True) sees one opaque node and
torch.library.opcheck passes. Validation happens once, in fastvae.functional.

`<name>` is the `FusedOp` fastvae.functional calls (plain eager calls skip the
dispatcher, see fastvae.ops.common.FusedOp); `<name>_op` is the registered custom op.
`elbo.NegativeELBO` is no custom op: it is the one autograd node a plain eager
negative ELBO becomes (traced code composes the Bernoulli op with torch ops instead).
"""

from fastvae.ops.bernoulli import bernoulli_log_likelihood, bernoulli_log_likelihood_op
from fastvae.ops.gaussian_kl import gaussian_kl, gaussian_kl_op
from fastvae.ops.reparameterize_kl import (reparameterize_kl, reparameterize_kl_backward,
                                           reparameterize_kl_backward_op, reparameterize_kl_op)

__all__ = [
    "bernoulli_log_likelihood",
    "bernoulli_log_likelihood_op",
    "gaussian_kl",
    "gaussian_kl_op",
    "reparameterize_kl",
    "reparameterize_kl_op",
    "reparameterize_kl_backward",
    "reparameterize_kl_backward_op",
]
