"""One small training loop for every model in the book.

``train(model, loss_fn, data, steps=...)`` moves the model to :func:`companion.runtime.device`,
seeds, draws minibatches, steps an optimizer, shows a tqdm progress bar, records the loss of
every step, and writes a checkpoint every ``checkpoint_every`` steps. A run interrupted and
resumed with ``resume=True`` ends with exactly the parameters of a run straight through: the
checkpoint holds the model, the optimizer, the history and the random-number state, and the
minibatch of step ``t`` is a pure function of ``(seed, t)``.

Checkpoints contain only tensors and plain Python values, so they load with
``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm  # tqdm.auto warns in notebooks without ipywidgets

from . import runtime

__all__ = ["History", "train", "adam", "minibatch_indices", "load_checkpoint"]

Batch = Tensor | tuple[Tensor, ...] | None
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class History:
    """What a run recorded: ``loss[t]`` is the loss of step ``t``; ``evals`` the callback's dicts."""

    loss: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def to_state(self) -> dict:
        return {"loss": list(self.loss), "evals": [dict(e) for e in self.evals]}

    @classmethod
    def from_state(cls, state: dict) -> History:
        return cls(list(state["loss"]), [dict(e) for e in state["evals"]])


def minibatch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> Tensor:
    """Indices of the minibatch of ``step``: epochs of a fresh permutation, last partial batch dropped.

    Epoch ``e = step // (N // B)`` uses ``randperm(N)`` from a generator seeded with ``(seed, e)``,
    so the batch of any step can be recomputed without state (which makes resuming exact).
    """
    _check_batch_size(batch_size, num_examples)
    epoch, j = divmod(step, num_examples // batch_size)
    return _epoch_permutation(epoch, num_examples, seed)[j * batch_size : (j + 1) * batch_size]


def _check_batch_size(batch_size: int, num_examples: int) -> None:
    if batch_size < 1 or batch_size > num_examples:
        raise ValueError(f"batch_size must be in [1, {num_examples}] (the number of examples), got {batch_size}")


def _epoch_permutation(epoch: int, num_examples: int, seed: int) -> Tensor:
    """The order of the examples in ``epoch``: ``randperm(N)`` from a generator seeded with ``(seed, epoch)``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=gen)


def _as_tensors(data) -> tuple[Tensor, ...] | None:
    if data is None:
        return None
    tensors = (data,) if isinstance(data, Tensor) else tuple(data)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError("data must be None, a tensor, or a sequence of tensors")
    if len({t.shape[0] for t in tensors}) != 1:
        raise ValueError(f"data tensors must share their first dimension, got {[tuple(t.shape) for t in tensors]}")
    return tensors


def _plain(metrics: dict) -> dict:
    """Scalars as Python floats, so that a checkpoint stays loadable with weights_only=True."""
    if not isinstance(metrics, dict):
        raise ValueError(f"callback must return a dict, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and not isinstance(value, Tensor):  # numpy scalars
            value = value.item()
        out[str(key)] = value
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, model, optimizer, step: int, history: History) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history.to_state(),
        "rng": _rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint as a dict, loaded with ``weights_only=True`` (tensors and plain values only)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _supports_fused_adam(device: torch.device) -> bool:
    # fused Adam: CUDA since torch 2.0, CPU since 2.4
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def adam(model: nn.Module, lr: float = 1e-3, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``model``'s parameters, with the fused kernel where the device has
    one (one kernel for all parameters instead of a Python loop: ~0.3 ms less per step for the
    book's VAE on a CPU). Build it after moving the model to its device."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    kwargs.setdefault("fused", _supports_fused_adam(device))
    return torch.optim.Adam(params, lr=lr, **kwargs)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: Tensor | Sequence[Tensor] | None,
    *,
    steps: int,
    batch_size: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    clip_grad_norm: float | None = None,
    callback: Callable[[int, nn.Module], dict] | None = None,
    callback_every: int = 100,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> History:
    """Minimize ``loss_fn(model, batch)`` for ``steps`` optimizer steps and return the :class:`History`.

    If ``loss_fn`` has a parameter named ``step``, it is called as ``loss_fn(model, batch, step=t)``
    with the 0-based step, so that schedules (temperatures, KL weights) survive a resume.
    The model's initial weights come from whatever generator built it: seed before building it.

    data
        ``None`` (``loss_fn`` gets ``batch=None``), a tensor, or tensors sharing their first
        dimension; each step's batch is ``batch_size`` rows of each (all rows if ``None``), moved
        to the device. A single tensor is passed as a tensor, several as a tuple.
    optimizer
        Built for ``model``'s parameters; :func:`adam` with ``lr`` if ``None``.
    callback
        ``callback(step, model) -> dict | None`` after every ``callback_every`` steps and after
        the last, under ``torch.no_grad``; its dicts (with ``"step"`` added) go to
        ``history.evals``.
    checkpoint_path, checkpoint_every
        Save every ``checkpoint_every`` steps and at the end.
    resume
        Continue from ``checkpoint_path`` (which must exist) instead of starting afresh.
    progress
        A tqdm bar; ``None`` shows it only when stderr is a terminal.

    A loss that is not finite stops the run with a ``FloatingPointError`` naming the step. The
    step's own work is that of a hand-written loop: the minibatch order is drawn once per epoch,
    and nothing but ``loss.item()`` reads back from the device (``benchmarks/training.py``).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if checkpoint_every is not None and (checkpoint_every < 1 or checkpoint_path is None):
        raise ValueError("checkpoint_every must be >= 1 and needs a checkpoint_path")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path")
    if callback_every < 1:
        raise ValueError(f"callback_every must be >= 1, got {callback_every}")
    takes_step = "step" in inspect.signature(loss_fn).parameters
    tensors = _as_tensors(data)
    n = None if tensors is None else tensors[0].shape[0]
    if batch_size is not None and n is None:
        raise ValueError("batch_size needs data")
    dev = torch.device(device) if device is not None else runtime.device()
    model.to(dev)
    optimizer = optimizer if optimizer is not None else adam(model, lr)
    history, start = History(), 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {path}")
        state = load_checkpoint(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = History.from_state(state["history"]), int(state["step"])
        _set_rng_state(state["rng"])
    else:
        runtime.seed(seed)
    if batch_size is not None:
        _check_batch_size(batch_size, n)
        per_epoch = n // batch_size
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=steps, initial=min(start, steps), disable=not show, leave=False, dynamic_ncols=True)
    model.train()
    perm, perm_epoch = None, None  # this epoch's order (minibatch_indices, drawn once per epoch)
    for step in range(start, steps):
        batch = None
        if tensors is not None:
            rows = slice(None)
            if batch_size is not None:
                epoch, j = divmod(step, per_epoch)
                if epoch != perm_epoch:
                    perm, perm_epoch = _epoch_permutation(epoch, n, seed), epoch
                rows = perm[j * batch_size : (j + 1) * batch_size]
            parts = tuple(t[rows].to(dev, non_blocking=True) for t in tensors)
            batch = parts[0] if len(parts) == 1 else parts
        loss = loss_fn(model, batch, step=step) if takes_step else loss_fn(model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss is {value} at step {step}: the model's parameters or outputs have become "
                f"infinite or NaN (lower the learning rate, or clip gradients with clip_grad_norm)"
            )
        history.loss.append(value)
        done = step + 1
        if callback is not None and (done % callback_every == 0 or done == steps):
            model.eval()
            with torch.no_grad():
                metrics = callback(done, model)
            if metrics is not None:  # a callback may act (e.g. average weights) and record nothing
                history.evals.append({"step": done, **_plain(metrics)})
            model.train()
        if path is not None and checkpoint_every is not None and (done % checkpoint_every == 0 or done == steps):
            _save(path, model, optimizer, done, history)
        if show:
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            bar.update(1)
    bar.close()
    model.eval()
    return history
