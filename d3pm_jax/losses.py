"""Losses and likelihood estimators, model-agnostic.

Every function takes a denoiser ``logits_fn(x_t_BxL, t_B) -> logits_BxLxV`` (the x_0-parameterisation: logits of
p_theta(x_0 | x_t)) and returns per-sequence values in **nats** (``[B]``), summed over positions; divide by the
number of tokens (``per_token``) and by ln 2 (``nats_to_bits``) for bits per token. ``weights_BxL`` (optional, 1
for real tokens and 0 for padding) removes padded positions from every sum.

Continuous time (``t in [0, 1]``), any process:
  NELBO(x_0) = recon + integral_0^1 diffusion(t) dt + prior
  recon      = E_{x_t0 ~ q(.|x_0, t=0)} -log p_theta(x_0 | x_t0)        (alpha(0) = 1 - eps)
  prior      = KL(q(x_1 | x_0) || prior)                                  (``Process.prior_kl``)
  diffusion(t) is one of
    ``ctmc_diffusion``: E_{x_t} sum_n sum_{y != x_t^n} G_t[y, x_t^n] (s_hat - s log s_hat + s (log s - 1)), with
      G_t = tau'(t) R, s = Qbar_t[x_0^n, y] / Qbar_t[x_0^n, x_t^n] and s_hat = sum_h p_theta(h | x_t)
      Qbar_t[h, y] / Qbar_t[h, x_t^n] (the denoising score-entropy form of the CTMC bound, for any process);
    ``masked_diffusion``: E_{x_t} -alpha'(t) / (1 - alpha(t)) sum_{n masked} -log p_theta(x_0^n | x_t) (MD4 / MDLM,
      absorbing only; equal to ``ctmc_diffusion`` for absorbing).
Discrete time (D3PM, T steps, t_i = i / T):
  NELBO(x_0) = sum_{i=2}^T E KL(q(x_{t_{i-1}} | x_{t_i}, x_0) || p_theta(x_{t_{i-1}} | x_{t_i}))
               + E -log p_theta(x_0 | x_{t_1}) + prior,
  with p_theta(x_s | x_t) = sum_{x_0} q(x_s | x_t, x_0) p_theta(x_0 | x_t) (``Process.posterior_logits``).

The masked ELBO can instead take a ``FusedHead``: the network up to its output head, and the head fused with the
weighted cross-entropy (``pallas_kernels/fused_ce.py``), so the ``[B, L, V]`` logits are never formed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import _checks, blocks as block_layout
from d3pm_jax.processes.absorbing import AbsorbingProcess
from d3pm_jax.processes.base import NEG_INF, Process, safe_log

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
CONTINUOUS_KINDS = ("ctmc", "masked")


@dataclasses.dataclass(frozen=True)
class FusedHead:
  """``hidden_fn(x_t_BxL, t_B) -> (h_BxLxD, W_DxV)``: the network up to its output head; ``weighted_ce(h_NxD,
  W_DxV, targets_N, weights_N, *, num_classes, exclude) -> loss_N``: the head and a weighted cross-entropy over
  the classes ``[0, num_classes)`` less ``exclude`` (``fused_ce.weighted_ce_*``)."""
  hidden_fn: Callable
  weighted_ce: Callable

  def sequence_ce(self, x_in_BxL, t_B, targets_BxL, weights_BxL, num_classes: int, exclude=None):
    """``sum_n weights[n] * CE(position n)`` per sequence, ``[B]``."""
    h_BxLxD, w_DxV = self.hidden_fn(x_in_BxL, t_B)
    batch, length, width = h_BxLxD.shape
    loss_N = self.weighted_ce(h_BxLxD.reshape(batch * length, width), w_DxV, targets_BxL.reshape(-1),
                              weights_BxL.reshape(-1), num_classes=num_classes, exclude=exclude)
    return loss_N.reshape(batch, length).sum(axis=1)


# ---------------------------------------------------------------- helpers

def _sum_positions(values_BxL, weights_BxL):
  if weights_BxL is not None:
    values_BxL = values_BxL * weights_BxL
  return jnp.sum(values_BxL, axis=-1)


def _gather(values_BxLxV, index_BxL):
  """values[..., index] as a masked sum: its gradient is a fused select, not a scatter into a zero [B, L, V]."""
  hit = jnp.arange(values_BxLxV.shape[-1]) == index_BxL[..., None]
  return jnp.sum(jnp.where(hit, values_BxLxV, 0.0), axis=-1)


def antithetic_times(key, batch: int, dtype=jnp.float32):
  """Low-discrepancy times ``t_B``: one uniform offset, then evenly spaced modulo 1 (MD4/VDM's antithetic)."""
  offset = jax.random.uniform(key, (), dtype=dtype)
  return jnp.mod(offset + jnp.arange(batch, dtype=dtype) / batch, 1.0)


def sample_times(key, batch: int, antithetic: bool = True, dtype=jnp.float32, window=(0.0, 1.0)):
  """``t_B`` uniform on [0, 1), antithetic by default; with ``window`` = (low, high), mapped onto [low, high)
  (BD3-LM's clipped schedule: a lower-variance training objective that is no longer the bound). The window may
  be an array ``[2]`` (one the train loop searched), which is not checked."""
  u_B = antithetic_times(key, batch, dtype) if antithetic else jax.random.uniform(key, (batch,), dtype=dtype)
  if isinstance(window, tuple):
    low, high = window
    if not 0.0 <= low < high <= 1.0:
      raise ValueError(f"the time window (low, high) must satisfy 0 <= low < high <= 1; got ({low}, {high})")
    if (low, high) == (0.0, 1.0):
      return u_B
  low, high = window[0], window[1]
  return (low + (high - low) * u_B).astype(u_B.dtype)


def per_token(nats_B, x0_BxL, weights_BxL=None):
  """Mean nats per (unpadded) token over the batch."""
  tokens = x0_BxL.size if weights_BxL is None else jnp.sum(weights_BxL)
  return jnp.sum(nats_B) / tokens


def nats_to_bits(nats):
  return nats / math.log(2.0)


def _float_dtype():
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


# ---------------------------------------------------------------- continuous-time terms

def masked_diffusion(process: AbsorbingProcess, logits_fn: LogitsFn, key, x0_BxL, t_B, weights_BxL=None,
                     head: FusedHead | None = None):
  """MD4/MDLM integrand at times ``t_B``: -alpha'/(1-alpha) * masked cross-entropy (SUBS), nats ``[B]``. With a
  fused ``head``, ``logits_fn`` is not called: the cross-entropy over every class but the mask comes from it."""
  if not isinstance(process, AbsorbingProcess):
    raise ValueError(f"the masked ELBO needs the absorbing process; got {type(process).__name__}. "
                     "Use kind='ctmc' for any process")
  x_t_BxL = process.sample_marginal(key, x0_BxL, t_B)
  masked_BxL = x_t_BxL == process.mask_id
  weight_B = -process.schedule.dalpha_dt(t_B) / (1.0 - process.schedule.alpha(t_B))
  if head is not None:
    position_BxL = weight_B[:, None] * masked_BxL
    if weights_BxL is not None:
      position_BxL = position_BxL * weights_BxL
    return head.sequence_ce(x_t_BxL, t_B, x0_BxL, position_BxL, process.num_states, process.mask_id)
  log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, t_B), x_t_BxL)
  ce_BxL = jnp.where(masked_BxL, -_gather(log_p_BxLxV, x0_BxL), 0.0)
  return weight_B * _sum_positions(ce_BxL, weights_BxL)


def ctmc_diffusion(process: Process, logits_fn: LogitsFn, key, x0_BxL, t_B, weights_BxL=None):
  """The CTMC (denoising score-entropy) integrand at times ``t_B`` for any process, nats ``[B]``.

  Costs what ``process.marginal`` costs per position: O(V) for absorbing and uniform.
  """
  num_states = process.num_states
  x_t_BxL = process.sample_marginal(key, x0_BxL, t_B)
  log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, t_B), x_t_BxL)
  # Model ratio: log s_hat_y = log sum_h p(h) Qbar[h, y] / Qbar[h, x_t], dropping h with Qbar[h, x_t] = 0.
  log_s_hat = process.log_ratio_mixture(log_p_BxLxV, x_t_BxL, t_B, t_B)
  # True ratio given x_0: log s_y = log Qbar[x_0, y] - log Qbar[x_0, x_t].
  log_row = safe_log(process.marginal(jax.nn.one_hot(x0_BxL, num_states, dtype=log_s_hat.dtype), t_B))
  log_s = log_row - _gather(log_row, x_t_BxL)[..., None]
  s_positive = log_s > 0.5 * NEG_INF
  # s (r - 1 - log r) with log r = log s_hat - log s, written with expm1 to keep precision when r ~ 1;
  # where s = 0 the bracket is s_hat alone.
  log_r = jnp.where(s_positive, log_s_hat - log_s, 0.0)
  bracket = jnp.where(s_positive, jnp.exp(log_s) * (jnp.expm1(log_r) - log_r), jnp.exp(log_s_hat))
  rates_BxLxV = process.rate_column(x_t_BxL) * (1.0 - jax.nn.one_hot(x_t_BxL, num_states))
  per_position_BxL = jnp.sum(rates_BxLxV * bracket, axis=-1)
  return process.schedule.dtau_dt(t_B) * _sum_positions(per_position_BxL, weights_BxL)


def reconstruction(process: Process, logits_fn: LogitsFn, key, x0_BxL, weights_BxL=None):
  """E -log p_theta(x_0 | x_t0) at t = 0 (one sample of x_t0), nats ``[B]``."""
  t_B = jnp.zeros((x0_BxL.shape[0],), _float_dtype())
  x_t_BxL = process.sample_marginal(key, x0_BxL, t_B)
  log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, t_B), x_t_BxL)
  return _sum_positions(-_gather(log_p_BxLxV, x0_BxL), weights_BxL)


def prior(process: Process, x0_BxL, weights_BxL=None):
  """KL(q(x_1 | x_0) || prior) summed over positions, nats ``[B]``."""
  return _sum_positions(process.prior_kl(x0_BxL), weights_BxL)


def continuous_elbo(process: Process, logits_fn: LogitsFn, key, x0_BxL, *, kind: str = "ctmc",
                    antithetic: bool = True, num_time_samples: int = 1, with_recon: bool = True,
                    weights_BxL=None, head: FusedHead | None = None, window=(0.0, 1.0)) -> dict:
  """Monte-Carlo continuous-time NELBO per sequence: a dict of ``[B]`` arrays in nats.

  Keys: ``diffusion`` (mean over ``num_time_samples`` antithetic draws of t per sequence), ``recon``, ``prior``
  and ``nelbo`` (their sum). ``with_recon=False`` skips the reconstruction term's extra network call (a training
  loss where alpha(0) = 1 - eps makes it negligible); ``recon`` is then absent and ``nelbo`` excludes it.
  ``kind``: ``ctmc`` (any process) or ``masked`` (MD4/MDLM, absorbing only). A fused ``head`` serves the masked
  diffusion term (the reconstruction, an evaluation term, still reads ``logits_fn``). ``window`` draws t from
  U[low, high] (``sample_times``): for training only, since the result is then not the bound.
  """
  _checks.check_choice("continuous ELBO kind", kind, CONTINUOUS_KINDS)
  if head is not None and kind != "masked":
    raise ValueError(f"a fused output head computes a cross-entropy, which only the masked ELBO uses; kind "
                     f"{kind!r} needs the full distribution: pass head=None")
  process._check_data("x0", x0_BxL)
  term = ctmc_diffusion if kind == "ctmc" else masked_diffusion
  batch = x0_BxL.shape[0]
  recon_key, key = jax.random.split(key)

  def one_draw(draw_key):
    time_key, noise_key = jax.random.split(draw_key)
    t_B = sample_times(time_key, batch, antithetic, _float_dtype(), window)
    if head is not None:
      return term(process, logits_fn, noise_key, x0_BxL, t_B, weights_BxL, head=head)
    return term(process, logits_fn, noise_key, x0_BxL, t_B, weights_BxL)

  draw_keys = jax.random.split(key, num_time_samples)
  # One draw (training) is called directly: inside lax.map's loop XLA cannot fuse it with the backward pass.
  diffusion_B = (one_draw(draw_keys[0]) if num_time_samples == 1 else
                 jnp.mean(jax.lax.map(one_draw, draw_keys), axis=0))
  out = {"diffusion": diffusion_B, "prior": prior(process, x0_BxL, weights_BxL)}
  if with_recon:
    out["recon"] = reconstruction(process, logits_fn, recon_key, x0_BxL, weights_BxL)
  out["nelbo"] = sum(out.values())
  return out


# ---------------------------------------------------------------- block diffusion (BD3-LM)

BlockLogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def block_times(key, batch: int, slots: int, window=(0.0, 1.0), antithetic: bool = True):
  """One time per block, ``[B, slots]``: ``sample_times`` over the batch's B * slots blocks in row-major order,
  so one block per row draws the masked ELBO's ``t_B`` exactly."""
  return sample_times(key, batch * slots, antithetic, _float_dtype(), window).reshape(batch, slots)


def block_masked_diffusion(process: AbsorbingProcess, logits_fn: BlockLogitsFn, key, x0_BxL, t_BxL, blocks_BxL,
                           weights_BxL=None, head: FusedHead | None = None, given_BxL=None):
  """BD3-LM's integrand: every position masked at its own block's time ``t_BxL``, each masked position's
  cross-entropy weighted by its block's -alpha'/(1-alpha), nats ``[B]``. ``logits_fn(x_t_BxL, x0_BxL, blocks_BxL)``
  is the denoiser's one pass over x_t and x_0 under the block-diffusion mask (``Transformer(clean_BxL=...)``):
  block b's prediction sees x_t of block b and x_0 of the blocks before it. A fused ``head`` (its ``hidden_fn``
  taking ``(x_t_BxL, x0_BxL, blocks_BxL)``) replaces ``logits_fn``, as in ``masked_diffusion``. Positions where
  ``given_BxL`` is True are never masked (x_t = x_0 there: BD3-LM's ``ignore_bos``), so they score nothing."""
  if not isinstance(process, AbsorbingProcess):
    raise ValueError(f"block diffusion masks tokens: it needs the absorbing process; got {type(process).__name__}")
  if head is None:
    return _sum_positions(_block_position_terms(process, logits_fn, key, x0_BxL, t_BxL, blocks_BxL, given_BxL),
                          weights_BxL)
  x_t_BxL = _noised(process, key, x0_BxL, t_BxL, given_BxL)
  masked_BxL = x_t_BxL == process.mask_id
  weight_BxL = -process.schedule.dalpha_dt(t_BxL) / (1.0 - process.schedule.alpha(t_BxL))
  bound = dataclasses.replace(head, hidden_fn=lambda x_BxL, _: head.hidden_fn(x_BxL, x0_BxL, blocks_BxL))
  position_BxL = weight_BxL * masked_BxL if weights_BxL is None else weight_BxL * masked_BxL * weights_BxL
  return bound.sequence_ce(x_t_BxL, None, x0_BxL, position_BxL, process.num_states, process.mask_id)


def _noised(process, key, x0_BxL, t_BxL, given_BxL=None):
  """x_t drawn from q(x_t | x_0) at ``t_BxL``, with x_0 kept where ``given_BxL`` is True."""
  x_t_BxL = process.sample_marginal(key, x0_BxL, t_BxL)
  return x_t_BxL if given_BxL is None else jnp.where(given_BxL, x0_BxL, x_t_BxL)


def _block_position_terms(process, logits_fn, key, x0_BxL, t_BxL, blocks_BxL, given_BxL=None):
  """Each position's term of ``block_masked_diffusion``, ``[B, L]``: its block's weight times its cross-entropy
  where it is masked, 0 elsewhere."""
  x_t_BxL = _noised(process, key, x0_BxL, t_BxL, given_BxL)
  masked_BxL = x_t_BxL == process.mask_id
  weight_BxL = -process.schedule.dalpha_dt(t_BxL) / (1.0 - process.schedule.alpha(t_BxL))
  log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, x0_BxL, blocks_BxL), x_t_BxL)
  return weight_BxL * jnp.where(masked_BxL, -_gather(log_p_BxLxV, x0_BxL), 0.0)


# BD3-LM's clipped schedules: candidate windows [low, high] for t, searched by ``window_variances``.
CLIP_WINDOWS = ((0.0, 1.0), (0.15, 0.65), (0.3, 0.8), (0.45, 0.95), (0.15, 0.9), (0.3, 1.0), (0.5, 1.0))


def window_variances(process: AbsorbingProcess, logits_fn: BlockLogitsFn, key, x0_BxL, block_size: int,
                     windows=CLIP_WINDOWS, num_draws: int = 8, segments_BxL=None, weights_BxL=None):
  """For each window of ``windows``, the variance of the per-block estimate of the block-diffusion loss with t
  drawn on that window (``block_masked_diffusion``'s terms summed over each block): over ``num_draws``
  independent draws of t and x_t for the same data, averaged over every block of the batch. ``[len(windows)]``.
  BD3-LM trains with the window whose estimate varies least (``search_window``)."""
  batch, length = x0_BxL.shape
  blocks_BxL = block_layout.block_ids(batch, length, block_size, segments_BxL)
  slots = block_layout.num_slots(length, block_size, segments_BxL is not None)
  in_slot_BxLxS = jax.nn.one_hot(blocks_BxL, slots, dtype=_float_dtype())
  if weights_BxL is not None:
    in_slot_BxLxS = in_slot_BxLxS * weights_BxL[..., None]
  used_BxS = jnp.sum(in_slot_BxLxS, axis=1) > 0

  def variance(window_2):  # one compiled body for every window: a map over them, not a Python loop
    def per_block(draw_key):
      time_key, noise_key = jax.random.split(draw_key)
      t_BxL = block_layout.position_times(block_times(time_key, batch, slots, window_2), blocks_BxL)
      values_BxL = _block_position_terms(process, logits_fn, noise_key, x0_BxL, t_BxL, blocks_BxL)
      return jnp.einsum("bl,bls->bs", values_BxL, in_slot_BxLxS)

    draws_DxBxS = jax.lax.map(per_block, jax.random.split(key, num_draws))
    return jnp.sum(jnp.where(used_BxS, jnp.var(draws_DxBxS, axis=0), 0.0)) / jnp.sum(used_BxS)

  return jax.lax.map(variance, jnp.asarray(windows, _float_dtype()))


def search_window(variances_W, windows=CLIP_WINDOWS) -> tuple[float, float]:
  """The window of least variance (``window_variances``), as floats."""
  return tuple(float(x) for x in windows[int(np.argmin(np.asarray(variances_W)))])


def block_elbo(process: AbsorbingProcess, logits_fn: BlockLogitsFn, key, x0_BxL, block_size: int, *,
               segments_BxL=None, antithetic: bool = True, num_time_samples: int = 1, with_recon: bool = True,
               window=(0.0, 1.0), weights_BxL=None, head: FusedHead | None = None, given_BxL=None) -> dict:
  """Block diffusion's NELBO per sequence (BD3-LM): a dict of ``[B]`` arrays in nats, as ``continuous_elbo``
  (``diffusion``, ``prior``, ``recon`` unless ``with_recon=False``, and their sum ``nelbo``).

  The row is cut into blocks of ``block_size`` (``d3pm_jax.blocks``; restarting at each document of a packed row
  when ``segments_BxL`` is given); each block draws its own t (``block_times``) and the diffusion term is
  ``block_masked_diffusion``. With one block per row it is ``continuous_elbo(kind='masked')`` draw for draw.
  ``window`` = (low, high) draws t from U[low, high] instead of U[0, 1]: a lower-variance training objective that
  is no longer the bound; evaluation keeps (0, 1). The reconstruction term scores x_t at t = 0. ``given_BxL``
  (bool) positions are given clean in every x_t (``block_masked_diffusion``); to leave them out of the bound
  too, give them weight 0."""
  process._check_data("x0", x0_BxL)
  batch, length = x0_BxL.shape
  blocks_BxL = block_layout.block_ids(batch, length, block_size, segments_BxL)
  slots = block_layout.num_slots(length, block_size, segments_BxL is not None)
  recon_key, key = jax.random.split(key)

  def one_draw(draw_key):
    time_key, noise_key = jax.random.split(draw_key)
    t_BxL = block_layout.position_times(block_times(time_key, batch, slots, window, antithetic), blocks_BxL)
    return block_masked_diffusion(process, logits_fn, noise_key, x0_BxL, t_BxL, blocks_BxL, weights_BxL, head,
                                  given_BxL)

  draw_keys = jax.random.split(key, num_time_samples)
  diffusion_B = (one_draw(draw_keys[0]) if num_time_samples == 1 else
                 jnp.mean(jax.lax.map(one_draw, draw_keys), axis=0))
  out = {"diffusion": diffusion_B, "prior": prior(process, x0_BxL, weights_BxL)}
  if with_recon:
    t_BxL = jnp.zeros((batch, length), _float_dtype())
    x_t_BxL = _noised(process, recon_key, x0_BxL, t_BxL, given_BxL)
    log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, x0_BxL, blocks_BxL), x_t_BxL)
    out["recon"] = _sum_positions(-_gather(log_p_BxLxV, x0_BxL), weights_BxL)
  out["nelbo"] = sum(out.values())
  return out


# ---------------------------------------------------------------- discrete time (D3PM)

def _kl_logits(log_q_xV, log_p_xV):
  """KL(q || p) over the last axis from normalised log-probabilities; 0 * log 0 = 0."""
  q = jnp.exp(log_q_xV)
  return jnp.sum(jnp.where(q > 0, q * (log_q_xV - log_p_xV), 0.0), axis=-1)


def d3pm_step_terms(process: Process, logits_fn: LogitsFn, key, x0_BxL, step_B, num_steps: int,
                    weights_BxL=None) -> dict:
  """The D3PM VLB term of step i = ``step_B`` in {1..T} and the cross-entropy at that step, nats ``[B]``.

  Returns ``{'vlb': KL(q(x_{i-1}|x_i,x_0) || p(x_{i-1}|x_i)) for i >= 2 or -log p(x_0|x_1) for i = 1,
  'ce': -log p_theta(x_0 | x_i)}``.
  """
  t_B = step_B / num_steps
  s_B = (step_B - 1) / num_steps
  x_t_BxL = process.sample_marginal(key, x0_BxL, t_B)
  log_p_BxLxV = process.x0_log_probs(logits_fn(x_t_BxL, t_B), x_t_BxL)
  ce_BxL = -_gather(log_p_BxLxV, x0_BxL)
  # At i = 1 there is no earlier noisy state; s is clamped only to keep the unused branch finite.
  s_safe_B = jnp.maximum(s_B, 0.5 / num_steps)
  one_hot = jax.nn.one_hot(x0_BxL, process.num_states, dtype=log_p_BxLxV.dtype)
  log_q_post = process.posterior_logits(one_hot, x_t_BxL, s_safe_B, t_B)
  log_p_post = process.posterior_logits(jnp.exp(log_p_BxLxV), x_t_BxL, s_safe_B, t_B)
  kl_BxL = _kl_logits(log_q_post, log_p_post)
  vlb_BxL = jnp.where((step_B == 1)[:, None], ce_BxL, kl_BxL)
  return {"vlb": _sum_positions(vlb_BxL, weights_BxL), "ce": _sum_positions(ce_BxL, weights_BxL)}


def d3pm_loss(process: Process, logits_fn: LogitsFn, key, x0_BxL, num_steps: int, hybrid_lambda: float = 0.01,
              weights_BxL=None) -> dict:
  """D3PM's training objective with one random step i ~ U{1..T} per sequence, nats ``[B]``.

  ``vlb`` = T * L_i + prior is an unbiased estimate of the full bound (what is reported), where L_i is the step's
  term (KL for i >= 2, -log p(x_0 | x_1) for i = 1). ``loss`` is what D3PM's reference code trains on:
  L_i + hybrid_lambda * CE(x_0 | x_i), the one-step term and the cross-entropy side by side, without the factor T
  and without the prior (which has no parameters). So lambda = 0.01 here is D3PM's hybrid_coeff = 0.01; weighting
  CE against T * L_i instead would make it 1e-5 of the bound at T = 1000. lambda = 0 trains on the pure VLB.
  ``ce`` is -log p_theta(x_0 | x_i).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}")
  process._check_data("x0", x0_BxL)
  step_key, noise_key = jax.random.split(key)
  step_B = jax.random.randint(step_key, (x0_BxL.shape[0],), 1, num_steps + 1)
  terms = d3pm_step_terms(process, logits_fn, noise_key, x0_BxL, step_B, num_steps, weights_BxL)
  vlb_B = num_steps * terms["vlb"] + prior(process, x0_BxL, weights_BxL)
  return {"vlb": vlb_B, "ce": terms["ce"], "loss": terms["vlb"] + hybrid_lambda * terms["ce"]}


def d3pm_vlb_exact(process: Process, logits_fn: LogitsFn, key, x0_BxL, num_steps: int, weights_BxL=None):
  """The full-T discrete VLB: every step's term (one x_t sample each) plus the prior, nats ``[B]``."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1; got {num_steps}")
  process._check_data("x0", x0_BxL)
  batch = x0_BxL.shape[0]

  def one_step(args):
    step, step_key = args
    step_B = jnp.full((batch,), step)
    return d3pm_step_terms(process, logits_fn, step_key, x0_BxL, step_B, num_steps, weights_BxL)["vlb"]

  steps = jnp.arange(1, num_steps + 1)
  terms_TxB = jax.lax.map(one_step, (steps, jax.random.split(key, num_steps)))
  return jnp.sum(terms_TxB, axis=0) + prior(process, x0_BxL, weights_BxL)


# ---------------------------------------------------------------- corpus accumulation

class LikelihoodAccumulator:
  """Token-weighted corpus NLL accumulated on the host in float64 (no float32 drift over millions of tokens)."""

  def __init__(self):
    self.nats = 0.0
    self.tokens = 0

  def add(self, nats_B, num_tokens) -> None:
    self.nats += float(np.sum(np.asarray(nats_B, np.float64)))
    self.tokens += int(np.sum(np.asarray(num_tokens)))

  def result(self) -> dict:
    if self.tokens == 0:
      raise ValueError("no tokens were accumulated")
    nats = self.nats / self.tokens
    return {"nats_per_token": nats, "bits_per_token": nats / math.log(2.0), "perplexity": math.exp(nats),
            "tokens": self.tokens}
