"""The continuous Bernoulli log-likelihood from logits, with its gradient computed in the same pass."""
