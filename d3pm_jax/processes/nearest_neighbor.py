"""Nearest-neighbour diffusion (D3PM's "NN" process): tokens drift to tokens whose embeddings are close.

Construction (once, float64, on the host):
  1. the symmetric k-NN graph W of an embedding table ``[V, D]`` (j is linked to i when j is among i's k nearest or
     i among j's; self excluded; ties broken by the lower id);
  2. the graph Laplacian L = diag(deg) - W normalised by the largest degree, so A = I - L / max_deg is a symmetric
     doubly-stochastic matrix and R = A - I = -L / max_deg (every edge has rate 1 / max_deg);
  3. optionally ``uniform_rate`` u mixes in the uniform process: R <- (1 - u) R + u (1 1^T / V - I);
  4. Qbar(t) = expm(tau R) by uniformisation: with lam = max_i -R_ii and P = I + R / lam (non-negative, symmetric,
     doubly stochastic), expm(tau R) = sum_k Poisson(k; tau lam) P^k. Every term is non-negative, so the sum keeps
     float32's *relative* accuracy on every entry, the tiny ones included (an eigendecomposition U exp(tau L) U^T
     cancels to ~6e-7 absolute error in float32, which zeroes or inflates the entries between distant tokens at
     small t and ruins the reverse step). P^k for k <= K is computed once in float64 on the host and stored
     (``[K + 1, V, V]``), K chosen so the Poisson tail at tau(1) lam is below 1e-13; each call builds Qbar for its
     distinct times (``[N, V, V]`` from ``[N, K + 1] @ [K + 1, V * V]``) and gathers rows or multiplies by it.
     Memory grows as K V^2: about 23 MB at V = 257, rate_scale = 4 and eps = 1e-4; the process is meant for the
     small vocabularies D3PM used it on (characters, bytes). The one limit left in float32 is its range: entries
     below ~1e-38 flush to zero. On a graph without a uniform share, tokens ten or more edges apart at t ~ 1/1000
     then look unreachable from each other, and a prediction placed on such a token drops out of the reverse
     step. A uniform share (``uniform_rate``, 0.1 in every shipped config) keeps every entry above ~1e-6 there;
     64-bit JAX removes the limit.

A k-NN graph can be disconnected (k = 1 usually is); then Qbar(t) never mixes across components and the ELBO's
prior term stays large. Construction counts the components and refuses a disconnected graph unless
``uniform_rate > 0``. ``spectral_gap`` (the smallest non-zero rate of -R) and ``mixing_residual``
(exp(-tau(1) * gap), how much of the slowest mode survives at t = 1) tell how well the schedule mixes; the prior
term itself is ``prior_kl(x0)``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import draws
from d3pm_jax.processes.base import Process, safe_log
from d3pm_jax.schedules import Schedule

METRICS = ("euclidean", "cosine")
_TAIL = 1e-13                     # Poisson mass left out of the uniformisation series
# The largest stack of dense powers [K + 1, V, V] (float64, host) the construction will build. At V = 8192 (D3PM's
# LM1B vocabulary) K is ~85 and the stack ~46 GB, and every call would build a [N, V, V] transition per distinct
# time: the exact construction is for small vocabularies, and a larger one is refused before any work.
MAX_POWERS_BYTES = 4 * 2 ** 30
_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls on TPU/GPU too (the default may round to bfloat16)


def load_embeddings(embeddings) -> np.ndarray:
  """An embedding table ``[V, D]`` from an array or a ``.npy`` path, as float64."""
  if isinstance(embeddings, (str, os.PathLike)):
    if not os.path.exists(embeddings):
      raise ValueError(f"embedding file {str(embeddings)!r} does not exist; pass a .npy file of shape [V, D]")
    embeddings = np.load(embeddings)
  table = np.asarray(embeddings, dtype=np.float64)
  if table.ndim != 2:
    raise ValueError(f"embeddings must have shape [V, D]; got shape {table.shape}")
  if not np.isfinite(table).all():
    raise ValueError("embeddings contain NaN or inf values")
  return table


def knn_graph(embeddings_VxD: np.ndarray, k: int, metric: str = "euclidean") -> np.ndarray:
  """Indices ``[V, k]`` of each token's k nearest other tokens, nearest first (ties: lower id first)."""
  num_states = embeddings_VxD.shape[0]
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; valid: {sorted(METRICS)}")
  if not 1 <= k < num_states:
    raise ValueError(f"k must satisfy 1 <= k < V = {num_states}; got k={k}")
  x = embeddings_VxD
  if metric == "cosine":
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
      raise ValueError("cosine metric needs non-zero embeddings; some rows are all zeros")
    x = x / norms
  sq = np.sum(x * x, axis=1)
  dist_VxV = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  np.fill_diagonal(dist_VxV, np.inf)
  return np.argsort(dist_VxV, axis=1, kind="stable")[:, :k]


@dataclasses.dataclass(frozen=True, eq=False)
class NearestNeighborProcess(Process):
  """Build with ``NearestNeighborProcess.from_embeddings``; a pytree (its arrays are leaves)."""
  powers_KxVxV: jax.Array        # P^k for k = 0..K, float64 on the host
  rates_VxV: jax.Array
  schedule: Schedule
  uniformization_rate: float     # lam = max_i -R_ii; P = I + R / lam
  spectral_gap: float
  num_components: int

  @classmethod
  def from_embeddings(cls, embeddings, k: int, schedule: Schedule, *, uniform_rate: float = 0.0,
                      metric: str = "euclidean", rate_scale: float = 1.0) -> "NearestNeighborProcess":
    """Builds the process from an embedding table (array or ``.npy`` path) ``[V, D]``.

    Args:
      k: neighbours per token, 1 <= k < V.
      uniform_rate: in [0, 1); the share of the uniform process mixed into R. Must be > 0 for a disconnected graph.
      metric: ``euclidean`` or ``cosine`` distance between embeddings.
      rate_scale: multiplies R (> 0); larger mixes faster under the same schedule.
    """
    table = load_embeddings(embeddings)
    num_states = table.shape[0]
    if not 0.0 <= uniform_rate < 1.0:
      raise ValueError(f"uniform_rate must lie in [0, 1); got {uniform_rate}")
    if not rate_scale > 0:
      raise ValueError(f"rate_scale must be positive; got {rate_scale}")
    if not schedule.eps > 0:
      raise ValueError(f"the nearest-neighbour process needs a schedule with eps > 0 (alpha(1) = eps bounds the "
                       f"total rate tau(1) = -log eps); got eps={schedule.eps}")
    import scipy.sparse  # here, not at the top: scipy's import costs every process that never builds this one 0.7 s
    import scipy.sparse.csgraph
    import scipy.stats
    # The largest total rate: the most connected token leaves at rate 1 before the uniform share and the scale.
    lam = rate_scale * ((1.0 - uniform_rate) + uniform_rate * (1.0 - 1.0 / num_states))
    num_terms = int(scipy.stats.poisson.isf(_TAIL, float(schedule.tau(1.0)) * lam)) + 2
    stack_bytes = num_terms * num_states ** 2 * 8
    if stack_bytes > MAX_POWERS_BYTES:
      raise ValueError(
          f"the nearest-neighbour process over V={num_states} tokens would store {num_terms} dense V x V powers "
          f"for its uniformisation ({stack_bytes / 2 ** 30:.1f} GiB in float64, over the "
          f"{MAX_POWERS_BYTES / 2 ** 30:.0f} GiB limit), and build a V x V transition for every distinct time of a batch; this exact construction "
          f"is for small vocabularies (characters, bytes). Use a smaller vocabulary, or fewer terms (a lower "
          f"process.nn_rate_scale, now {rate_scale}, or a larger process.eps, now {schedule.eps}), or another process")
    neighbors = knn_graph(table, k, metric)
    adjacency = np.zeros((num_states, num_states))
    adjacency[np.repeat(np.arange(num_states), k), neighbors.ravel()] = 1.0
    adjacency = np.maximum(adjacency, adjacency.T)
    num_components, _ = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_matrix(adjacency), directed=False)
    if num_components > 1 and uniform_rate == 0.0:
      raise ValueError(
          f"the {k}-NN graph over {num_states} tokens has {num_components} connected components, so the process "
          "never mixes between them and the ELBO's prior term stays large; raise k or pass uniform_rate > 0 "
          "(e.g. 0.01) to mix in a small uniform rate")
    degree = adjacency.sum(axis=1)
    rates = (adjacency - np.diag(degree)) / degree.max()
    rates = (1.0 - uniform_rate) * rates + uniform_rate * (np.full_like(rates, 1.0 / num_states) - np.eye(num_states))
    rates = rate_scale * rates
    spectral_gap = float(-np.sort(np.linalg.eigvalsh(rates))[-2])
    lam = float(-np.diag(rates).min())
    # Enough terms that the Poisson weight left beyond K at the largest total rate tau(1) lam is below 1e-13.
    num_terms = int(scipy.stats.poisson.isf(_TAIL, float(schedule.tau(1.0)) * lam)) + 2
    step = np.eye(num_states) + rates / lam
    powers = [np.eye(num_states)]
    for _ in range(num_terms - 1):
      nxt = powers[-1] @ step
      powers.append(np.maximum(0.5 * (nxt + nxt.T), 0.0))  # exactly symmetric, so a row is also a column
    process = cls(powers_KxVxV=np.stack(powers), rates_VxV=rates, schedule=schedule, uniformization_rate=lam,
                  spectral_gap=spectral_gap, num_components=int(num_components))
    if process.mixing_residual > 0.05:
      warnings.warn(f"nearest-neighbour process mixes poorly: exp(-tau(1) * spectral_gap) = "
                    f"{process.mixing_residual:.3g} of the slowest mode survives at t = 1 (gap {spectral_gap:.3g}); "
                    "raise k, rate_scale or uniform_rate, or use a schedule with smaller alpha(1)", stacklevel=2)
    return process

  @property
  def num_states(self) -> int:
    return self.rates_VxV.shape[0]

  @property
  def mixing_residual(self) -> float:
    """exp(-tau(1) * spectral_gap): the surviving amplitude of the slowest-mixing mode at t = 1."""
    return float(np.exp(-float(self.schedule.tau(1.0)) * self.spectral_gap))

  def _matrices(self, a_N):
    """Qbar = expm(-log(a) R) for keep-probabilities ``a_N``: ``[N, V, V]``, a positive sum of P^k."""
    powers = jnp.asarray(self.powers_KxVxV)
    dtype = jnp.result_type(a_N.dtype, powers.dtype)
    mu_N = -jnp.log(a_N.astype(dtype)) * self.uniformization_rate
    k = jnp.arange(powers.shape[0], dtype=dtype)
    log_w_NxK = -mu_N[:, None] + jax.scipy.special.xlogy(k, mu_N[:, None]) - jax.scipy.special.gammaln(k + 1.0)
    return jnp.einsum("nk,kvw->nvw", jnp.exp(log_w_NxK), powers.astype(dtype), precision=_HIGHEST)

  def _by_time(self, a, shape):
    """Groups the leading dims ``shape`` by distinct time: ``(a_N, lead, rest)`` with ``a`` carrying one value per
    index of ``lead = shape[:r]`` and none along ``rest = shape[r:]``."""
    a = jnp.asarray(a)
    a = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
    r = max((i + 1 for i, d in enumerate(a.shape) if d != 1), default=0)
    lead = tuple(np.broadcast_shapes(a.shape[:r], tuple(shape[:r])))
    return jnp.broadcast_to(a.reshape(a.shape[:r]), lead).reshape(-1), lead, tuple(shape[r:])

  def _apply(self, probs_xV, a):
    a_N, lead, rest = self._by_time(a, probs_xV.shape[:-1])
    probs_NxMxV = jnp.broadcast_to(probs_xV, lead + rest + probs_xV.shape[-1:]).reshape(
        (a_N.shape[0], -1, self.num_states))
    q_NxVxV = self._matrices(a_N)
    out = jnp.einsum("nmv,nvw->nmw", probs_NxMxV, q_NxVxV.astype(probs_xV.dtype), precision=_HIGHEST)
    return out.reshape(lead + rest + (self.num_states,))

  def _column(self, x, a):
    a_N, lead, rest = self._by_time(a, jnp.shape(x))
    x_NxM = jnp.broadcast_to(x, lead + rest).reshape((a_N.shape[0], -1))
    # Qbar is symmetric, so its column x is its row x.
    rows = jnp.take_along_axis(self._matrices(a_N), x_NxM[:, :, None], axis=1)
    return rows.reshape(lead + rest + (self.num_states,))

  def rate_column(self, x):
    return jnp.asarray(self.rates_VxV)[x]

  def rate_matrix(self):
    return jnp.asarray(self.rates_VxV)

  def stationary(self):
    return jnp.full((self.num_states,), 1.0 / self.num_states)

  def sample_marginal(self, key, x0, t):
    self._check_data("x0", x0)
    row_xV = self._column(x0, self.keep_probability(t, jnp.ndim(x0)))
    return draws.categorical(key, safe_log(row_xV)).astype(jnp.asarray(x0).dtype)


jax.tree_util.register_dataclass(
    NearestNeighborProcess,
    data_fields=["powers_KxVxV", "rates_VxV"],
    meta_fields=["schedule", "uniformization_rate", "spectral_gap", "num_components"],
)
