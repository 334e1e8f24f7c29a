"""Sequences, reinforcement learning and control: pathwise gradients through time.

Part *Sequences, reinforcement learning and control* of the book, one module per chapter:

- :mod:`companion.control.policy_gradient`  Gaussian policies, a differentiable point mass,
  pathwise policy gradients and REINFORCE on the same policy and environment
- :mod:`companion.control.state_space`      the autoregressive latent ``z_t = a z_{t-1} + b + s eps_t``,
  backpropagation through time, a Markov Gaussian variational posterior, the local-level model
- :mod:`companion.control.lqg`              linear-quadratic control with Gaussian policies: exact
  and simulated costs, the Riccati equation
"""
