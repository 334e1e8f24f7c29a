"""companion: the estimators, distributions and models of the book *Pathwise Gradients*.

Modules are organised by what a reader cites (see the book's intro):

- :mod:`companion.runtime`          device, the thread policy, seeding, the quick/full profiles
- :mod:`companion.estimators`       pathwise, score-function and measure-valued gradients
- :mod:`companion.closed_forms`     exact Gaussian expectations used as references
- :mod:`companion.distributions`    truncated normal/logistic, Kumaraswamy-Beta KL, clipping
- :mod:`companion.relaxations`      Gumbel-max, Gumbel-Softmax, straight-through, annealing
- :mod:`companion.mixtures`         a Gaussian mixture with an implicit ``rsample``; four routes
- :mod:`companion.vi`               Gaussian variational inference on a conjugate model
- :mod:`companion.sequence_design`  the protein-design toy (a Potts fitness over 20 letters)
- :mod:`companion.two_sample`       energy distance and MMD, with permutation tests
- :mod:`companion.models`           VAE, hierarchical and discrete VAEs, concrete dropout, DDPM,
                                    stochastic attention, Bayesian layers (local reparameterization)
- :mod:`companion.control`          policy gradients, state-space latents, linear-quadratic control
- :mod:`companion.science`          cross-disciplinary science: kinetics, molecules, causal
                                    inference, survival, textures, reaction networks, ecology
- :mod:`companion.train`            the one training loop (progress bar, checkpoint/resume)
- :mod:`companion.data`             data shipped with packages, generators, an MNIST IDX reader
- :mod:`companion.plotting`         the book's figure style

Nothing runs on import beyond defining functions.
"""
__version__ = "0.1.0"
