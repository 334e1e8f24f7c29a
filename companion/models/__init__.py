"""Models of the book, one idea per module.

- :mod:`companion.models.layers`            small building blocks (MLPs)
- :mod:`companion.models.vae`               Gaussian-latent VAE (chapter *Variational autoencoders*)
- :mod:`companion.models.hierarchical`      two-level latent chains and a hierarchical VAE
- :mod:`companion.models.discrete_vae`      categorical latents with Gumbel-Softmax
- :mod:`companion.models.concrete_dropout`  learned dropout rates with relaxed Bernoulli masks
- :mod:`companion.models.diffusion`         DDPM and a learnable noise schedule
- :mod:`companion.models.attention`         logistic-normal stochastic attention
- :mod:`companion.models.bayesian`          Bayesian linear and conv layers, local reparameterization
"""
