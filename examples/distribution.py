"""AR1Normal as a plain torch distribution: sample, log-density, closed-form KL, dense views.

python examples/distribution.py
"""

import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from rhovae import AR1Normal, StandardNormal

loc = torch.zeros(4, 10)  # (B, d)
rho = torch.full((4, 1), 0.6)  # (B, 1), in (-1, 1)
scale = torch.ones(4, 1)  # (B, 1) = sqrt(s)
q = AR1Normal(loc, rho, scale)
z = q.rsample()  # (4, 10): an exact AR(1) draw, differentiable
print("log q(z):", q.log_prob(z))
print("KL to N(0, I):", kl_divergence(q, StandardNormal(10)))
prior = Independent(Normal(torch.zeros(10), torch.ones(10)), 1)
print("the same KL against torch's own standard normal:", kl_divergence(q, prior))
dense = MultivariateNormal(loc, covariance_matrix=q.covariance_matrix)
torch.testing.assert_close(q.log_prob(z), dense.log_prob(z))  # O(d) matches the dense O(d^3)
print("matches a dense MultivariateNormal")
