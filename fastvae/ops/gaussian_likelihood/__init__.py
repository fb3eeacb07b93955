"""The Gaussian log-likelihood of data under a decoder's mean and log-variance, with its gradients
computed in the same pass (the posterior's sampler and KL are the `gaussian` family)."""
