"""Samplers: one ``jax.lax.scan`` over a static number of steps, for every process.

Every knob acts on the denoiser's prediction p_theta(x_0 | x_t) (``shape_prediction``): ``temperature`` tempers
it, ``top_p`` keeps its nucleus and ``greedy`` replaces it by its argmax (one-hot). The reverse step is then formed
exactly from the shaped prediction, so how many tokens move at each step (for absorbing: how many are unmasked)
follows the schedule whatever the knobs say; this is what MD4, MDLM and LLaDA do.

Strategies:
  ancestral    x_s ~ sum_{x_0} q(x_s | x_t, x_0) p~(x_0 | x_t) with p~ the shaped prediction
               (``Process.posterior_logits``); the last step draws x_0 from p~. For absorbing (MD4/MDLM ancestral
               sampling with carry-over) this is done in two stages, exact in float32: each masked position is
               unmasked with the schedule's probability (alpha(s) - alpha(t)) / (1 - alpha(t)) and then takes a
               token drawn from p~; unmasked tokens never change. Drawing mask-versus-token in one categorical
               would pit a mask probability near 1 against tens of thousands of tiny token probabilities.
  confidence   absorbing only (MaskGIT / LLaDA): every masked position proposes a token drawn from p~; the
               proposals the model is most sure of (its own probability p_theta(proposal | x_t), before the knobs)
               are kept so that the number still masked follows 1 - alpha(s), the others stay masked. The last
               step unmasks everything.
  first_hitting  absorbing only (Zheng et al. 2024): exact for masked diffusion with one network call per decoded
               token. With n positions still masked at time t, the next time one unmasks is drawn from the
               schedule (1 - alpha(s) = (1 - alpha(t)) u^(1/n), u ~ U(0, 1), the latest of n masking times), one
               masked position, uniform among them, unmasks, and its token comes from p~. A ``lax.scan`` of L
               steps; once a sample has no masked position left its steps call nothing (``lax.cond``).
  threshold    absorbing only (Fast-dLLM's parallel decoding): a ``lax.while_loop`` that at every step
               unmasks each masked position whose proposal (drawn from p~) has p_theta(proposal | x_t) >=
               ``threshold``, and at least the most confident one, until none is masked. tau > 1 is one token a
               step in confidence order; tau = 0 decodes everything in one call.
  ``rank_noise`` (confidence, threshold) adds Gumbel noise of that scale to the log-confidence that ranks the
  proposals (MaskGIT's choice temperature), so the positions kept (confidence) or the one decoded beside those
  above ``threshold`` (threshold; the threshold itself stays on the clean confidence) move toward a uniform random
  order, as ancestral sampling's: pure confidence order commits early to the easiest tokens and collapses the
  samples' entropy unless the proposals are drawn hot.
Predictor-corrector (``remask``, ancestral only; the Psi-samplers of the DUO line, ReMDM for masking): each step
draws x_s from kappa q(x_s | x_t, x^_0) + (1 - kappa) q_s(x_s | x^_0), the ancestral posterior mixed with the
prediction pushed forward to time s, so decoded tokens can be noised again and corrected later. 'psi' takes a
constant ``kappa`` (every process; kappa = 1 is ancestral). For absorbing the step is ReMDM's: a decoded token is
remasked with probability sigma = (1 - kappa)(1 - alpha(s)) and a masked one unmasks with probability
(alpha(s) - (1 - sigma) alpha(t)) / (1 - alpha(t)), which keeps the marginals of the forward process; 'cap' sets
sigma = min(``eta``, sigma_max) and 'rescale' sigma = ``eta`` sigma_max, sigma_max = min(1, (1 - alpha(s)) /
alpha(t)) the largest that keeps them. The corrector acts only while t lies in [``remask_off``, ``remask_on``]
(ReMDM's switch window); outside it the step is ancestral. ``remask_confidence`` (ReMDM-conf) gives each decoded
token sigma times its share of softmax(-psi) over the row's decoded tokens, psi its p_theta when it was last
unmasked: at most sigma tokens a row are remasked in expectation, the least confident first, while masked tokens
unmask as under the plain sigma, so fewer stay masked than 1 - alpha(s) (a heuristic; it keeps no marginals).
``alpha_on`` (ReMDM-loop) decodes to alpha = ``alpha_on`` by ``remask_on``, holds alpha there inside the window,
where the corrector alone moves tokens (unmasking sigma alpha / (1 - alpha), remasking sigma: the marginals stay),
and decodes the rest after ``remask_off`` (``schedule_time``; the network is told the held time).
Semi-autoregressive blocks (``num_blocks``, absorbing): blocks are generated left to right, each conditioned on
the finished blocks before it (clean) and the blocks after it (masked). Each block reruns t from 1 to 0 for its
own unmasking schedule, but the whole sequence is never masked at the rate that t implies; a time-conditioned
model never saw such inputs in training, so the network is given instead the time whose keep-probability matches
the fraction of the sequence still masked (``Schedule.time_at_alpha``), which is what it was trained on.
Conditioning: ``given_BxL`` marks positions whose ``prompt_BxL`` tokens are fixed (a prefix prompt or an
infilling template); they are written into x at every step and never change.
``on_step`` (a no-argument host function) is called after every step, for progress bars.
``skip_unchanged`` reuses the previous step's network output when x_t did not change. That is exact only when the
denoiser does not see t: ``sample`` refuses it for a time-conditioned model (``time_conditioned=True``, the
default, and every shipped config) unless ``approximate_skip=True`` asks for the approximation (MDLM's caching).
Draws use ``draws.categorical`` in ``precision`` (``auto`` takes float64 when 64-bit JAX is enabled), whose Gumbel
noise does not saturate in float32; report ``unigram_entropy`` of samples beside any quality figure.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import _checks, draws
from d3pm_jax.processes import AbsorbingProcess, NEG_INF, Process
from d3pm_jax.processes.base import expand_time, safe_log

STRATEGIES = ("ancestral", "confidence", "first_hitting", "threshold")
REMASKS = ("none", "psi", "cap", "rescale")
CACHES = ("none", "prefix", "dual")
TIME_GRIDS = ("uniform", "cosine", "md4_cosine")
PRECISIONS = ("auto", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  num_steps: int = 64
  strategy: str = "ancestral"
  time_grid: str = "uniform"
  temperature: float = 1.0       # tempers p_theta(x_0 | x_t)
  top_p: float = 1.0             # nucleus of the tempered p_theta(x_0 | x_t)
  precision: str = "auto"        # float64 where 64-bit JAX is enabled, else float32
  skip_unchanged: bool = False
  approximate_skip: bool = False  # allow skip_unchanged for a time-conditioned model (an approximation)
  return_trajectory: bool = False
  greedy: bool = False           # the argmax of p_theta(x_0 | x_t); the unmasking schedule stays random
  num_blocks: int = 1            # semi-autoregressive blocks (absorbing), num_steps each; the network is told
                                 # the time that matches the masked fraction (see the module docstring)
  threshold: float = 0.9         # strategy 'threshold': unmask every proposal with p_theta >= threshold
  rank_noise: float = 0.0        # 'confidence'/'threshold': Gumbel noise of this scale on the log-confidence
                                 # that ranks proposals (MaskGIT's choice temperature; 0: pure confidence)
  remask: str = "none"           # predictor-corrector: 'psi' (kappa), 'cap' or 'rescale' (eta; absorbing)
  kappa: float = 1.0             # remask='psi': the weight of the ancestral posterior (1: ancestral)
  eta: float = 0.0               # remask='cap'/'rescale': ReMDM's eta
  remask_on: float = 1.0         # the corrector acts while remask_off <= t <= remask_on
  remask_off: float = 0.0
  remask_confidence: bool = False  # ReMDM-conf: share sigma among decoded tokens by softmax(-confidence)
  alpha_on: float = 0.0          # ReMDM-loop (absorbing): alpha held at this inside the window (0: off)
  cache: str = "none"            # approximate KV cache of semi-AR blocks: 'prefix' or 'dual' (kv_cache=)
  cache_refresh: int = 0         # refresh it every this many steps of a block (0: only at the block's start)

  def __post_init__(self):
    _checks.check_choice("sampling strategy", self.strategy, STRATEGIES)
    _checks.check_choice("time grid", self.time_grid, TIME_GRIDS)
    _checks.check_choice("sampling precision", self.precision, PRECISIONS)
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1; got {self.num_steps}")
    if not 0 < self.temperature < float("inf"):
      raise ValueError(f"temperature must be positive and finite; got {self.temperature}")
    if self.num_blocks < 1:
      raise ValueError(f"num_blocks must be >= 1; got {self.num_blocks}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}")
    _checks.check_choice("remasking", self.remask, REMASKS)
    if not self.threshold >= 0:
      raise ValueError(f"threshold must be >= 0 (0 decodes everything at once; above 1, one token a step); got "
                       f"{self.threshold}")
    if not 0 <= self.rank_noise < float("inf"):
      raise ValueError(f"rank_noise must be >= 0 and finite (0 ranks by confidence alone); got {self.rank_noise}")
    if self.rank_noise and self.strategy not in ("confidence", "threshold"):
      raise ValueError(f"rank_noise={self.rank_noise} perturbs the confidence ranking of strategy 'confidence' or "
                       f"'threshold'; got strategy={self.strategy!r}. Set rank_noise=0 or pick one of those")
    if not 0 <= self.kappa <= 1:
      raise ValueError(f"kappa must lie in [0, 1] (1: ancestral); got {self.kappa}")
    if not 0 <= self.eta <= 1:
      raise ValueError(f"eta must lie in [0, 1]; got {self.eta}")
    if not 0 <= self.remask_off < self.remask_on <= 1:
      raise ValueError(f"the remasking window needs 0 <= remask_off < remask_on <= 1; got "
                       f"({self.remask_off}, {self.remask_on})")
    if not 0 <= self.alpha_on < 1:
      raise ValueError(f"alpha_on must lie in [0, 1) (0: no loop); got {self.alpha_on}")
    if (self.remask_confidence or self.alpha_on) and self.remask == "none":
      raise ValueError(f"remask_confidence={self.remask_confidence} and alpha_on={self.alpha_on} shape a "
                       "corrector's remasking: choose remask='psi', 'cap' or 'rescale'")
    if self.alpha_on and self.remask_on == 1:
      raise ValueError(f"ReMDM's loop (alpha_on={self.alpha_on}) decodes down to alpha_on before remask_on and "
                       "holds it inside the window, so it needs remask_on < 1 (ReMDM: 0.55, remask_off 0.05)")
    if self.remask != "none" and self.strategy != "ancestral":
      raise ValueError(f"remask={self.remask!r} corrects ancestral steps; got strategy={self.strategy!r}. Use "
                       "strategy='ancestral' or remask='none'")
    _checks.check_choice("KV cache", self.cache, CACHES)
    if self.cache_refresh < 0:
      raise ValueError(f"cache_refresh must be >= 0 (0: once per block); got {self.cache_refresh}")
    if self.cache != "none" and (self.strategy == "first_hitting" or self.skip_unchanged):
      raise ValueError(f"an approximate KV cache (cache={self.cache!r}) serves the ancestral, confidence and "
                       f"threshold strategies without skip_unchanged; got strategy={self.strategy!r}, "
                       f"skip_unchanged={self.skip_unchanged}")
    if self.strategy in ("first_hitting", "threshold") and (self.return_trajectory or self.skip_unchanged):
      raise ValueError(f"strategy {self.strategy!r} has no fixed grid of steps: it keeps no trajectory and has "
                       "nothing to skip (every step changes x); turn off return_trajectory and skip_unchanged")

  @property
  def dtype(self):
    """The float type of the draws; float64 needs 64-bit JAX."""
    precision = self.precision
    if precision == "auto":
      precision = "float64" if jax.config.jax_enable_x64 else "float32"
    if precision == "float64" and not jax.config.jax_enable_x64:
      raise ValueError("precision='float64' needs 64-bit JAX: set jax.config.update('jax_enable_x64', True) "
                       "or use precision='float32'")
    return jnp.dtype(precision)


def time_grid(name: str, num_steps: int):
  """Times ``[num_steps + 1]`` from 0 to 1 at u = i / num_steps:
    uniform     t = u
    cosine      t = (1 - cos(pi u)) / 2           dense near both ends
    md4_cosine  t = cos(pi/2 (1 - u))             MD4's grid for text: dense near t = 1, where few tokens move
  """
  _checks.check_choice("time grid", name, TIME_GRIDS)
  u = jnp.arange(num_steps + 1) / num_steps
  if name == "uniform":
    return u
  if name == "cosine":
    return 0.5 * (1.0 - jnp.cos(math.pi * u))
  return jnp.sin(0.5 * math.pi * u)  # = cos(pi/2 (1 - u)), exactly 0 and 1 at the ends


def shape_prediction(log_p0_xV, cfg: SamplerConfig):
  """The denoiser's prediction log p_theta(x_0 | x_t) ``[..., V]`` after the knobs, normalised: tempered by
  ``cfg.temperature``, cut to its ``cfg.top_p`` nucleus (the smallest set of the most likely values whose mass
  reaches top_p, ties kept), or one-hot at its argmax when ``cfg.greedy``. Excluded values get ``NEG_INF``."""
  log_p = log_p0_xV.astype(jnp.promote_types(log_p0_xV.dtype, jnp.float32))
  states = jnp.arange(log_p.shape[-1])
  if cfg.greedy:
    return jnp.where(states == jnp.argmax(log_p, axis=-1, keepdims=True), 0.0, NEG_INF).astype(log_p.dtype)
  log_p = jax.nn.log_softmax(log_p / cfg.temperature, axis=-1)
  if cfg.top_p < 1.0:
    sorted_desc = jnp.sort(log_p, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jnp.exp(sorted_desc), axis=-1)
    cutoff_index = jnp.minimum(jnp.sum(cumulative < cfg.top_p, axis=-1, keepdims=True), log_p.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_index, axis=-1)
    log_p = jax.nn.log_softmax(jnp.where(log_p >= cutoff, log_p, NEG_INF), axis=-1)
  return log_p


def categorical(key, log_probs_xV, cfg: SamplerConfig):
  """A draw from the shaped ``log_probs_xV`` (``shape_prediction``) in ``cfg.precision``; int32 ``[...]``."""
  return draws.categorical(key, shape_prediction(log_probs_xV, cfg), cfg.dtype)


def _conditioning(given_BxL, prompt_BxL, batch: int, length: int, num_tokens: int):
  """Validated ``(given bool, prompt int32)``; nothing is given when both are None."""
  if (given_BxL is None) != (prompt_BxL is None):
    raise ValueError("pass given_BxL and prompt_BxL together (which positions are fixed, and their tokens)")
  if given_BxL is None:
    return jnp.zeros((batch, length), bool), jnp.zeros((batch, length), jnp.int32)
  given_BxL = jnp.asarray(given_BxL, bool)
  _checks.check_token_ids("prompt_BxL", jnp.where(given_BxL, prompt_BxL, 0), num_tokens)
  return given_BxL, jnp.asarray(prompt_BxL, jnp.int32)


def _initial_state(process: Process, key, batch: int, length: int):
  if isinstance(process, AbsorbingProcess):
    return jnp.full((batch, length), process.mask_id, jnp.int32)
  prior = process.prior()
  return jax.random.categorical(key, jnp.log(prior), shape=(batch, length)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SampleHead:
  """The denoiser up to its output head, ``hidden_fn(x_t_BxL, t_B) -> (h_BxLxD, W_DxV)``, and the head fused
  with tempered Gumbel-max sampling, ``draw(h_NxD, W_DxV, seed, *, num_classes, exclude, temperature, dtype) ->
  (ids_N, prob_N)`` (``pallas_kernels/fused_sample.py``): tokens are drawn from the tempered prediction without
  forming ``[B, L, V]``, and ``prob_N`` is the drawn token's untempered p_theta (the confidence ranking's)."""
  hidden_fn: Callable
  draw: Callable


def fused_head_supports(process: Process, cfg: SamplerConfig) -> bool:
  """Whether a ``SampleHead`` can serve this sampling: the absorbing process (its tokens come straight from
  p_theta(x_0 | x_t)), temperature only (no nucleus or greedy, which need the whole distribution), no
  ``skip_unchanged`` (which caches the distribution), the ancestral or confidence strategy, no remasking and no
  approximate KV cache."""
  return (isinstance(process, AbsorbingProcess) and cfg.top_p == 1.0 and not cfg.greedy
          and not cfg.skip_unchanged and cfg.strategy in ("ancestral", "confidence") and cfg.remask == "none"
          and cfg.cache == "none")


@dataclasses.dataclass(frozen=True)
class KVCache:
  """A denoiser's approximate KV cache (``models/approximate_cache.py``): ``refresh(x_BxL, t_B) -> (logits_BxLxV,
  state)`` is the full pass that also stores every position's keys and values, ``window(state, x_BxW, start, t_B)
  -> logits_BxWxV`` runs positions start..start+W-1 against the stored rest."""
  refresh: Callable
  window: Callable


@dataclasses.dataclass(frozen=True)
class _BlockCache:
  """One semi-AR block's use of a ``KVCache``: refresh on step 0 (and every ``every``-th), else the window of
  ``width`` positions from ``start`` (the block, or the block and the suffix)."""
  kv: KVCache
  start: int
  width: int
  every: int

  def initial(self, x_BxL):
    shapes = jax.eval_shape(self.kv.refresh, x_BxL, jnp.zeros(x_BxL.shape[:1]))[1]
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def logits(self, x_BxL, t_B, state, k):
    """``(logits_BxLxV, state)`` at step ``k`` of the block; outside the window the logits are 0 (those
    positions are clamped: they never use them)."""
    def stale(state):
      window = self.kv.window(state, x_BxL[:, self.start:self.start + self.width], self.start, t_B)
      full = jnp.zeros(x_BxL.shape + window.shape[-1:], window.dtype)
      return full.at[:, self.start:self.start + self.width].set(window), state
    return jax.lax.cond(k % self.every == 0, lambda state: self.kv.refresh(x_BxL, t_B), stale, state)


def sample(process: Process, logits_fn, key, batch: int, length: int, cfg: SamplerConfig = SamplerConfig(),
           given_BxL=None, prompt_BxL=None, on_step=None, time_conditioned: bool = True,
           head: SampleHead | None = None, kv_cache: KVCache | None = None):
  """Draws ``[batch, length]`` tokens from the reverse process; returns ``(x0_BxL, trajectory)`` where the
  trajectory ``[num_blocks * num_steps, B, L]`` (x after each step) is None unless ``cfg.return_trajectory``.

  ``logits_fn(x_t_BxL, t_B)`` is the denoiser; ``time_conditioned=False`` declares that it ignores ``t_B``, which
  makes ``cfg.skip_unchanged`` exact (it is refused otherwise unless ``cfg.approximate_skip``). A fused ``head``
  draws the tokens instead of ``logits_fn`` where ``fused_head_supports`` allows (an error otherwise).
  ``sample_with_nfe`` also counts the network calls. ``cfg.cache`` ('prefix', 'dual') samples the semi-AR
  blocks with ``kv_cache``, the denoiser's approximate KV cache, instead of ``logits_fn``.
  """
  x0_BxL, trajectory, _ = _sample(process, logits_fn, key, batch, length, cfg, given_BxL, prompt_BxL, on_step,
                                  time_conditioned, head, kv_cache)
  return x0_BxL, trajectory


def sample_with_nfe(process: Process, logits_fn, key, batch: int, length: int,
                    cfg: SamplerConfig = SamplerConfig(), given_BxL=None, prompt_BxL=None, on_step=None,
                    time_conditioned: bool = True, head: SampleHead | None = None,
                    kv_cache: KVCache | None = None):
  """``sample``'s tokens and each sample's number of network calls (NFE), int32 ``[B]``: the steps that called
  the denoiser while the sample still had a position to decode (a batched call serves every sample at once; a
  finished sample is not charged for calls its batch makes for others)."""
  x0_BxL, _, nfe_B = _sample(process, logits_fn, key, batch, length, cfg, given_BxL, prompt_BxL, on_step,
                             time_conditioned, head, kv_cache)
  return x0_BxL, nfe_B


ABSORBING_ONLY = {"confidence": "strategy", "first_hitting": "strategy", "threshold": "strategy", "cap": "remask",
                  "rescale": "remask"}


def _check_absorbing(process: Process, cfg: SamplerConfig):
  if (cfg.remask_confidence or cfg.alpha_on) and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"remask_confidence={cfg.remask_confidence} and alpha_on={cfg.alpha_on} (ReMDM-conf and "
                     f"-loop) remask decoded tokens of the absorbing process; got {type(process).__name__}. Use "
                     "remask='psi' without them")
  for value in (cfg.strategy, cfg.remask):
    if value in ABSORBING_ONLY and not isinstance(process, AbsorbingProcess):
      raise ValueError(f"{ABSORBING_ONLY[value]} {value!r} needs the absorbing process; got "
                       f"{type(process).__name__}. Use strategy='ancestral' (with remask='psi' for a corrector)")


def _sample(process, logits_fn, key, batch, length, cfg, given_BxL, prompt_BxL, on_step, time_conditioned, head,
            kv_cache=None):
  if head is not None and not fused_head_supports(process, cfg):
    raise ValueError(f"a fused sampling head draws tokens of the absorbing process at a temperature, ancestrally or "
                     f"by confidence; it cannot serve {type(process).__name__} with top_p={cfg.top_p}, "
                     f"greedy={cfg.greedy}, skip_unchanged={cfg.skip_unchanged}, strategy={cfg.strategy!r}, "
                     f"remask={cfg.remask!r}: sample from the logits (head=None)")
  _check_absorbing(process, cfg)
  if cfg.cache != "none" and kv_cache is None:
    raise ValueError(f"cache={cfg.cache!r} samples with the denoiser's approximate KV cache: pass kv_cache= "
                     "(models.approximate_cache.kv_cache(model, params)), or cache='none'")
  if cfg.skip_unchanged and time_conditioned and not cfg.approximate_skip:
    raise ValueError("skip_unchanged reuses the network's output when x_t did not change, which is exact only for "
                     "a denoiser that does not see t, and this one is time-conditioned (time_conditioned=True; every "
                     "shipped config is). Pass time_conditioned=False for a model without time conditioning, or "
                     "SamplerConfig(approximate_skip=True) to accept the approximation (MDLM's caching)")
  given_BxL, prompt_BxL = _conditioning(given_BxL, prompt_BxL, batch, length, process.num_data_states)
  if cfg.num_blocks > 1 and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"semi-autoregressive blocks (num_blocks={cfg.num_blocks}) need the absorbing process; "
                     f"got {type(process).__name__}")
  if length % cfg.num_blocks:
    raise ValueError(f"length {length} must be divisible by num_blocks={cfg.num_blocks}")
  _ = cfg.dtype  # raises here, not inside the scan, when float64 is asked for without 64-bit JAX
  init_key, key = jax.random.split(key)
  x_BxL = _initial_state(process, init_key, batch, length)
  # Semi-autoregressive: block b is generated with every earlier block fixed to its result and every later
  # block fixed to its initial (masked) state; one block is the plain sampler.
  block = length // cfg.num_blocks
  position = jnp.arange(length)
  trajectories, nfe_B = [], jnp.zeros((batch,), jnp.int32)
  for b in range(cfg.num_blocks):
    outside = (position < b * block) | (position >= (b + 1) * block)
    window = None
    if cfg.cache != "none":
      width = block if cfg.cache == "dual" else length - b * block
      window = _BlockCache(kv_cache, b * block, width, cfg.cache_refresh or length + 1)
    x_BxL, trajectory, calls_B = _denoise(process, logits_fn, jax.random.fold_in(key, b), x_BxL,
                                          given_BxL | outside, jnp.where(given_BxL, prompt_BxL, x_BxL), cfg,
                                          on_step, match_time_to_masking=cfg.num_blocks > 1, head=head,
                                          region=block, window=window)
    trajectories.append(trajectory)
    nfe_B = nfe_B + calls_B
  return x_BxL, (jnp.concatenate(trajectories) if cfg.return_trajectory else None), nfe_B


def _denoise(process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg, on_step=None,
             match_time_to_masking=False, head=None, region=None, window=None):
  """Every free position of ``x_BxL`` denoised by ``cfg.strategy``: ``(x0_BxL, trajectory, nfe_B)``. ``region``
  (default L) bounds how many positions are free: the steps of first-hitting and threshold decoding. ``window``
  (a ``_BlockCache``) replaces ``logits_fn`` by the approximate KV cache."""
  region = region or x_BxL.shape[1]
  if cfg.strategy == "first_hitting":
    return _first_hitting(process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg, region, on_step,
                          match_time_to_masking)
  if cfg.strategy == "threshold":
    return _threshold(process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg, region, on_step, window)
  return _sample_scan(process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg, on_step, match_time_to_masking,
                      head, window)


def schedule_time(process: AbsorbingProcess, t, cfg: SamplerConfig):
  """The time of the schedule whose masking rate the grid's time ``t`` stands for: ``t`` itself, except under
  ReMDM's loop (``cfg.alpha_on``), which maps [remask_on, 1] onto [tau_on, 1] with alpha(tau_on) = alpha_on,
  holds tau_on inside the window [remask_off, remask_on], and maps [0, remask_off] onto [0, tau_on]."""
  if not cfg.alpha_on:
    return t
  t_on, t_off = cfg.remask_on, cfg.remask_off
  tau_on = process.schedule.time_at_alpha(cfg.alpha_on)
  above = tau_on + (t - t_on) / (1.0 - t_on) * (1.0 - tau_on)
  below = tau_on * t / max(t_off, 1e-30)
  return jnp.where(t >= t_on, above, jnp.where(t >= t_off, tau_on, below))


def _unmasks(process: AbsorbingProcess, key, x_t, s, t, cfg: SamplerConfig, sigma=0.0):
  """Which masked positions of ``x_t`` unmask on the step from t to s: each with probability
  (alpha(s) - (1 - sigma) alpha(t)) / (1 - alpha(t)), all at the end of the grid (s = 0). ``sigma`` is the
  probability that a decoded token is remasked on the same step (0: ancestral, (alpha(s) - alpha(t)) /
  (1 - alpha(t)))."""
  at_end = expand_time(s, jnp.ndim(x_t)) == 0
  alpha_s = process.keep_probability(schedule_time(process, s, cfg), jnp.ndim(x_t))
  alpha_t = process.keep_probability(schedule_time(process, t, cfg), jnp.ndim(x_t))
  unmask_p = jnp.where(at_end, 1.0, (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t))
  return (x_t == process.mask_id) & draws.bernoulli(key, unmask_p, jnp.shape(x_t), cfg.dtype)


def _corrector_active(s, t, cfg: SamplerConfig, ndim: int):
  """Whether the step from t to s corrects (t inside the remasking window and s > 0), shaped like the times."""
  t = expand_time(t, ndim)
  return (t >= cfg.remask_off) & (t <= cfg.remask_on) & (expand_time(s, ndim) > 0)


def remask_probability(process: AbsorbingProcess, s, t, cfg: SamplerConfig, ndim: int):
  """ReMDM's sigma for the step from t to s: the probability that a decoded token is masked again, 0 outside
  the window ``[cfg.remask_off, cfg.remask_on]`` and on the last step. 'psi': (1 - kappa)(1 - alpha(s)); 'cap':
  min(eta, sigma_max); 'rescale': eta sigma_max; sigma_max = min(1, (1 - alpha(s)) / alpha(t)), alpha at the
  ``schedule_time`` of s and t (the window stays on the grid's times)."""
  alpha_s = process.keep_probability(schedule_time(process, s, cfg), ndim)
  alpha_t = process.keep_probability(schedule_time(process, t, cfg), ndim)
  sigma_max = jnp.where(alpha_t > 0, jnp.minimum(1.0, (1.0 - alpha_s) / jnp.maximum(alpha_t, 1e-30)), 1.0)
  if cfg.remask == "psi":
    sigma = (1.0 - cfg.kappa) * (1.0 - alpha_s)
  elif cfg.remask == "cap":
    sigma = jnp.minimum(cfg.eta, sigma_max)
  else:
    sigma = cfg.eta * sigma_max
  return jnp.where(_corrector_active(s, t, cfg, ndim), sigma, 0.0)


def reverse_step(process: Process, key, log_p0_xV, x_t, s, t, cfg: SamplerConfig, remask_weight=None):
  """One ancestral step x_t -> x_s from the denoiser's prediction ``log_p0_xV`` = log p_theta(x_0 | x_t)
  ``[..., V]``: the knobs shape the prediction, and x_s is drawn from the exact reverse step it implies. Where
  ``s == 0`` (the end of the grid) x_0 is drawn from the shaped prediction itself. ``s`` and ``t`` broadcast
  against the leading dims of ``x_t`` (``t_B`` against ``x_BxL``). With ``cfg.remask`` the step is the
  predictor-corrector's mixture (the module docstring); ``remask_weight`` (absorbing, like ``x_t``) scales each
  decoded token's remasking probability (ReMDM-conf's softmax of -confidence), not the unmasking. Returns int32
  like ``x_t``."""
  log_p = shape_prediction(log_p0_xV, cfg)
  token_key, move_key = jax.random.split(key)
  at_end = expand_time(s, jnp.ndim(x_t)) == 0
  if isinstance(process, AbsorbingProcess):
    # Two stages: whether a masked position unmasks (the schedule alone decides), then its token from p~.
    if cfg.remask == "none":
      unmask = _unmasks(process, move_key, x_t, s, t, cfg)
      return jnp.where(unmask, draws.categorical(token_key, log_p, cfg.dtype), x_t).astype(jnp.int32)
    sigma = remask_probability(process, s, t, cfg, jnp.ndim(x_t))
    unmask = _unmasks(process, move_key, x_t, s, t, cfg, sigma)
    sigma_each = sigma if remask_weight is None else sigma * remask_weight
    remask = (x_t != process.mask_id) & draws.bernoulli(jax.random.fold_in(key, 1), sigma_each, jnp.shape(x_t),
                                                         cfg.dtype)
    x_s = jnp.where(remask, process.mask_id, x_t)
    return jnp.where(unmask, draws.categorical(token_key, log_p, cfg.dtype), x_s).astype(jnp.int32)
  posterior = process.posterior_logits(jnp.exp(log_p), x_t, s, t)
  if cfg.remask != "none":  # 'psi' (the others are refused for this process): the mixture, in log space
    kappa = jnp.where(_corrector_active(s, t, cfg, jnp.ndim(x_t)), cfg.kappa, 1.0)[..., None]
    pushed = safe_log(process.marginal(jnp.exp(log_p), s))
    posterior = jnp.logaddexp(jnp.log(kappa) + posterior, jnp.log1p(-kappa) + pushed)
  return draws.categorical(token_key, jnp.where(at_end[..., None], log_p, posterior), cfg.dtype)


def confidence_rank(key, confidence_BxL, masked_BxL, noise: float = 0.0):
  """Each masked position's rank by ``confidence_BxL`` (a log-probability) among its row's masked positions, 0 the
  least confident (ties broken by noise of 1e-6 from ``key``, then by position); unmasked positions rank after
  them all. ``noise`` > 0 ranks by confidence + noise * Gumbel instead (MaskGIT's choice temperature): large values
  approach a uniform random order."""
  score = confidence_BxL + 1e-6 * jax.random.uniform(key, confidence_BxL.shape)
  if noise:
    score = score + noise * draws.gumbel(jax.random.fold_in(key, 1), confidence_BxL.shape, score.dtype)
  score = jnp.where(masked_BxL, score, jnp.inf)
  return jnp.argsort(jnp.argsort(score, axis=1), axis=1)


def _first_hitting(process: AbsorbingProcess, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg: SamplerConfig,
                   region: int, on_step=None, match_time_to_masking: bool = False):
  """The first-hitting sampler (module docstring): ``(x0_BxL, None, nfe_B)``, ``region`` steps (at most one
  network call each) for at most ``region`` free positions. The network sees the time at which the step's
  position unmasks, or with ``match_time_to_masking`` the time whose alpha matches the unmasked fraction of x_t."""
  batch, length = x_BxL.shape
  schedule, dtype = process.schedule, cfg.dtype
  x_BxL = jnp.where(given_BxL, prompt_BxL, x_BxL)

  def step(carry, step_key):
    x_t, alpha_B, nfe_B = carry
    if on_step is not None:
      jax.debug.callback(on_step)
    masked = (x_t == process.mask_id) & ~given_BxL
    n_B = jnp.sum(masked, axis=1)
    time_key, where_key, token_key = jax.random.split(step_key, 3)
    # The latest of n independent masking times, each distributed as (1 - alpha(tau)) / (1 - alpha(t)) on [0, t].
    u_B = draws.fine_uniform(time_key, (batch,), dtype)
    alpha_s_B = 1.0 - (1.0 - alpha_B) * u_B ** (1.0 / jnp.maximum(n_B, 1).astype(dtype))
    alpha_s_B = jnp.where(n_B > 0, alpha_s_B, alpha_B)
    if match_time_to_masking:
      t_B = schedule.time_at_alpha(1.0 - jnp.mean(x_t == process.mask_id, axis=1))
    else:
      t_B = schedule.time_at_alpha(alpha_s_B)

    def decode(x_t):
      log_p = process.x0_log_probs(logits_fn(x_t, t_B), x_t)
      token = categorical(token_key, log_p, cfg)
      # One masked position, uniform among them: the largest of i.i.d. uniform scores.
      score = jnp.where(masked, draws.fine_uniform(where_key, masked.shape, dtype), -1.0)
      chosen = (jnp.arange(length) == jnp.argmax(score, axis=1)[:, None]) & masked
      return jnp.where(chosen, token, x_t).astype(jnp.int32)

    x_s = jax.lax.cond(jnp.any(n_B > 0), decode, lambda x_t: x_t, x_t)
    return (x_s, alpha_s_B, nfe_B + (n_B > 0)), None

  alpha0 = jnp.broadcast_to(schedule.alpha(jnp.ones((), dtype)).astype(dtype), (batch,))
  (x0_BxL, _, nfe_B), _ = jax.lax.scan(step, (x_BxL, alpha0, jnp.zeros((batch,), jnp.int32)),
                                       jax.random.split(key, region))
  return x0_BxL, None, nfe_B


def _threshold(process: AbsorbingProcess, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg: SamplerConfig,
               region: int, on_step=None, window: _BlockCache | None = None):
  """Threshold parallel decoding (module docstring) of at most ``region`` free positions: ``(x0_BxL, None,
  nfe_B)``; with ``window``, through the approximate KV cache. Step k uses the k-th of ``split(key, region)``,
  the confidence strategy's key at step k of ``region`` steps, so tau > 1 reproduces it at one token a step. The
  network sees the time whose alpha matches the unmasked fraction of x_t (the time of a schedule that unmasks at
  this pace)."""
  batch, length = x_BxL.shape
  schedule = process.schedule
  x_BxL = jnp.where(given_BxL, prompt_BxL, x_BxL)
  keys = jax.random.split(key, region)
  log_tau = jnp.log(jnp.asarray(cfg.threshold, jnp.float32))

  def free_masked(x):
    return (x == process.mask_id) & ~given_BxL

  def body(carry):
    x_t, k, nfe_B, kv_state = carry
    if on_step is not None:
      jax.debug.callback(on_step)
    masked = free_masked(x_t)
    t_B = schedule.time_at_alpha(1.0 - jnp.mean(x_t == process.mask_id, axis=1))
    if window is None:
      logits = logits_fn(x_t, t_B)
    else:
      logits, kv_state = window.logits(x_t, t_B, kv_state, k)
    log_p0 = process.x0_log_probs(logits, x_t)
    draw_key, rank_key = jax.random.split(keys[k])
    proposal = categorical(draw_key, log_p0, cfg)
    confidence = jnp.take_along_axis(log_p0, proposal[..., None], axis=-1)[..., 0]
    best = (confidence_rank(rank_key, confidence, masked, cfg.rank_noise)
            == jnp.sum(masked, axis=1, keepdims=True) - 1)
    unmask = masked & ((confidence >= log_tau) | best)
    return jnp.where(unmask, proposal, x_t), k + 1, nfe_B + jnp.any(masked, axis=1), kv_state

  kv0 = None if window is None else window.initial(x_BxL)
  x0_BxL, _, nfe_B, _ = jax.lax.while_loop(lambda carry: jnp.any(free_masked(carry[0])), body,
                                           (x_BxL, jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), kv0))
  return x0_BxL, None, nfe_B


def _sample_scan(process: Process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg: SamplerConfig,
                 on_step=None, match_time_to_masking: bool = False, head: SampleHead | None = None,
                 window: _BlockCache | None = None):
  """The plain sampler: ``cfg.num_steps`` reverse steps from ``x_BxL`` in one scan, ``given`` positions clamped;
  ``(x0_BxL, trajectory, nfe_B)``. ``match_time_to_masking`` gives the network the time whose alpha matches the
  unmasked fraction of x_t; ``window`` replaces ``logits_fn`` by the approximate KV cache."""
  batch, length = x_BxL.shape

  def clamp(x_BxL):
    return jnp.where(given_BxL, prompt_BxL, x_BxL)

  x_BxL = clamp(x_BxL)
  times = time_grid(cfg.time_grid, cfg.num_steps)
  schedule = process.schedule
  num_free_B = jnp.sum(~given_BxL, axis=1)

  def network_time(x_t, t_B):
    if match_time_to_masking:
      return schedule.time_at_alpha(1.0 - jnp.mean(x_t == process.mask_id, axis=1))
    return schedule_time(process, t_B, cfg)

  def network(x_t, t_B):
    return process.x0_log_probs(logits_fn(x_t, network_time(x_t, t_B)), x_t)

  def fused_draw(key, x_t, t_B):
    """Every position's x_0 proposal, drawn from the tempered p_theta(x_0 | x_t) with the mask excluded, and its
    probability under the model's own (untempered) p_theta(x_0 | x_t), which confidence ranks by."""
    h_BxLxD, w_DxV = head.hidden_fn(x_t, network_time(x_t, t_B))
    ids, prob = head.draw(h_BxLxD.reshape(batch * length, -1), w_DxV, jax.random.bits(key, (), jnp.uint32),
                          num_classes=process.num_states, exclude=process.mask_id, temperature=cfg.temperature,
                          dtype=cfg.dtype)
    return ids.reshape(batch, length), prob.reshape(batch, length)

  def denoise(x_t, t_B, cache):
    """The prediction, and whether the network was called for it."""
    if cache is None:
      return network(x_t, t_B), True
    prev_x, prev_log_p = cache
    unchanged = jnp.all(x_t == prev_x)
    return jax.lax.cond(unchanged, lambda: prev_log_p, lambda: network(x_t, t_B)), ~unchanged

  def remask_weight(x_t, psi_BxL):
    """ReMDM-conf's softmax of -confidence over each row's decoded free positions (0 elsewhere)."""
    decoded = (x_t != process.mask_id) & ~given_BxL
    weight = jnp.where(decoded, jnp.exp(-psi_BxL), 0.0)
    return weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1e-30)

  def step(carry, inputs):
    (x_t, cache), nfe_B, kv_state, psi_BxL = carry
    i, step_key = inputs
    if on_step is not None:  # a host callback per step, e.g. a progress bar
      jax.debug.callback(on_step)
    t_B = jnp.full((batch,), times[i])
    s_B = jnp.full((batch,), times[i - 1])
    if window is not None:
      logits, kv_state = window.logits(x_t, network_time(x_t, t_B), kv_state, cfg.num_steps - i)
      log_p0, called = process.x0_log_probs(logits, x_t), True
    else:
      log_p0, called = (None, True) if head is not None else denoise(x_t, t_B, cache)
    if cfg.strategy == "ancestral" and head is not None:
      token_key, move_key = jax.random.split(step_key)
      proposal, _ = fused_draw(token_key, x_t, t_B)
      x_s = jnp.where(_unmasks(process, move_key, x_t, s_B, t_B, cfg), proposal, x_t)
    elif cfg.strategy == "ancestral":
      weight = None if psi_BxL is None else remask_weight(x_t, psi_BxL)
      x_s = reverse_step(process, step_key, log_p0, x_t, s_B, t_B, cfg, weight)
      if psi_BxL is not None:  # a token's confidence: its p_theta when last unmasked (the model's, untempered)
        decoded_p = jnp.exp(jnp.take_along_axis(log_p0, x_s[..., None], axis=-1)[..., 0])
        psi_BxL = jnp.where((x_t == process.mask_id) & (x_s != process.mask_id),
                            decoded_p.astype(psi_BxL.dtype), psi_BxL)
    else:
      draw_key, rank_key = jax.random.split(step_key)
      if head is not None:
        proposal, prob = fused_draw(draw_key, x_t, t_B)
        confidence = jnp.log(prob)
      else:
        proposal = categorical(draw_key, log_p0, cfg)
        confidence = jnp.take_along_axis(log_p0, proposal[..., None], axis=-1)[..., 0]
      masked = (x_t == process.mask_id) & ~given_BxL  # not the later blocks, clamped masked
      # How many free positions stay masked at time s: (1 - alpha(s)) / (1 - alpha(1)) of them, none at the end.
      frac = (1.0 - schedule.alpha(s_B)) / (1.0 - schedule.alpha(jnp.ones_like(s_B)))
      keep_masked_B = jnp.where(i == 1, 0, jnp.floor(frac * num_free_B).astype(jnp.int32))
      # Unmask all but the least confident masked positions.
      stays_masked = masked & (confidence_rank(rank_key, confidence, masked, cfg.rank_noise)
                             < keep_masked_B[:, None])
      x_s = jnp.where(masked & ~stays_masked, proposal, x_t)
    x_s = clamp(x_s)
    nfe_B = nfe_B + jnp.asarray(called, jnp.int32)
    return (((x_s, None if cache is None else (x_t, log_p0)), nfe_B, kv_state, psi_BxL),
            (x_s if cfg.return_trajectory else None))

  cache0 = None
  if cfg.skip_unchanged:  # the previous input and output; -1 never equals a token, so step one always runs
    out = jax.eval_shape(network, x_BxL, jnp.zeros((batch,)))
    cache0 = (jnp.full_like(x_BxL, -1), jnp.zeros(out.shape, out.dtype))
  steps = jnp.arange(cfg.num_steps, 0, -1)
  kv0 = None if window is None else window.initial(x_BxL)
  psi0 = jnp.zeros(x_BxL.shape, cfg.dtype) if cfg.remask_confidence else None
  ((x0_BxL, _), nfe_B, _, _), trajectory = jax.lax.scan(
      step, ((x_BxL, cache0), jnp.zeros((batch,), jnp.int32), kv0, psi0),
      (steps, jax.random.split(key, cfg.num_steps)))
  return x0_BxL, trajectory, nfe_B


def block_sample(process: Process, denoise_fn, commit_fn, state, key, batch: int, length: int, block_size: int,
                 cfg: SamplerConfig = SamplerConfig(), given_BxL=None, prompt_BxL=None, eos_id: int | None = None,
                 pad_id: int = 0):
  """Block diffusion sampling (BD3-LM): one ``lax.scan`` over the ``length / block_size`` blocks, left to right;
  each block is denoised from all-mask by ``cfg``'s strategy (a scan or loop of its own: ``cfg.num_steps`` steps,
  first-hitting's one per position, or threshold decoding's), conditioned on the finished blocks before it, and
  is then committed.

  ``denoise_fn(state, x_t_BxLb, b) -> logits_BxLbxV`` is the denoiser on block b's noisy tokens, given what
  ``state`` holds of the finished blocks; ``commit_fn(state, x_BxLb, b) -> state`` adds finished block b. With a KV
  cache as ``state`` (``models.block_decoding.cached``) each block costs its own tokens; with the tokens so far
  (``models.block_decoding.uncached``) every step recomputes the whole prefix: the same draws, slower. Positions
  ``given_BxL`` take ``prompt_BxL``'s tokens (a prompt of whole or partial blocks) and never change. With
  ``eos_id``, each sample stops at its first end-of-document token: every position after it is ``pad_id``.
  The compiled program's size does not depend on the number of blocks or steps. Returns int32 ``[B, L]``."""
  if not isinstance(process, AbsorbingProcess):
    raise ValueError(f"block diffusion samples the absorbing process; got {type(process).__name__}")
  if length % block_size:
    raise ValueError(f"length {length} must be a whole number of blocks of {block_size}")
  if cfg.cache != "none":
    raise ValueError(f"block diffusion samples with its own exact KV cache; leave SamplerConfig.cache at 'none' "
                     f"(got {cfg.cache!r}: the approximate caches are for masked models' semi-AR blocks)")
  if cfg.num_blocks != 1 or cfg.return_trajectory:
    raise ValueError("block diffusion is already blockwise: leave SamplerConfig.num_blocks at 1 and "
                     "return_trajectory off")
  given_BxL, prompt_BxL = _conditioning(given_BxL, prompt_BxL, batch, length, process.num_data_states)
  _ = cfg.dtype
  num_blocks = length // block_size

  def by_block(x_BxL):
    return jnp.swapaxes(x_BxL.reshape(batch, num_blocks, block_size), 0, 1)

  def one_block(state, inputs):
    b, block_key, given_BxLb, prompt_BxLb = inputs
    start = jnp.full((batch, block_size), process.mask_id, jnp.int32)
    x_BxLb, _, _ = _denoise(process, lambda x_t, t_B: denoise_fn(state, x_t, b), block_key, start, given_BxLb,
                            prompt_BxLb, cfg)
    return commit_fn(state, x_BxLb, b), x_BxLb

  _, blocks_NxBxLb = jax.lax.scan(one_block, state, (jnp.arange(num_blocks), jax.random.split(key, num_blocks),
                                                    by_block(given_BxL), by_block(prompt_BxL)))
  tokens_BxL = jnp.swapaxes(blocks_NxBxLb, 0, 1).reshape(batch, length)
  if eos_id is None:
    return tokens_BxL
  after_eos = jnp.cumsum(tokens_BxL == eos_id, axis=1) - (tokens_BxL == eos_id) > 0
  return jnp.where(after_eos, pad_id, tokens_BxL)


def autoregressive_sample(model, params, key, batch: int, length: int, bos: int,
                          cfg: SamplerConfig = SamplerConfig(), given_BxL=None, prompt_BxL=None):
  """Left-to-right decoding of the causal baseline with a KV cache, one token per ``lax.scan`` step.

  ``model`` is a causal ``Transformer`` whose last id ``bos`` starts every sequence; positions marked in
  ``given_BxL`` take their ``prompt_BxL`` token instead of a draw (a prefix prompt). Returns ``[batch, length]``.
  """
  given_BxL, prompt_BxL = _conditioning(given_BxL, prompt_BxL, batch, length, bos)
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32), decode=True)["cache"]

  def step(carry, inputs):
    cache, previous_B = carry
    pos, step_key = inputs
    logits, mutated = model.apply({"params": params, "cache": cache}, previous_B[:, None], decode=True,
                                  mutable=["cache"])
    drawn_B = categorical(step_key, jax.nn.log_softmax(logits[:, 0, :bos]), cfg)
    token_B = jnp.where(given_BxL[:, pos], prompt_BxL[:, pos], drawn_B)
    return (mutated["cache"], token_B), token_B

  start = jnp.full((batch,), bos, jnp.int32)
  _, tokens_LxB = jax.lax.scan(step, (cache, start), (jnp.arange(length), jax.random.split(key, length)))
  return tokens_LxB.T


def unigram_entropy(tokens, vocab_size: int) -> float:
  """Entropy in bits of the token frequencies of a batch of samples: a diversity check to report beside quality."""
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.float64)
  freqs = counts[counts > 0] / counts.sum()
  return float(-(freqs * np.log2(freqs)).sum())
