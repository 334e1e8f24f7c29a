"""Time per training step of the same VAE in companion and in Pyro, and the ELBO both reach.

    .venv/bin/python benchmarks/vae_step.py                 # digits, 2,000 steps each
    .venv/bin/python benchmarks/vae_step.py --mnist DIR     # MNIST from IDX files in DIR

One VAE (companion.models.vae.VAE: the same layers, the same initial weights) is trained four
ways, on the same minibatches, with Adam at the same learning rate:

* companion, analytic KL:  ``vae.loss`` (pathwise, closed-form KL), an Adam step from
  ``companion.train.adam``: exactly what ``companion.train.train`` does per step;
* companion, Monte Carlo KL: ``-elbo_monte_carlo_kl(...).mean()``, the estimator Trace_ELBO uses;
* Pyro, ``SVI`` + ``Trace_ELBO`` (Monte Carlo KL), ``pyro.module`` for the two networks, a
  model/guide pair with ``pyro.plate`` and ``poutine.scale(1/B)`` so that its loss is the batch
  mean, as companion's is (Adam is nearly scale-invariant, but this makes the steps identical
  in expectation);
* Pyro, ``SVI`` + ``TraceMeanField_ELBO`` (analytic KL), the counterpart of the first.

Both libraries get the same Adam settings (learning rate, and the fused kernel where the device
has one).

The trainers advance in interleaved blocks of steps, so that a change in the machine's load hits
them all alike. Each step is timed on its own (after warm-up); the table gives the median and
the inter-quartile range. The held-out ELBO of every trainer after the same number of steps is
computed by one function, ``companion.models.vae.evaluate_elbo``, with the same noise.
Validation of distribution arguments is on in both libraries (their default) unless
``--no-validation`` switches it off in both. The table goes to stdout and to
benchmarks/results/vae_step.md (or ``--out``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def _data(args):
    from companion.data import digits, load_mnist, split

    if args.mnist:
        x_train, _ = load_mnist(args.mnist, split="train", binarized=True)
        x_test, _ = load_mnist(args.mnist, split="test", binarized=True)
        return x_train, x_test, "MNIST (binarized), 60,000 / 10,000"
    x, y = digits(binarized=True)
    (x_train, _), (x_test, _) = split(x, y, test_fraction=0.2, generator=torch.Generator().manual_seed(0))
    return x_train, x_test, f"scikit-learn digits (binarized), {len(x_train)} / {len(x_test)}"


def _companion_trainer(model, lr, kl):
    from companion.models import vae
    from companion.train import adam

    opt = adam(model, lr)  # the optimizer companion.train.train builds

    def step(xb):
        if kl == "analytic":
            loss = vae.loss(model, xb)
        else:
            loss = -vae.elbo_monte_carlo_kl(model, xb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _pyro_trainer(model, lr, mean_field, batch_size):
    import pyro
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

    z_dim = model.config.z_dim
    prefix = f"vae{id(model)}"  # one param-store entry per trainer

    def pyro_model(x):
        pyro.module(f"{prefix}_decoder", model.decoder)
        zeros = x.new_zeros(x.shape[0], z_dim)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=model.decoder(z)).to_event(1), obs=x)

    def pyro_guide(x):
        pyro.module(f"{prefix}_encoder", model.encoder)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            mu, log_sigma = model.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(mu, log_sigma.exp()).to_event(1))

    elbo = TraceMeanField_ELBO() if mean_field else Trace_ELBO()
    from companion.train import adam

    # the same Adam settings as companion's (fused where the device has it); Pyro builds one
    # torch optimizer per parameter from them
    fused = adam(model, lr).defaults["fused"]
    svi = SVI(pyro_model, pyro_guide, pyro.optim.Adam({"lr": lr, "fused": fused}), loss=elbo)
    return svi.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=100, help="untimed steps per trainer first")
    parser.add_argument("--block", type=int, default=50, help="steps per trainer before switching")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--z-dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: companion.runtime's policy, COMPANION_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-validation", action="store_true",
                        help="switch off distribution-argument validation in torch and in Pyro alike")
    parser.add_argument("--mnist", default=os.environ.get("COMPANION_MNIST"), help="folder of MNIST IDX files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vae_step.md"))
    args = parser.parse_args()

    import pyro

    from companion.models import vae
    from companion.runtime import device, seed, use_threads
    from companion.train import minibatch_indices

    use_threads(args.threads)
    validation = not args.no_validation
    torch.distributions.Distribution.set_default_validate_args(validation)
    pyro.enable_validation(validation)
    dev = device()
    x_train, x_test, data_name = _data(args)
    x_train, x_test = x_train.to(dev), x_test.to(dev)
    seed(args.seed)
    config = vae.VAEConfig(x_dim=x_train.shape[1], z_dim=args.z_dim, hidden=(args.hidden,))
    base = vae.VAE(config).to(dev)  # every trainer starts from these weights
    pyro.clear_param_store()
    models = {name: copy.deepcopy(base) for name in
              ("companion, analytic KL", "companion, Monte Carlo KL",
               "Pyro Trace_ELBO (Monte Carlo KL)", "Pyro TraceMeanField_ELBO (analytic KL)")}
    names = list(models)
    steppers = {
        names[0]: _companion_trainer(models[names[0]], args.lr, "analytic"),
        names[1]: _companion_trainer(models[names[1]], args.lr, "monte_carlo"),
        names[2]: _pyro_trainer(models[names[2]], args.lr, False, args.batch_size),
        names[3]: _pyro_trainer(models[names[3]], args.lr, True, args.batch_size),
    }
    times = {name: [] for name in names}
    done = {name: 0 for name in names}
    total = args.warmup + args.steps
    start_load = os.getloadavg()
    while any(done[n] < total for n in names):
        for name in names:
            for _ in range(min(args.block, total - done[name])):
                t = done[name]
                seed(args.seed * 100_003 + t)  # the same noise stream for every trainer at step t
                xb = x_train[minibatch_indices(t, len(x_train), args.batch_size, args.seed).to(dev)]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                steppers[name](xb)  # both return loss.item(): the step has finished
                toc = time.perf_counter()
                if t >= args.warmup:
                    times[name].append(toc - tic)
                done[name] += 1
    end_load = os.getloadavg()

    rows = []
    for name in names:
        ms = sorted(1e3 * s for s in times[name])
        q1, med, q3 = ms[len(ms) // 4], statistics.median(ms), ms[3 * len(ms) // 4]
        elbo = vae.evaluate_elbo(models[name], x_test, num_samples=32, generator=torch.Generator(dev).manual_seed(1))
        rows.append((name, med, q1, q3, ms[0], elbo))
    ref_mc = next(r[1] for r in rows if r[0].startswith("Pyro Trace_ELBO"))
    ref_an = next(r[1] for r in rows if r[0].startswith("Pyro TraceMeanField"))

    lines = [
        "# VAE training step: companion vs Pyro SVI",
        "",
        f"- data: {data_name}; batch {args.batch_size}; VAE {config.x_dim}-{args.hidden}-{2 * args.z_dim} / "
        f"{args.z_dim}-{args.hidden}-{config.x_dim}, Bernoulli decoder; Adam lr {args.lr}",
        f"- {args.steps} timed steps per trainer after {args.warmup} warm-up steps, interleaved in blocks of "
        f"{args.block}; held-out ELBO after {total} steps by `vae.evaluate_elbo` (32 samples per image, same noise)",
        f"- device {dev}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, pyro {pyro.__version__}, "
        f"Python {platform.python_version()}; load average (1 min) {start_load[0]:.2f} at start, "
        f"{end_load[0]:.2f} at end, on {os.cpu_count()} CPUs",
        f"- validation of distribution arguments (torch.distributions and Pyro): {'on' if validation else 'off'}",
        "",
        "| trainer | median ms/step | IQR ms | min ms | Pyro (same KL) / this, median | held-out ELBO (nats) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, med, q1, q3, low, elbo in rows:
        ref = ref_an if "analytic" in name else ref_mc
        lines.append(f"| {name} | {med:.3f} | {q1:.3f}-{q3:.3f} | {low:.3f} | {ref / med:.2f}x | {elbo:.3f} |")
    lines.append("")
    lines.append("'Pyro (same KL) / this': the median step time of the Pyro trainer with the same KL estimator "
                 "divided by this trainer's; above 1 means faster than Pyro.")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
