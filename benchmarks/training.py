"""Time per training step: companion's loop against Pyro's SVI and against the same step in plain torch.

The book's VAE (``companion.models.vae``: 64-128-32 / 16-128-64 on scikit-learn's binarized
digits, Bernoulli decoder, batch 100, Adam at 1e-3) trained four ways, from the same initial
weights, on the same minibatches:

* ``companion``: ``companion.train.train(model, vae.loss, x, ...)``, what a new user writes
  (the pathwise estimator, analytic KL);
* ``plain torch``: the same step written by hand (``plain_vae_loop``): the same networks, the
  same Adam (fused where the device has it), the analytic KL, the same ELBO, the same draws;
  the floor;
* ``Pyro Trace_ELBO``: Pyro's default ``SVI`` (Monte Carlo KL), with ``pyro.module`` for the two
  networks, ``pyro.plate`` and ``poutine.scale(1/B)`` so that its loss is the batch mean;
* ``Pyro TraceMeanField_ELBO``: the same with the analytic KL.

The DDPM step (``companion.models.diffusion``): ``train(eps_model, ddpm_loss)`` against the same
step in plain torch, on the diffusion chapter's two moons and denoiser. The four sampling modes
of the Bayesian layers (``companion.models.bayesian``: local reparameterization, a weight matrix
per example, one shared matrix, Flipout) on the chapter *Bayesian layers*' MLP, against local.

Each trainer runs ``steps`` steps per round, in interleaved rounds after an untimed warm-up
round; a step's time is the round's time over ``steps`` (the loop's own work included: the
minibatch, ``loss.item()``), and the table gives the median over rounds. The held-out ELBO of
companion's and plain torch's models after the same steps must agree to rounding: they draw the
same noise in the same order.
"""
from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from companion import data
from companion.models import diffusion as dm
from companion.models import vae
from companion.runtime import seed as reseed
from companion.train import _epoch_permutation, adam, train

from ._common import Clock, primary_metric, summarize, write_result

__all__ = ["plain_vae_loop", "pyro_vae_loop", "companion_vae_loop", "plain_ddpm_loop",
           "companion_ddpm_loop", "run"]

BATCH = 100  # the VAE chapter's minibatch
LR = 1e-3
BAYES_BATCH, BAYES_LR = 64, 1e-2  # the chapter *Bayesian layers* on digits


# --------------------------------------------------------------------------- the VAE, four ways


def companion_vae_loop(model: vae.VAE, x: torch.Tensor, steps: int, seed: int, device) -> vae.VAE:
    """What a new user writes."""
    train(model, vae.loss, x, steps=steps, batch_size=BATCH, lr=LR, seed=seed, progress=False,
          device=device)
    return model


def plain_vae_loop(model: vae.VAE, x: torch.Tensor, steps: int, seed: int, device) -> vae.VAE:
    """The same training written by hand in plain torch (the floor): ``-ELBO`` of each batch is
    ``BCE(dec(mu + sigma eps), x) + KL(N(mu, sigma^2) || N(0, I))``, Adam on its mean."""
    model.to(device)
    enc, dec = model.encoder, model.decoder
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=adam(model).defaults["fused"])
    torch.manual_seed(seed)  # train() seeds the same way: the same draws, step by step
    n = x.shape[0]
    per_epoch = n // BATCH
    losses = []
    model.train()
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:  # this epoch's order: the one train() draws
            perm = _epoch_permutation(epoch, n, seed)
        xb = x[perm[j * BATCH:(j + 1) * BATCH]].to(device, non_blocking=True)
        mu, log_sigma = enc(xb).chunk(2, dim=-1)
        z = mu + log_sigma.exp() * torch.randn_like(mu)
        nll = F.binary_cross_entropy_with_logits(dec(z), xb, reduction="none").sum(-1)
        kl = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)
        loss = (nll + kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return model


def pyro_vae_loop(model: vae.VAE, x: torch.Tensor, steps: int, seed: int, device,
                  mean_field: bool = False) -> vae.VAE:
    """Pyro's ``SVI`` on the same networks: ``Trace_ELBO`` (its default) or ``TraceMeanField_ELBO``."""
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

    model.to(device)
    z_dim = model.config.z_dim

    def pyro_model(xb):
        pyro.module("decoder", model.decoder)
        zeros = xb.new_zeros(xb.shape[0], z_dim)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=1.0 / xb.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=model.decoder(z)).to_event(1), obs=xb)

    def pyro_guide(xb):
        pyro.module("encoder", model.encoder)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=1.0 / xb.shape[0]):
            mu, log_sigma = model.encoder(xb).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

    pyro.clear_param_store()  # pyro.module would otherwise reuse an earlier run's parameters
    elbo = TraceMeanField_ELBO() if mean_field else Trace_ELBO()
    fused = adam(model).defaults["fused"]  # the same Adam settings as companion's
    svi = SVI(pyro_model, pyro_guide, pyro.optim.Adam({"lr": LR, "fused": fused}), loss=elbo)
    pyro.set_rng_seed(seed)
    n = x.shape[0]
    per_epoch = n // BATCH
    model.train()
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            perm = _epoch_permutation(epoch, n, seed)
        svi.step(x[perm[j * BATCH:(j + 1) * BATCH]].to(device, non_blocking=True))
    model.eval()
    return model


# --------------------------------------------------------------------------- the DDPM step


def companion_ddpm_loop(model, x, abar, steps: int, seed: int, device, batch: int):
    """``train(eps_model, ddpm_loss)``, as the diffusion chapter trains its denoiser."""
    abar = abar.to(device)
    train(model, lambda m, xb: dm.ddpm_loss(m, xb, abar), x, steps=steps, batch_size=batch,
          lr=LR, seed=seed, progress=False, device=device)
    return model


def plain_ddpm_loop(model, x, abar, steps: int, seed: int, device, batch: int):
    """The same step by hand: ``t ~ U{1..T}``, ``eps ~ N(0, I)``, ``x_t = sqrt(abar_t) x0 +
    sqrt(1 - abar_t) eps``, ``||eps - eps_theta(x_t, t)||^2`` averaged; the same draws."""
    model.to(device)
    abar = abar.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR, fused=adam(model).defaults["fused"])
    torch.manual_seed(seed)
    n = x.shape[0]
    per_epoch = n // batch
    model.train()
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if j == 0:
            perm = _epoch_permutation(epoch, n, seed)
        x0 = x[perm[j * batch:(j + 1) * batch]].to(device, non_blocking=True)
        t = torch.randint(1, abar.shape[0] + 1, (x0.shape[0],), device=device)
        eps = torch.randn_like(x0)
        a = abar[t - 1].unsqueeze(-1)  # (B, 1), float64 as in companion
        x_t = a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * eps
        loss = (eps - model(x_t, t)).square().sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    model.eval()
    return model


# --------------------------------------------------------------------------- the run


def _time_rounds(trainers: dict, make_model, steps: int, rounds: int, device) -> tuple[dict, dict]:
    """Seconds per step of each trainer over interleaved rounds (after one untimed warm-up
    round of a tenth of the steps), and the models of the last round."""
    clock = Clock(device)
    for fn in trainers.values():
        fn(make_model(), max(1, steps // 10))
    times = {name: {"wall_s": [], "cpu_s": []} for name in trainers}
    models = {}
    for _ in range(rounds):
        for name, fn in trainers.items():
            model = make_model()
            wall0, cpu0 = clock.now()
            models[name] = fn(model, steps)
            wall1, cpu1 = clock.now()
            times[name]["wall_s"].append((wall1 - wall0) / steps)
            times[name]["cpu_s"].append((cpu1 - cpu0) / steps)
    return times, models


def _rows(group: str, times: dict, reference: str, metric: str, **extra) -> list[dict]:
    med = {name: summarize(t[metric])["median"] for name, t in times.items()}
    return [{"group": group, "trainer": name, "wall_s": summarize(t["wall_s"]),
             "cpu_s": summarize(t["cpu_s"]), "reference": reference,
             "vs_reference": med[name] / med[reference], **extra.get(name, {})}
            for name, t in times.items()]


def run(out_dir: Path, *, quick: bool, device: torch.device, seed: int = 0) -> Path:
    """Time the VAE and DDPM steps (and the Bayesian layers when present); write ``training.json``."""
    started = time.perf_counter()
    metric = primary_metric(device)
    steps, rounds = (60, 3) if quick else (300, 7)
    rows = []

    # the VAE
    x, y = data.digits(binarized=True)
    (x_train, _), (x_test, _) = data.split(x, y, test_fraction=0.2, generator=torch.Generator().manual_seed(0))
    config = vae.VAEConfig(x_dim=x_train.shape[1], z_dim=16, hidden=(128,))
    reseed(seed)
    base = vae.VAE(config)
    trainers = {
        "companion": lambda m, n: companion_vae_loop(m, x_train, n, seed, device),
        "plain torch": lambda m, n: plain_vae_loop(m, x_train, n, seed, device),
    }
    if importlib.util.find_spec("pyro") is not None:
        trainers["Pyro Trace_ELBO"] = lambda m, n: pyro_vae_loop(m, x_train, n, seed, device)
        trainers["Pyro TraceMeanField_ELBO"] = lambda m, n: pyro_vae_loop(m, x_train, n, seed, device, True)
    times, models = _time_rounds(trainers, lambda: copy.deepcopy(base), steps, rounds, device)
    x_test = x_test.to(device)
    elbo = {name: {"held_out_elbo": vae.evaluate_elbo(m, x_test, num_samples=32,
                                                       generator=torch.Generator(device).manual_seed(1))}
            for name, m in models.items()}
    rows += _rows("vae", times, "plain torch", metric, **elbo)

    # the DDPM step, at the diffusion chapter's quick sizes
    points = data.two_moons(5_000, generator=torch.Generator().manual_seed(seed))
    abar = dm.abar(dm.linear_betas())
    ddpm_batch = 1_024
    reseed(seed)
    eps_base = dm.EpsMLP(2, hidden=64, depth=3)
    ddpm = {
        "companion": lambda m, n: companion_ddpm_loop(m, points, abar, n, seed, device, ddpm_batch),
        "plain torch": lambda m, n: plain_ddpm_loop(m, points, abar, n, seed, device, ddpm_batch),
    }
    times, models = _time_rounds(ddpm, lambda: copy.deepcopy(eps_base), steps, rounds, device)
    held = data.two_moons(1_024, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    loss = {}
    for name, m in models.items():
        g = torch.Generator(device).manual_seed(1)
        with torch.no_grad():
            loss[name] = {"held_out_loss": dm.ddpm_loss(m, held, abar.to(device), generator=g).item()}  # same draws
    rows += _rows("ddpm", times, "plain torch", metric, **loss)

    bayesian = importlib.util.find_spec("companion.models.bayesian") is not None
    if bayesian:
        rows += _bayesian_rows(steps, rounds, device, metric, seed)

    settings = {
        "steps_per_round": steps, "rounds": rounds, "metric": metric,
        "vae": {"data": f"scikit-learn digits, binarized, {len(x_train)} training / {len(x_test)} held-out",
                "config": {"x_dim": config.x_dim, "z_dim": config.z_dim, "hidden": list(config.hidden)},
                "batch": BATCH, "lr": LR, "held_out_elbo": "vae.evaluate_elbo, 32 samples, same noise"},
        "ddpm": {"data": "two moons, 5,000 points", "denoiser": "EpsMLP(2, hidden=64, depth=3)",
                 "batch": ddpm_batch, "lr": LR, "T": dm.T},
        "bayesian_layers": {"data": "scikit-learn digits (grey levels), labels", "net": "BayesMLP([64, 100, 10])",
                            "batch": BAYES_BATCH, "lr": BAYES_LR, "loss": "bayesian.negative_elbo",
                            "modes": "local, per_example, shared, flipout; ratios against local"}
        if bayesian else "companion.models.bayesian not present",
        "validation": "torch.distributions and Pyro defaults (on)",
    }
    return write_result(out_dir, "training", device=device, profile="quick" if quick else "full",
                        settings=settings, rows=rows, started=started)


def _bayesian_rows(steps, rounds, device, metric, seed) -> list[dict]:
    """The four sampling modes of Part III's Bayesian layers: ``train(BayesMLP, negative_elbo)``
    at the chapter's quick sizes (digits, one hidden layer of 100), one mode per trainer."""
    import functools

    from companion.models import bayesian

    x, y = data.digits()  # grey levels, as the chapter *Bayesian layers* fits them
    (x_train, y_train), _ = data.split(x, y, test_fraction=0.2, generator=torch.Generator().manual_seed(0))
    elbo = functools.partial(bayesian.negative_elbo, num_data=x_train.shape[0])
    reseed(seed)
    base = bayesian.BayesMLP([x_train.shape[1], 100, 10], mode="local")

    def make_trainer(mode):
        def run_mode(model, n):
            model.mode = mode
            train(model, elbo, (x_train, y_train), steps=n, batch_size=BAYES_BATCH, lr=BAYES_LR,
                  seed=seed, progress=False, device=device)
            return model
        return run_mode

    trainers = {mode: make_trainer(mode) for mode in bayesian.MODES}
    times, _ = _time_rounds(trainers, lambda: copy.deepcopy(base), steps, rounds, device)
    return _rows("bayesian_mlp", times, "local", metric)
