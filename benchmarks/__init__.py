"""The book's measured comparisons, in one entry point: ``python -m benchmarks`` (``make bench``).

    python -m benchmarks                      # every sub-benchmark, on the CPU (minutes)
    python -m benchmarks --quick              # a few seconds each (tests/test_benchmarks.py)
    python -m benchmarks --device cuda        # on a GPU: results/cuda/, the CPU set untouched
    python -m benchmarks --chapters           # also run every chapter and record its time
    python -m benchmarks --only variance,training

Sub-benchmarks, one module each, each writing one JSON file under ``benchmarks/results/<device>/``
with the machine it ran on (CPU model, cores, torch threads, versions, load average, date):

* :mod:`benchmarks.variance`: estimator variances on the grids of Mohamed et al. (2020),
  Figures 2 and 3, against their exact values (``variance.json``);
* :mod:`benchmarks.throughput`: samples per second of companion's estimators, of Pyro's, and of
  plain torch, ``S`` from 1e2 to 1e6 (``throughput.json``);
* :mod:`benchmarks.training`: time per training step of the book's VAE (companion, plain torch,
  Pyro SVI) and of the DDPM denoiser (``training.json``);
* :mod:`benchmarks.diffusion_per_sample`: per-example schedule gradients, copies of the
  parameters against ``per_sample_gradients`` (``per_sample.json``);
* :mod:`benchmarks.chapters` (``--chapters`` or ``--chapters-log``): each chapter's execution
  time in the quick profile, from a test run (``chapters.json``).

``benchmarks/threads.py`` (each chapter with the thread policy and with torch's default, idle
and beside a busy process) stays a script of its own: it runs every chapter four times.

The appendix chapter *Benchmarks* (``book/appendix/benchmarks.md``) renders the committed
results without rerunning them and asserts what they must show. Timing rules are in
:mod:`benchmarks._common`.
"""
__all__ = ["SUBBENCHMARKS"]

# name -> module; the order in which `python -m benchmarks` runs them
SUBBENCHMARKS = ("variance", "throughput", "training", "per_sample")
