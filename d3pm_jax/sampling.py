"""Samplers: one ``jax.lax.scan`` over a static number of steps, for every process.

Strategies:
  ancestral    x_s ~ sum_{x_0} q(x_s | x_t, x_0) p_theta(x_0 | x_t) (``Process.posterior_logits``), the last step
               drawing x_0 from the denoiser; for absorbing this is MD4/MDLM ancestral sampling, and unmasked
               tokens carry over because the posterior keeps them.
  confidence   absorbing only (MaskGIT / LLaDA): every masked position draws a token from p_theta(x_0 | x_t);
               the most confident ones are kept so that the number still masked follows 1 - alpha(s), the others
               stay (are re-)masked. The last step unmasks everything.
Semi-autoregressive blocks (``num_blocks``, absorbing): blocks are generated left to right, each conditioned on
the finished blocks before it.
Conditioning: ``given_BxL`` marks positions whose ``prompt_BxL`` tokens are fixed (a prefix prompt or an
infilling template); they are written into x at every step and never change.
``on_step`` (a no-argument host function) is called after every step, for progress bars.
``skip_unchanged`` reuses the previous step's network output when x_t did not change, which is exact when the
denoiser does not look at t.
Categorical draws use the Gumbel-max trick in ``precision`` (float64 needs ``jax_enable_x64``; ``auto`` takes it
when enabled): float32 Gumbel noise truncates the tail of the distribution and lowers sample diversity, so report
``unigram_entropy`` of samples beside any quality figure.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import _checks
from d3pm_jax.processes import AbsorbingProcess, Process

STRATEGIES = ("ancestral", "confidence")
TIME_GRIDS = ("uniform", "cosine")
PRECISIONS = ("auto", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  num_steps: int = 64
  strategy: str = "ancestral"
  time_grid: str = "uniform"
  temperature: float = 1.0
  top_p: float = 1.0
  precision: str = "auto"       # float64 where 64-bit JAX is enabled, else float32
  skip_unchanged: bool = False
  return_trajectory: bool = False
  greedy: bool = False           # argmax instead of a random draw (tests; deterministic decoding)
  num_blocks: int = 1            # semi-autoregressive blocks (absorbing); num_steps steps per block

  def __post_init__(self):
    _checks.check_choice("sampling strategy", self.strategy, STRATEGIES)
    _checks.check_choice("time grid", self.time_grid, TIME_GRIDS)
    _checks.check_choice("sampling precision", self.precision, PRECISIONS)
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1; got {self.num_steps}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be positive; got {self.temperature}")
    if self.num_blocks < 1:
      raise ValueError(f"num_blocks must be >= 1; got {self.num_blocks}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1]; got {self.top_p}")


def time_grid(name: str, num_steps: int):
  """Times ``[num_steps + 1]`` from 0 to 1: uniform, or cosine-spaced (denser near both ends)."""
  u = jnp.arange(num_steps + 1) / num_steps
  return u if name == "uniform" else 0.5 * (1.0 - jnp.cos(math.pi * u))


def categorical(key, log_probs_xV, cfg: SamplerConfig):
  """A draw from softmax(log_probs / temperature) restricted to the top-p nucleus, by Gumbel-max in
  ``cfg.precision``."""
  precision = cfg.precision
  if precision == "auto":
    precision = "float64" if jax.config.jax_enable_x64 else "float32"
  dtype = jnp.dtype(precision)
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("precision='float64' needs 64-bit JAX: set jax.config.update('jax_enable_x64', True) "
                     "or use precision='float32'")
  logits = jax.nn.log_softmax(log_probs_xV.astype(dtype) / cfg.temperature, axis=-1)
  if cfg.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jnp.exp(sorted_desc), axis=-1)
    # The smallest set whose mass reaches top_p: keep every logit >= the last one needed.
    cutoff_index = jnp.sum(cumulative < cfg.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  gumbel = jax.random.gumbel(key, logits.shape, dtype)
  return jnp.argmax(logits + gumbel, axis=-1).astype(jnp.int32)


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


def sample(process: Process, logits_fn, key, batch: int, length: int, cfg: SamplerConfig = SamplerConfig(),
           given_BxL=None, prompt_BxL=None, on_step=None):
  """Draws ``[batch, length]`` tokens from the reverse process; returns ``(x0_BxL, trajectory)`` where the
  trajectory ``[num_blocks * num_steps, B, L]`` (x after each step) is None unless ``cfg.return_trajectory``."""
  if cfg.strategy == "confidence" and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"strategy 'confidence' needs the absorbing process; got {type(process).__name__}. "
                     "Use strategy='ancestral'")
  given_BxL, prompt_BxL = _conditioning(given_BxL, prompt_BxL, batch, length, process.num_data_states)
  if cfg.num_blocks > 1 and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"semi-autoregressive blocks (num_blocks={cfg.num_blocks}) need the absorbing process; "
                     f"got {type(process).__name__}")
  if length % cfg.num_blocks:
    raise ValueError(f"length {length} must be divisible by num_blocks={cfg.num_blocks}")
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
                                     given_BxL | outside, jnp.where(given_BxL, prompt_BxL, x_BxL), cfg, on_step)
    trajectories.append(trajectory)
  return x_BxL, (jnp.concatenate(trajectories) if cfg.return_trajectory else None)


def _sample_scan(process: Process, logits_fn, key, x_BxL, given_BxL, prompt_BxL, cfg: SamplerConfig,
                 on_step=None):
  """The plain sampler: ``cfg.num_steps`` reverse steps from ``x_BxL`` in one scan, ``given`` positions clamped."""
  batch, length = x_BxL.shape

  def clamp(x_BxL):
    return jnp.where(given_BxL, prompt_BxL, x_BxL)

  x_BxL = clamp(x_BxL)
  times = time_grid(cfg.time_grid, cfg.num_steps)
  schedule = process.schedule
  num_free_B = jnp.sum(~given_BxL, axis=1)

  def network(x_t, t_B):
    return process.x0_log_probs(logits_fn(x_t, t_B), x_t)

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
    log_p0 = denoise(x_t, t_B, cache)
    draw_key, rank_key = jax.random.split(step_key)
    if cfg.strategy == "ancestral":
      posterior = process.posterior_logits(jnp.exp(log_p0), x_t, s_B, t_B)
      x_s = categorical(draw_key, jnp.where(i == 1, log_p0, posterior), cfg)
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
