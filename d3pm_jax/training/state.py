"""What a run is made of, shared by training, evaluation and sampling: the train state, the optimiser, the
corruption process, the loss and the sampler a config names, and a fresh state. Nothing here runs a loop or
touches a workdir."""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d3pm_jax import losses, sampling
from d3pm_jax.config import ExperimentConfig, ProcessConfig
from d3pm_jax.data import pipeline
from d3pm_jax.models import approximate_cache, block_decoding
from d3pm_jax.models.transformer import ModelConfig, Transformer
from d3pm_jax.processes import AbsorbingProcess, Process, make_process
from d3pm_jax.runtime import sharding
from d3pm_jax.schedules import DISCRETE, get_schedule, mutual_information_grid
from pallas_kernels import fused_ce, fused_sample


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def build_process(cfg: ProcessConfig, model_cfg: ModelConfig, unigram_V=None) -> Process | None:
  """The corruption process for the model's vocabulary; None for the autoregressive baseline. The
  ``mutual_information`` schedule is computed for the process from ``unigram_V``, the training data's token
  counts (``pipeline.train_unigram``)."""
  if cfg.is_autoregressive:
    return None
  # D3PM's discrete schedules are defined by betas over the loss's T steps (process.num_steps).
  mutual_information = cfg.schedule == "mutual_information"
  schedule = get_schedule("jsd" if mutual_information else cfg.schedule, eps=cfg.eps,
                          num_steps=cfg.num_steps if cfg.schedule in DISCRETE else None)
  if cfg.name != "nearest_neighbor":
    process = make_process(cfg.name, model_cfg.vocab_size, schedule)
  else:
    if cfg.nn_embeddings:
      embeddings = cfg.nn_embeddings
    elif model_cfg.vocab_size == 256:
      embeddings = pipeline.byte_features()
    else:
      raise ValueError("process.nn_embeddings (a .npy table [V, D]) is required unless the tokenizer is bytes")
    process = make_process("nearest_neighbor", model_cfg.vocab_size, schedule, embeddings=embeddings, k=cfg.nn_k,
                           rate_scale=cfg.nn_rate_scale, uniform_rate=cfg.nn_uniform_rate)
  if not mutual_information:
    return process
  if unigram_V is None:
    raise ValueError("process.schedule='mutual_information' is computed from the training data's unigram "
                     "frequencies; build the process with unigram_V (state.process_for does)")
  p_V = np.zeros(process.num_states)
  counts = np.asarray(unigram_V, np.float64)
  if counts.size > process.num_data_states:
    raise ValueError(f"unigram counts over {counts.size} tokens for a process over {process.num_data_states}")
  p_V[:counts.size] = counts
  # q(x_t | x_0) [N, V, V] from the process's columns (not an identity pushed through _apply: a V^3 product per
  # alpha, 30% of the nearest-neighbour grid's time at V = 321).
  states = jnp.arange(process.num_states)
  grid = mutual_information_grid(lambda a_N: jnp.swapaxes(process._column(states[None], a_N[:, None]), 1, 2), p_V,
                                 cfg.num_steps, cfg.eps)
  return dataclasses.replace(process, schedule=get_schedule("mutual_information", eps=cfg.eps,
                                                            num_steps=cfg.num_steps, grid=grid))


def process_for(config: ExperimentConfig, workdir: str | None = None) -> Process | None:
  """``build_process`` for a run, with the training data's unigram counts when its schedule needs them."""
  unigram = (pipeline.train_unigram(config.data, workdir) if config.process.schedule == "mutual_information"
             else None)
  return build_process(config.process, config.model, unigram)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then ``lr_schedule``: a cosine to ``min_lr_ratio`` (1.0:
  constant) at ``steps``, or the inverse square root ``learning_rate * sqrt(warmup_steps / step)``."""
  if cfg.lr_schedule == "inverse_sqrt":
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    return lambda step: peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / jnp.maximum(step, warmup)))
  warmup = min(cfg.warmup_steps, cfg.steps)
  # The cosine runs from the end of warm-up to train.steps; when warm-up takes every step it gets one step nobody
  # reaches (optax refuses a cosine of zero steps).
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """AdamW at ``learning_rate_schedule``, after global-norm clipping to ``grad_clip`` (0: no clipping, as in
  MD4's configs)."""
  schedule = learning_rate_schedule(cfg)
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
  return optax.chain(clip,
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


def init_state(config: ExperimentConfig, model: Transformer, optimizer) -> TrainState:
  rng, init_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  params = nn.unbox(model.init(init_rng, tokens, jnp.zeros((1,)))["params"])
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=optimizer.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params), rng=rng)


def shift_right(tokens_BxL, bos: int):
  """The autoregressive model's input: a start token, then every token but the last."""
  return jnp.concatenate([jnp.full_like(tokens_BxL[:, :1], bos), tokens_BxL[:, :-1]], axis=1)


def network(model: Transformer, params, dropout_key=None):
  """``model.apply`` with ``params`` bound: deterministic, or with ``dropout_key`` (training) the model's dropout
  on, its masks drawn from that key. A model without dropout ignores the key, so its calls stay bit for bit the
  same."""
  if dropout_key is None or not model.config.has_dropout:
    return lambda *args, **kwargs: model.apply({"params": params}, *args, **kwargs)
  return lambda *args, **kwargs: model.apply({"params": params}, *args, deterministic=False,
                                             rngs={"dropout": dropout_key}, **kwargs)


def fused_head(model: Transformer, params, segments_BxL=None, dropout_key=None) -> losses.FusedHead | None:
  """The model's output head fused with the loss's cross-entropy (``model.head_impl``), or None for the plain
  XLA head (``xla``)."""
  cfg = model.config
  impl = cfg.head_kernel()
  if impl == "xla":
    return None
  apply = network(model, params, dropout_key)
  return losses.FusedHead(
      hidden_fn=lambda x_BxL, t_B: apply(x_BxL, t_B, segments_BxL=segments_BxL, head_inputs=True),
      weighted_ce=fused_ce.select(impl, tile_v=cfg.head_tile, interpret=cfg.kernel_interpret,
                                  dot_dtype=cfg.compute_dtype))


def sample_head(model: Transformer, params, process, sampler_cfg) -> sampling.SampleHead | None:
  """The output head fused with sampling (``model.head_impl``) where the sampler can use it
  (``sampling.fused_head_supports``), else None: the plain head's logits."""
  cfg = model.config
  impl = cfg.head_kernel()
  if impl == "xla" or not sampling.fused_head_supports(process, sampler_cfg):
    return None
  return sampling.SampleHead(
      hidden_fn=lambda x_BxL, t_B: model.apply({"params": params}, x_BxL, t_B, head_inputs=True),
      draw=fused_sample.select(impl, tile_v=cfg.head_tile, interpret=cfg.kernel_interpret,
                               dot_dtype=cfg.compute_dtype))


def loss_terms(config: ExperimentConfig, model: Transformer, process: Process | None, params, key, x0_BxL,
               evaluate: bool = False, weights_BxL=None, segments_BxL=None, window=None) -> dict:
  """Per-sequence nats ``[B]``: 'loss' (what is minimised) and 'nelbo' (the bound reported as bits).
  ``weights_BxL`` (1 real, 0 padding; default: ``segments_BxL > 0``, else all 1) removes padded positions from
  every sum. ``segments_BxL`` (packed rows) keeps the network's attention within each document, and the AR
  baseline starts every document from the start token, so a packed row scores as its documents apart.
  Training (``evaluate=False``) runs the model's dropout, if any, with masks from a key folded out of ``key``;
  evaluation never does. Training draws t on ``window`` (an array ``[2]``, a searched window; default the
  config's ``process.clip_low/clip_high``); evaluation on the whole [0, 1]."""
  train_window = config.process.window if window is None else window
  pcfg = config.process
  if weights_BxL is None and segments_BxL is not None:
    weights_BxL = (segments_BxL > 0).astype(jnp.float32)
  dropout_key = None if evaluate else jax.random.fold_in(key, 0xD120)
  apply = network(model, params, dropout_key)
  head = fused_head(model, params, segments_BxL, dropout_key) if pcfg.loss in ("masked", "ar") else None
  if pcfg.is_autoregressive:
    bos = model.config.vocab_size - 1
    inputs_BxL = shift_right(x0_BxL, bos)
    if segments_BxL is not None:  # a document's first token is predicted from the start token, not the last one
      starts = segments_BxL != jnp.pad(segments_BxL, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
      inputs_BxL = jnp.where(starts, bos, inputs_BxL)
    if head is not None:  # the data tokens [0, bos) are the classes
      nll_B = head.sequence_ce(inputs_BxL, None, x0_BxL,
                               jnp.ones(x0_BxL.shape, jnp.float32) if weights_BxL is None else weights_BxL, bos)
      return {"loss": nll_B, "nelbo": nll_B}
    logits = apply(inputs_BxL, segments_BxL=segments_BxL)
    log_p = jax.nn.log_softmax(logits[..., :bos])
    nll_BxL = -jnp.take_along_axis(log_p, x0_BxL[..., None], axis=-1)[..., 0]
    nll_B = jnp.sum(nll_BxL if weights_BxL is None else nll_BxL * weights_BxL, axis=1)
    return {"loss": nll_B, "nelbo": nll_B}

  def logits_fn(x_t_BxL, t_B):
    return apply(x_t_BxL, t_B, segments_BxL=segments_BxL)

  if pcfg.block_size:
    def block_logits_fn(x_t_BxL, x0_BxL, blocks_BxL):
      return apply(x_t_BxL, segments_BxL=segments_BxL, clean_BxL=x0_BxL, blocks_BxL=blocks_BxL,
                   block_size=pcfg.block_size)

    block_head = None if head is None else losses.FusedHead(
        hidden_fn=lambda x_t_BxL, x0_BxL, blocks_BxL: apply(x_t_BxL, segments_BxL=segments_BxL, clean_BxL=x0_BxL,
                                                            blocks_BxL=blocks_BxL, head_inputs=True,
                                                            block_size=pcfg.block_size),
        weighted_ce=head.weighted_ce)
    given_BxL = None
    if config.data.ignore_bos:  # BD3-LM's ignore_bos: each row's first token given clean, and not scored
      given_BxL = jnp.zeros(x0_BxL.shape, bool).at[:, 0].set(True)
      weights_BxL = jnp.where(given_BxL, 0.0, 1.0 if weights_BxL is None else weights_BxL)
    # As below, the reconstruction term (eps x the masked cross-entropy) is left out of training.
    out = losses.block_elbo(process, block_logits_fn, key, x0_BxL, pcfg.block_size, segments_BxL=segments_BxL,
                            with_recon=evaluate, window=(0.0, 1.0) if evaluate else train_window,
                            weights_BxL=weights_BxL, head=block_head, given_BxL=given_BxL)
    return {"loss": out["nelbo"], **out}
  if pcfg.loss == "d3pm":
    out = losses.d3pm_loss(process, logits_fn, key, x0_BxL, pcfg.num_steps, pcfg.hybrid_lambda, weights_BxL)
    return {"loss": out["loss"], "nelbo": out["vlb"], "ce": out["ce"]}
  # Training minimises the bound evaluation reports. The reconstruction term (one more network call) is left out
  # only for absorbing, where x_t at t = 0 differs from x_0 with probability eps per position and the unmasked
  # rest is carried over exactly, so the term is eps x the masked cross-entropy (~1e-4 of a token's bits).
  # Uniform and nearest-neighbour runs never trained on it were charged ~0.08 and ~0.23 bits/byte at evaluation.
  with_recon = evaluate or not isinstance(process, AbsorbingProcess)
  out = losses.continuous_elbo(process, logits_fn, key, x0_BxL, kind=pcfg.loss, with_recon=with_recon,
                               weights_BxL=weights_BxL, head=head, window=(0.0, 1.0) if evaluate else train_window)
  return {"loss": out["nelbo"], **out}


def block_sample(config: ExperimentConfig, model, params, process, key, batch: int, length: int,
                 sampler_cfg: sampling.SamplerConfig, given_BxL=None, prompt_BxL=None, cached: bool = True,
                 eos_id: int | None = None):
  """Block diffusion samples of a ``process.block_size`` run (``sampling.block_sample``): ``length`` tokens (any
  number of blocks; past the model's ``max_len`` with a sliding window of context) with the exact KV cache, or
  with ``cached=False`` recomputing the whole prefix at every step (up to ``max_len``). With ``eos_id``, each
  sample ends at its first end-of-document token, padded after it with ``eos_id``. The block denoiser never
  sees t, so a step whose block did not change reuses the previous step's prediction (``skip_unchanged``, exact
  here: the same tokens, fewer calls when a block has fewer tokens than steps)."""
  block_size = config.process.block_size
  if sampler_cfg.strategy in ("ancestral", "confidence") and sampler_cfg.cache == "none":  # a cache is refused
    sampler_cfg = dataclasses.replace(sampler_cfg, skip_unchanged=True)                 # below, by name
  if cached:
    fns = block_decoding.cached(model, params, batch, block_size,
                                block_decoding.window_for(model, length, block_size))
  else:
    fns = block_decoding.uncached(model, params, batch, length, block_size, process.mask_id)
  return sampling.block_sample(process, *fns, key, batch, length, block_size, sampler_cfg, given_BxL, prompt_BxL,
                               eos_id=eos_id, pad_id=0 if eos_id is None else eos_id)


def window_variances(config: ExperimentConfig, model: Transformer, process, params, key, x0_BxL,
                     segments_BxL=None):
  """``losses.window_variances`` of a block-diffusion run's network on a batch: the per-block loss variance of
  each window of ``losses.CLIP_WINDOWS`` (``process.clip_search``)."""
  block_size = config.process.block_size

  def block_logits_fn(x_t_BxL, x0, blocks_BxL):
    return model.apply({"params": params}, x_t_BxL, segments_BxL=segments_BxL, clean_BxL=x0, blocks_BxL=blocks_BxL,
                       block_size=block_size)

  weights_BxL = None if segments_BxL is None else (segments_BxL > 0).astype(jnp.float32)
  return losses.window_variances(process, block_logits_fn, key, x0_BxL, block_size, segments_BxL=segments_BxL,
                                 weights_BxL=weights_BxL)


def make_sampler(config: ExperimentConfig, model, process, num_steps: int, batch: int, out_sharding=None,
                 temperature: float = 1.0, top_p: float = 1.0, options: dict | None = None, mesh=None):
  """A jitted ``(params, key) -> tokens``: diffusion sampling (ancestral unless ``options``, more
  ``sampling.SamplerConfig`` fields, say otherwise; block by block with a KV cache for block diffusion), or
  KV-cache decoding for the autoregressive baseline (``sampling``; ``options`` do not apply), at ``temperature``
  and nucleus ``top_p``. With parameters spread over several processes, pass a replicated ``out_sharding`` so
  every process can read the tokens. With the run's ``mesh``, the sampler runs on it as the train step does (a
  TPU's Mosaic kernels run only per shard): its batch is drawn rounded up to a multiple of the (data, fsdp)
  devices, and the first ``batch`` rows returned."""
  length = config.data.seq_len
  sampler_cfg = sampling.SamplerConfig(num_steps=num_steps, temperature=temperature, top_p=top_p,
                                       **({} if process is None else options or {}))
  shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  rows = -(-batch // shards) * shards

  def sample(params, key):
    if config.process.block_size:
      return block_sample(config, model, params, process, key, rows, length, sampler_cfg)
    if process is None:
      bos = model.config.vocab_size - 1
      return sampling.autoregressive_sample(model, params, key, rows, length, bos, sampler_cfg)
    logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B)
    return sampling.sample(process, logits_fn, key, rows, length, sampler_cfg,
                           time_conditioned=config.model.time_conditioning,
                           head=sample_head(model, params, process, sampler_cfg),
                           kv_cache=approximate_cache.kv_cache(model, params))[0]

  if mesh is None:
    return jax.jit(sample, out_shardings=out_sharding)
  return jax.jit(sharding.under_mesh_rules(lambda params, key: sample(params, key)[:batch], mesh, config.mesh.rules),
                 out_shardings=out_sharding)
