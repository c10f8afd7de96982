"""Nearest-neighbour diffusion (D3PM's "NN" process): tokens drift to tokens whose embeddings are close.

Construction (once, float64, on the host):
  1. the symmetric k-NN graph W of an embedding table ``[V, D]`` (j is linked to i when j is among i's k nearest or
     i among j's; self excluded; ties broken by the lower id);
  2. the graph Laplacian L = diag(deg) - W normalised by the largest degree, so A = I - L / max_deg is a symmetric
     doubly-stochastic matrix and R = A - I = -L / max_deg (every edge has rate 1 / max_deg);
  3. optionally ``uniform_rate`` u mixes in the uniform process: R <- (1 - u) R + u (1 1^T / V - I);
  4. R is symmetric, so R = U diag(lam) U^T and Qbar(t) = U diag(exp(tau(t) lam)) U^T. Only U, lam and R are
     stored (``[V, V]``, ``[V]``, ``[V, V]``); a row of Qbar(t) is gathered as (U[x] * exp(tau lam)) @ U^T.

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
import scipy.sparse
import scipy.sparse.csgraph

from d3pm_jax.processes.base import Process
from d3pm_jax.schedules import Schedule

METRICS = ("euclidean", "cosine")


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
  eigvecs_VxV: jax.Array
  eigvals_V: jax.Array
  rates_VxV: jax.Array
  schedule: Schedule
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
    eigvals, eigvecs = np.linalg.eigh(rates)
    spectral_gap = float(-np.sort(eigvals)[-2])
    process = cls(eigvecs_VxV=eigvecs, eigvals_V=eigvals, rates_VxV=rates, schedule=schedule,
                  spectral_gap=spectral_gap, num_components=int(num_components))
    if process.mixing_residual > 0.05:
      warnings.warn(f"nearest-neighbour process mixes poorly: exp(-tau(1) * spectral_gap) = "
                    f"{process.mixing_residual:.3g} of the slowest mode survives at t = 1 (gap {spectral_gap:.3g}); "
                    "raise k, rate_scale or uniform_rate, or use a schedule with smaller alpha(1)", stacklevel=2)
    return process

  @property
  def num_states(self) -> int:
    return self.eigvals_V.shape[0]

  @property
  def mixing_residual(self) -> float:
    """exp(-tau(1) * spectral_gap): the surviving amplitude of the slowest-mixing mode at t = 1."""
    return float(np.exp(-float(self.schedule.tau(1.0)) * self.spectral_gap))

  def _factor(self, a):
    """exp(tau * lam) for tau = -log(a): ``a.shape + (V,)``."""
    return jnp.exp(-jnp.log(a)[..., None] * jnp.asarray(self.eigvals_V))

  def _apply(self, probs_xV, a):
    u = jnp.asarray(self.eigvecs_VxV, dtype=probs_xV.dtype)
    return jnp.maximum(((probs_xV @ u) * self._factor(a).astype(probs_xV.dtype)) @ u.T, 0.0)

  def _column(self, x, a):
    u = jnp.asarray(self.eigvecs_VxV)
    # Qbar is symmetric, so its column x is its row x.
    return jnp.maximum((u[x] * self._factor(a).astype(u.dtype)) @ u.T, 0.0)

  def rate_column(self, x):
    return jnp.asarray(self.rates_VxV)[x]

  def rate_matrix(self):
    return jnp.asarray(self.rates_VxV)

  def stationary(self):
    return jnp.full((self.num_states,), 1.0 / self.num_states)

  def sample_marginal(self, key, x0, t):
    self._check_data("x0", x0)
    row_xV = self._column(x0, self.keep_probability(t, jnp.ndim(x0)))
    return jax.random.categorical(key, jnp.log(row_xV)).astype(jnp.asarray(x0).dtype)


jax.tree_util.register_dataclass(
    NearestNeighborProcess,
    data_fields=["eigvecs_VxV", "eigvals_V", "rates_VxV"],
    meta_fields=["schedule", "spectral_gap", "num_components"],
)
