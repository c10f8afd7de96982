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
from d3pm_jax.processes.base import expand_time

STRATEGIES = ("ancestral", "confidence")
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
  p_theta(x_0 | x_t)), temperature only (no nucleus or greedy, which need the whole distribution), and no
  ``skip_unchanged`` (which caches the distribution)."""
  return (isinstance(process, AbsorbingProcess) and cfg.top_p == 1.0 and not cfg.greedy
          and not cfg.skip_unchanged)


def sample(process: Process, logits_fn, key, batch: int, length: int, cfg: SamplerConfig = SamplerConfig(),
           given_BxL=None, prompt_BxL=None, on_step=None, time_conditioned: bool = True,
           head: SampleHead | None = None):
  """Draws ``[batch, length]`` tokens from the reverse process; returns ``(x0_BxL, trajectory)`` where the
  trajectory ``[num_blocks * num_steps, B, L]`` (x after each step) is None unless ``cfg.return_trajectory``.

  ``logits_fn(x_t_BxL, t_B)`` is the denoiser; ``time_conditioned=False`` declares that it ignores ``t_B``, which
  makes ``cfg.skip_unchanged`` exact (it is refused otherwise unless ``cfg.approximate_skip``). A fused ``head``
  draws the tokens instead of ``logits_fn`` where ``fused_head_supports`` allows (an error otherwise).
  """
  if head is not None and not fused_head_supports(process, cfg):
    raise ValueError(f"a fused sampling head draws tokens of the absorbing process at a temperature; it cannot "
                     f"serve {type(process).__name__} with top_p={cfg.top_p}, greedy={cfg.greedy}, "
                     f"skip_unchanged={cfg.skip_unchanged}: sample from the logits (head=None)")
  if cfg.strategy == "confidence" and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"strategy 'confidence' needs the absorbing process; got {type(process).__name__}. "
                     "Use strategy='ancestral'")
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
  trajectories = []
  for b in range(cfg.num_blocks):
    outside = (position < b * block) | (position >= (b + 1) * block)
    x_BxL, trajectory = _sample_scan(process, logits_fn, jax.random.fold_in(key, b), x_BxL,
                                     given_BxL | outside, jnp.where(given_BxL, prompt_BxL, x_BxL), cfg, on_step,
                                     match_time_to_masking=cfg.num_blocks > 1, head=head)
    trajectories.append(trajectory)
  return x_BxL, (jnp.concatenate(trajectories) if cfg.return_trajectory else None)


def _unmasks(process: AbsorbingProcess, key, x_t, s, t, cfg: SamplerConfig):
  """Which masked positions of ``x_t`` unmask on the step from t to s: each with probability
  (alpha(s) - alpha(t)) / (1 - alpha(t)), all at the end of the grid (s = 0)."""
  at_end = expand_time(s, jnp.ndim(x_t)) == 0
  alpha_s = process.keep_probability(s, jnp.ndim(x_t))
  alpha_t = process.keep_probability(t, jnp.ndim(x_t))
  unmask_p = jnp.where(at_end, 1.0, (alpha_s - alpha_t) / (1.0 - alpha_t))
  return (x_t == process.mask_id) & draws.bernoulli(key, unmask_p, jnp.shape(x_t), cfg.dtype)


def reverse_step(process: Process, key, log_p0_xV, x_t, s, t, cfg: SamplerConfig):
  """One ancestral step x_t -> x_s from the denoiser's prediction ``log_p0_xV`` = log p_theta(x_0 | x_t)
  ``[..., V]``: the knobs shape the prediction, and x_s is drawn from the exact reverse step it implies. Where
  ``s == 0`` (the end of the grid) x_0 is drawn from the shaped prediction itself. ``s`` and ``t`` broadcast
  against the leading dims of ``x_t`` (``t_B`` against ``x_BxL``). Returns int32 like ``x_t``."""
  log_p = shape_prediction(log_p0_xV, cfg)
  token_key, move_key = jax.random.split(key)
  at_end = expand_time(s, jnp.ndim(x_t)) == 0
  if isinstance(process, AbsorbingProcess):
    # Two stages: whether a masked position unmasks (the schedule alone decides), then its token from p~.
    unmask = _unmasks(process, move_key, x_t, s, t, cfg)
    return jnp.where(unmask, draws.categorical(token_key, log_p, cfg.dtype), x_t).astype(jnp.int32)
  posterior = process.posterior_logits(jnp.exp(log_p), x_t, s, t)
  return draws.categorical(token_key, jnp.where(at_end[..., None], log_p, posterior), cfg.dtype)


def _sample_scan(process: Process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg: SamplerConfig,
                 on_step=None, match_time_to_masking: bool = False, head: SampleHead | None = None):
  """The plain sampler: ``cfg.num_steps`` reverse steps from ``x_BxL`` in one scan, ``given`` positions clamped.
  ``match_time_to_masking`` gives the network the time whose alpha matches the unmasked fraction of x_t."""
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
    return t_B

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
    if cache is None:
      return network(x_t, t_B)
    prev_x, prev_log_p = cache
    return jax.lax.cond(jnp.all(x_t == prev_x), lambda: prev_log_p, lambda: network(x_t, t_B))

  def step(carry, inputs):
    x_t, cache = carry
    i, step_key = inputs
    if on_step is not None:  # a host callback per step, e.g. a progress bar
      jax.debug.callback(on_step)
    t_B = jnp.full((batch,), times[i])
    s_B = jnp.full((batch,), times[i - 1])
    log_p0 = None if head is not None else denoise(x_t, t_B, cache)
    if cfg.strategy == "ancestral" and head is not None:
      token_key, move_key = jax.random.split(step_key)
      proposal, _ = fused_draw(token_key, x_t, t_B)
      x_s = jnp.where(_unmasks(process, move_key, x_t, s_B, t_B, cfg), proposal, x_t)
    elif cfg.strategy == "ancestral":
      x_s = reverse_step(process, step_key, log_p0, x_t, s_B, t_B, cfg)
    else:
      draw_key, rank_key = jax.random.split(step_key)
      if head is not None:
        proposal, prob = fused_draw(draw_key, x_t, t_B)
        confidence = jnp.log(prob)
      else:
        proposal = categorical(draw_key, log_p0, cfg)
        confidence = jnp.take_along_axis(log_p0, proposal[..., None], axis=-1)[..., 0]
      masked = x_t == process.mask_id
      # How many free positions stay masked at time s: (1 - alpha(s)) / (1 - alpha(1)) of them, none at the end.
      frac = (1.0 - schedule.alpha(s_B)) / (1.0 - schedule.alpha(jnp.ones_like(s_B)))
      keep_masked_B = jnp.where(i == 1, 0, jnp.floor(frac * num_free_B).astype(jnp.int32))
      # Rank masked positions by confidence (ties broken by tiny noise); unmask all but the least confident.
      score = jnp.where(masked, confidence + 1e-6 * jax.random.uniform(rank_key, confidence.shape), jnp.inf)
      rank = jnp.argsort(jnp.argsort(score, axis=1), axis=1)  # 0 = least confident masked position
      stays_masked = masked & (rank < keep_masked_B[:, None])
      x_s = jnp.where(masked & ~stays_masked, proposal, x_t)
    x_s = clamp(x_s)
    return (x_s, None if cache is None else (x_t, log_p0)), (x_s if cfg.return_trajectory else None)

  cache0 = None
  if cfg.skip_unchanged:  # the previous input and output; -1 never equals a token, so step one always runs
    out = jax.eval_shape(network, x_BxL, jnp.zeros((batch,)))
    cache0 = (jnp.full_like(x_BxL, -1), jnp.zeros(out.shape, out.dtype))
  steps = jnp.arange(cfg.num_steps, 0, -1)
  (x0_BxL, _), trajectory = jax.lax.scan(step, (x_BxL, cache0), (steps, jax.random.split(key, cfg.num_steps)))
  return x0_BxL, trajectory


def block_sample(process: Process, denoise_fn, commit_fn, state, key, batch: int, length: int, block_size: int,
                 cfg: SamplerConfig = SamplerConfig(), given_BxL=None, prompt_BxL=None, eos_id: int | None = None,
                 pad_id: int = 0):
  """Block diffusion sampling (BD3-LM): one ``lax.scan`` over the ``length / block_size`` blocks, left to right;
  each block is denoised from all-mask by ``cfg``'s strategy (``cfg.num_steps`` steps of ``_sample_scan``, a scan
  of its own), conditioned on the finished blocks before it, and is then committed.

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
    x_BxLb, _ = _sample_scan(process, lambda x_t, t_B: denoise_fn(state, x_t, b), block_key, start, given_BxLb,
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
