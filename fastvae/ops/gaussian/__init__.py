"""The diagonal Gaussian posterior q(z|x) = N(mu, exp(logvar)): reparameterized sampling with
its KL to N(0, I) in one pass, and the KL alone."""
