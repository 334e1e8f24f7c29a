"""Stochastic attention with logistic-normal weights: ``w = softmax(mu + L eps)``.

Chapter *Stochastic attention*. The attention scores of one query over its ``K`` keys are Gaussian,
``z = mu + L eps`` with ``eps ~ N(0, I)``, where ``mu`` are the scaled dot-product scores
(Vaswani et al. 2017) and the factor ``L`` is computed by the layer from the queries and keys; the
weights ``w = softmax(z)`` then follow a logistic-normal law on the simplex (Aitchison and Shen
1980). Every step from ``eps`` to the output is differentiable, so ``mu`` and ``L`` are trained
end to end by pathwise gradients, with an ELBO whose KL term compares the scores' law to a prior
(Fan et al. 2020, *Bayesian Attention Modules*). Three structures of ``L`` (per query):

``"diagonal"``
    ``L = diag(d)``, one softplus scale per key, ``d_qk = softplus(a . q_q + c . k_k + b)``;
``"lowrank"``
    ``L = [diag(d), U]`` with ``U = k A`` ``(K, r)``: ``Cov z = diag(d^2) + U U^T``, so the scores
    of keys with similar features are correlated; ``eps`` has ``K + r`` entries;
``"cholesky"``
    ``L = diag(d) + tril(C C^T, -1)`` with ``C = k A``: a dense lower-triangular factor, ``O(K^2)``
    per query, for small ``K``.

Shapes: queries ``(B, Q, D)``, keys and values ``(B, K, D)``; per head the scores are
``(B, H, Q, K)``. With ``mean_correction=True`` the scores are shifted by ``-diag(L L^T) / 2``, so
that ``E[exp z_k] = exp(mu_k)``: the expected unnormalized weights are those of deterministic
attention.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NOISE",
    "PRIORS",
    "ScoreLaw",
    "noise_size",
    "score_noise",
    "score_variance",
    "score_factor",
    "logistic_normal_weights",
    "LogisticNormalAttention",
    "RetrievalTask",
    "retrieval_task",
    "RetrievalModel",
    "retrieval_loss",
]

NOISE = ("diagonal", "lowrank", "cholesky")
PRIORS = ("standard", "key")


class ScoreLaw(NamedTuple):
    """The Gaussian law of the scores ``z = loc + L eps`` of every query, for each head.

    loc
        ``mu``, the scaled dot-product scores ``(B, H, Q, K)``.
    scale
        ``d > 0``, the diagonal part of ``L``, ``(B, H, Q, K)``.
    factor
        ``None`` (diagonal), the low-rank columns ``U`` ``(B, H, K, r)`` (lowrank), or the strictly
        lower-triangular part ``T`` ``(B, H, K, K)`` of ``L`` (cholesky); shared by the queries.
    kind
        One of :data:`NOISE`.
    """

    loc: Tensor
    scale: Tensor
    factor: Tensor | None
    kind: str


def _check_kind(kind: str) -> str:
    if kind not in NOISE:
        raise ValueError(f"noise must be one of {NOISE}, got {kind!r}")
    return kind


def noise_size(law: ScoreLaw) -> int:
    """Entries of ``eps`` per query: ``K``, or ``K + r`` for the low-rank law."""
    k = law.loc.shape[-1]
    return k + law.factor.shape[-1] if law.kind == "lowrank" else k


def score_noise(law: ScoreLaw, eps: Tensor) -> Tensor:
    """``L eps`` for every query without building ``L``: ``(B, H, Q, K)``.

    ``eps`` is ``(B, H, Q, K)``, or ``(B, H, Q, K + r)`` for the low-rank law (first the ``K``
    entries of the diagonal part, then the ``r`` of the factor).
    """
    k = law.loc.shape[-1]
    if eps.shape != (*law.loc.shape[:-1], noise_size(law)):
        raise ValueError(f"eps must have shape {(*law.loc.shape[:-1], noise_size(law))}, got {tuple(eps.shape)}")
    if law.kind == "diagonal":
        return law.scale * eps
    if law.kind == "lowrank":  # d * eps_K + U eps_r
        return law.scale * eps[..., :k] + torch.einsum("bhkr,bhqr->bhqk", law.factor, eps[..., k:])
    return law.scale * eps + torch.einsum("bhij,bhqj->bhqi", law.factor, eps)  # (diag(d) + T) eps


def score_variance(law: ScoreLaw) -> Tensor:
    """``diag(L L^T)``, the variance of each score: ``d^2 + sum_j F_kj^2``, ``(B, H, Q, K)``."""
    var = law.scale**2
    if law.factor is not None:
        var = var + law.factor.pow(2).sum(-1).unsqueeze(2)  # rows of U or T, shared by the queries
    return var


def score_factor(law: ScoreLaw) -> Tensor:
    """The dense factor ``L`` of every query: ``(B, H, Q, K, K)`` or ``(B, H, Q, K, K + r)``.

    For teaching and testing (it costs ``O(K^2)`` memory per query): ``z = loc + L @ eps``.
    """
    diag = torch.diag_embed(law.scale)
    if law.kind == "diagonal":
        return diag
    q = law.loc.shape[2]
    shared = law.factor.unsqueeze(2).expand(-1, -1, q, -1, -1)
    return torch.cat([diag, shared], -1) if law.kind == "lowrank" else diag + shared


def logistic_normal_weights(mu: Tensor, factor: Tensor, eps: Tensor, *, mean_correction: bool = False,
                            mask: Tensor | None = None) -> Tensor:
    """``w = softmax(mu + L eps - c)`` for a dense factor ``L``: the logistic-normal weights.

    mu ``(..., K)``, factor ``L`` ``(..., K, M)``, eps ``(..., M)``; ``c = diag(L L^T) / 2`` with
    ``mean_correction`` (so that ``E[exp z_k] = exp(mu_k)``), else 0. ``mask`` ``(..., K)`` (True
    where a key may be attended) sets the other scores to ``-inf``. The straightforward version of
    what :class:`LogisticNormalAttention` computes with a structured ``L``. Returns ``(..., K)``.
    """
    if factor.shape[:-1] != mu.shape or eps.shape != (*mu.shape[:-1], factor.shape[-1]):
        raise ValueError(f"need mu (..., K), factor (..., K, M), eps (..., M); got "
                         f"{tuple(mu.shape)}, {tuple(factor.shape)}, {tuple(eps.shape)}")
    z = mu + (factor @ eps.unsqueeze(-1)).squeeze(-1)
    if mean_correction:
        z = z - factor.pow(2).sum(-1) / 2
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    return torch.softmax(z, -1)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class LogisticNormalAttention(nn.Module):
    """Multi-head attention whose weights are logistic-normal: ``w = softmax(mu + L eps)``.

    ``forward(query, keys, values, *, mask=None)`` with query ``(B, Q, dim)``, keys and values
    ``(B, K, dim)`` returns ``(output, weights)``: output ``(B, Q, dim)`` and weights
    ``(B, H, Q, K)``. Per head (``hd = dim / num_heads``) with projected ``q``, ``k``, ``v``::

        mu_qk = q_q . k_k / sqrt(hd),    z = mu + L eps,    w = softmax(z),    out_q = sum_k w_qk v_k,

    and the heads are concatenated and projected. ``L`` has the structure ``noise`` (see the module
    docstring). In eval mode, or with ``noise_scale = 0``, the noise is off: ``w = softmax(mu)``.

    mean_correction
        Shift the scores by ``-diag(L L^T) / 2``, so that ``E[exp z_k] = exp(mu_k)`` (the
        parameterization of Bayesian Attention Modules, Fan et al. 2020).
    prior, prior_scale
        The prior of :meth:`kl` on the scores, ``N(m_p, prior_scale^2 I)``: ``"standard"`` centres
        it on ``mu``, ``"key"`` on key-only scores ``m_p = k . a_p`` (Fan et al.'s contextual
        prior); with ``mean_correction`` the prior mean is shifted by ``-prior_scale^2 / 2`` too.
    rank
        Columns of the low-rank factor, or features of the Cholesky factor's ``C``.
    init_scale
        The initial diagonal scale ``d``; ``noise_scale`` multiplies ``L`` (1 by default).
    mask
        ``(B, K)`` or ``(B, Q, K)`` booleans, True where a key may be attended; every query needs
        one such key.
    eps, generator
        The standard normals of one call (``(B, H, Q, K)``, or ``K + r`` last for ``"lowrank"``),
        or the generator that draws them.

    Chapter *Stochastic attention*.
    """

    def __init__(self, dim: int, *, num_heads: int = 1, noise: str = "diagonal", rank: int = 2,
                 mean_correction: bool = False, prior: str = "standard", prior_scale: float = 1.0,
                 init_scale: float = 1.0, noise_scale: float = 1.0) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.noise = _check_kind(noise)
        self.dim, self.num_heads, self.head_dim, self.rank = dim, num_heads, dim // num_heads, rank
        self.mean_correction, self.prior = bool(mean_correction), prior
        self.prior_scale = _check_positive("prior_scale", prior_scale)
        self.noise_scale = noise_scale
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        h, hd = num_heads, self.head_dim
        # d_qk = softplus(a . q_q + c . k_k + b), starting at init_scale
        self.scale_query = nn.Parameter(torch.zeros(h, hd))
        self.scale_key = nn.Parameter(torch.zeros(h, hd))
        self.scale_bias = nn.Parameter(torch.full((h,), _inverse_softplus(_check_positive("init_scale", init_scale))))
        if noise != "diagonal":  # U = k A (lowrank) or C = k A (cholesky), small at first
            self.factor_weight = nn.Parameter(torch.randn(h, hd, rank) * 0.1 / math.sqrt(hd))
        if prior == "key":
            self.prior_key = nn.Parameter(torch.zeros(h, hd))
        self._last: tuple[ScoreLaw, Tensor | None] | None = None

    @property
    def noise_scale(self) -> float:
        """A fixed multiplier of ``L``; 0 turns the noise off."""
        return self._noise_scale

    @noise_scale.setter
    def noise_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"noise_scale must be a non-negative number, got {value!r}")
        self._noise_scale = float(value)

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, dim) -> (B, H, N, hd)
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _check(self, query: Tensor, keys: Tensor, values: Tensor) -> None:
        for name, t in (("query", query), ("keys", keys), ("values", values)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != self.dim:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape (B, N, {self.dim}), got {shape}")
            if t.dtype != self.q_proj.weight.dtype:
                raise ValueError(f"{name} must have dtype {self.q_proj.weight.dtype}, got {t.dtype}")
        if keys.shape[:2] != values.shape[:2] or query.shape[0] != keys.shape[0]:
            raise ValueError(f"query {tuple(query.shape)}, keys {tuple(keys.shape)} and values "
                             f"{tuple(values.shape)} must share B, and keys and values K")

    def _mask(self, mask: Tensor | None, b: int, q: int, k: int) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape not in ((b, k), (b, q, k)):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape ({b}, {k}) or ({b}, {q}, {k}), got {shape}")
        mask = (mask.unsqueeze(1) if mask.dim() == 2 else mask).expand(b, q, k)
        if not bool(mask.any(-1).all()):
            raise ValueError("mask must leave at least one key for every query")
        return mask.unsqueeze(1)  # (B, 1, Q, K): the same for every head

    def score_law(self, query: Tensor, keys: Tensor) -> ScoreLaw:
        """The law of the scores of ``query`` ``(B, Q, dim)`` over ``keys`` ``(B, K, dim)``.

        Projects both and splits the heads, as :meth:`forward` does; the noise scale and the
        factor are those of the current ``noise_scale``.
        """
        return self._law(self._heads(self.q_proj(query)), self._heads(self.k_proj(keys)))

    def _law(self, q: Tensor, k: Tensor) -> ScoreLaw:
        # q (B, H, Q, hd), k (B, H, K, hd): projected, per head
        mu = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, Q, K)
        pre = (torch.einsum("bhqd,hd->bhq", q, self.scale_query).unsqueeze(-1)
               + torch.einsum("bhkd,hd->bhk", k, self.scale_key).unsqueeze(-2)
               + self.scale_bias[:, None, None])
        c = self.noise_scale
        scale = c * F.softplus(pre)
        factor = None
        if self.noise != "diagonal":
            feats = torch.einsum("bhkd,hdr->bhkr", k, self.factor_weight)  # (B, H, K, r)
            factor = c * feats if self.noise == "lowrank" else \
                c * torch.tril(feats @ feats.transpose(-1, -2), diagonal=-1)
        return ScoreLaw(mu, scale, factor, self.noise)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, *, mask: Tensor | None = None,
                eps: Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor]:
        self._check(query, keys, values)
        b, nq, nk = query.shape[0], query.shape[1], keys.shape[1]
        m = self._mask(mask, b, nq, nk)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(keys)), self._heads(self.v_proj(values))
        law = self._law(q, k)
        z = law.loc
        if self.training and self.noise_scale > 0:
            if eps is None:
                shape = (*law.loc.shape[:-1], noise_size(law))
                eps = torch.randn(shape, generator=generator, dtype=z.dtype, device=z.device)
            z = z + score_noise(law, eps)
            if self.mean_correction:
                z = z - score_variance(law) / 2
            self._last = (law, m, k)
        else:
            self._last = None
        if m is not None:
            z = z.masked_fill(~m, float("-inf"))
        w = torch.softmax(z, -1)  # (B, H, Q, K)
        out = (w @ v).transpose(1, 2).reshape(b, nq, self.dim)
        return self.out_proj(out), w

    def kl(self) -> Tensor:
        """``sum KL(N(m, L L^T) || N(m_p, prior_scale^2 I))`` over the batch, heads and queries of
        the last training-mode forward call, over each query's unmasked keys; 0 if the noise was off::

            KL = 1/2 [ tr(S) / p^2 + |m - m_p|^2 / p^2 - K + K log p^2 - log det S ],   S = L L^T.

        ``m`` is ``mu`` (minus ``diag(S) / 2`` with mean correction); ``m_p`` as in the class
        docstring. Divide by the number of training examples in an ELBO.
        """
        if self._last is None:
            return self.scale_bias.new_zeros(())
        law, mask, k = self._last
        p2 = self.prior_scale**2
        var = score_variance(law)
        prior_loc = law.loc if self.prior == "standard" else \
            torch.einsum("bhkd,hd->bhk", k, self.prior_key).unsqueeze(2).expand_as(law.loc)
        diff = law.loc - prior_loc
        if self.mean_correction:
            diff = diff - (var - p2) / 2
        active = torch.ones_like(law.loc, dtype=torch.bool) if mask is None else mask.expand_as(law.loc)
        a = active.to(law.loc.dtype)
        num_active = a.sum(-1)
        quad = ((var + diff**2) * a).sum(-1) / p2
        return 0.5 * (quad - num_active + num_active * math.log(p2) - self._logdet(law, active)).sum()

    def _logdet(self, law: ScoreLaw, active: Tensor) -> Tensor:
        """``log det S_AA`` of each query's covariance restricted to its active keys ``A``."""
        a = active.to(law.loc.dtype)
        log_d2 = (2 * law.scale.log() * a).sum(-1)
        if law.kind == "diagonal":
            return log_d2
        if law.kind == "lowrank":  # det(D^2 + U U^T) = det(D^2) det(I_r + U^T D^-2 U)
            u = law.factor.unsqueeze(2) * a.unsqueeze(-1)  # (B, H, Q, K, r), inactive rows zero
            cap = torch.einsum("bhqkr,bhqk,bhqks->bhqrs", u, law.scale.pow(-2), u)
            eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
            return log_d2 + torch.linalg.cholesky(eye + cap).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2
        if bool(active.all()):  # triangular L: log det L L^T = sum log d^2
            return log_d2
        # a subset of keys: S_AA = L_A L_A^T, embedded with an identity on the inactive keys
        rows = score_factor(law) * a.unsqueeze(-1)
        cov = rows @ rows.transpose(-1, -2) + torch.diag_embed(1 - a)
        return torch.linalg.cholesky(cov).diagonal(dim1=-2, dim2=-1).log().sum(-1) * 2


# --------------------------------------------------------------------------- a retrieval task


class RetrievalTask(NamedTuple):
    """One batch of the retrieval task.

    query ``(N, 1, D)``, keys ``(N, K, D)``, values ``(N, K, D)``; target ``(N,)`` the class carried
    by the matching key's value; position ``(N,)`` the index of the matching key.
    """

    query: Tensor
    keys: Tensor
    values: Tensor
    target: Tensor
    position: Tensor


def retrieval_task(n: int, *, num_keys: int = 8, num_labels: int = 16, num_classes: int = 4, dim: int = 16,
                   key_noise: float = 0.5, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> RetrievalTask:
    """``n`` examples of a generated retrieval task: find the key that carries the query's label.

    Labels have fixed random embeddings ``e_c`` (unit-variance entries, drawn first from
    ``generator``). Each example draws ``num_keys`` distinct labels, one of which (at a uniform
    position) is the query's: the query is ``e_c``, the keys are ``e_{c_k} + key_noise * xi_k``,
    and each value is the embedding ``f_{y_k}`` of a class ``y_k`` drawn uniformly from
    ``num_classes`` (also random). The answer is the class of the matching key's value.
    """
    for name, value in (("n", n), ("num_keys", num_keys), ("num_classes", num_classes), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < num_keys:
        raise ValueError(f"num_labels must be an int >= num_keys ({num_keys}), got {num_labels!r}")
    if not key_noise >= 0:
        raise ValueError(f"key_noise must be >= 0, got {key_noise!r}")
    kw = dict(generator=generator, dtype=dtype)
    label_emb, class_emb = torch.randn(num_labels, dim, **kw), torch.randn(num_classes, dim, **kw)
    labels = torch.rand(n, num_labels, generator=generator).argsort(-1)[:, :num_keys]  # distinct
    position = torch.randint(num_keys, (n,), generator=generator)
    rows = torch.arange(n)
    query = label_emb[labels[rows, position]].unsqueeze(1)
    keys = label_emb[labels] + key_noise * torch.randn(n, num_keys, dim, **kw)
    classes = torch.randint(num_classes, (n, num_keys), generator=generator)
    return RetrievalTask(query, keys, class_emb[classes], classes[rows, position], position)


class RetrievalModel(nn.Module):
    """One :class:`LogisticNormalAttention` layer and a linear read-out to the classes.

    ``forward(query, keys, values)`` returns ``(logits (N, C), weights (N, H, 1, K))``.
    """

    def __init__(self, dim: int, num_classes: int, **attention) -> None:
        super().__init__()
        self.attention = LogisticNormalAttention(dim, **attention)
        self.readout = nn.Linear(dim, num_classes)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        out, w = self.attention(query, keys, values, generator=generator)
        return self.readout(out[:, 0]), w


def retrieval_loss(model: RetrievalModel, batch: Sequence[Tensor], num_data: int) -> Tensor:
    """``-ELBO / N``: mean cross-entropy of the answer plus the attention's KL over ``N = num_data``.

    batch: ``(query, keys, values, target)``. A scalar.
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data must be a positive int, got {num_data!r}")
    query, keys, values, target = batch[:4]
    logits, _ = model(query, keys, values)
    return F.cross_entropy(logits, target) + model.attention.kl() / num_data
