"""The denoiser: a pre-norm transformer with rotary positions, GLU MLPs and optional adaLN-zero time conditioning.

Run bidirectionally it is the diffusion denoiser (logits of p(x_0 | x_t)); run with ``causal=True`` it is the
autoregressive baseline (logits of p(x_{n+1} | x_{<=n})). Every parameter carries logical axis names
(``vocab, embed, heads, kv, mlp, norm, cond``); the mapping to mesh axes lives in the config.
Compute runs in ``dtype`` (e.g. bfloat16), while parameters, norms and the output logits stay in float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3pm_jax import _checks
from pallas_kernels import attention as attention_kernels, fused_ce
from pallas_kernels.common import target_platform

NORMS = ("rms", "layer")
# Fields that choose how the network is computed, never what it computes: a checkpoint resumes under any of them.
EXECUTION_FIELDS = ("attention_impl", "head_impl", "head_tile", "kernel_interpret")
# Fields that change training, never the network a checkpoint holds: a run may resume with other rates.
REGULARISATION_FIELDS = ("dropout", "attention_dropout")
HEAD_IMPLS = fused_ce.IMPLS + ("auto",)
ATTENTION_IMPLS = attention_kernels.IMPLS + ("auto",)
# What 'auto' means on each platform a program is compiled for (pallas_kernels.common.target_platform):
# (attention, head). Elsewhere (the CPU) the XLA attention and the unfused head, which are fastest there.
AUTO_KERNELS = {"tpu": ("splash", "pallas"), "gpu": ("cudnn", "pallas")}
DTYPES = ("float32", "bfloat16")
# The GLU's gate nonlinearity: SiLU (SwiGLU; MDLM-style and this library's default), sigmoid (the original GLU of
# Dauphin et al.; MD4), GELU (GeGLU; tanh approximation).
MLP_ACTIVATIONS = {"silu": nn.silu, "sigmoid": nn.sigmoid, "gelu": nn.gelu}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer sizes and numerics. ``mlp_dim`` is the GLU's hidden width."""
  vocab_size: int
  max_len: int = 128
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  mlp_dim: int = 1024
  causal: bool = False
  time_conditioning: bool = False
  cond_dim: int = 128
  norm: str = "rms"
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = False      # one lax.scan over stacked blocks: compile time and live memory O(1) in depth
  rope_base: float = 10000.0
  vocab_pad_multiple: int = 1    # embedding and head rows rounded up to this, so 'vocab' divides a tensor axis
  # xla | cudnn (GPU) | splash (TPU) | pallas (GPU): pallas_kernels/attention.py; auto: AUTO_KERNELS
  attention_impl: str = "xla"
  # The output head in the masked ELBO and the AR loss: xla | tiled | pallas; auto: AUTO_KERNELS, where the loss
  # can use a fused head (the unfused one for the D3PM and CTMC losses, which need the whole distribution)
  head_impl: str = "xla"
  head_tile: int = 2048          # vocabulary columns per tile of the tiled head
  kernel_interpret: bool = False  # run Pallas kernels in interpret mode (any backend; tests and debugging)
  mlp_activation: str = "silu"   # the GLU gate: silu | sigmoid | gelu (MLP_ACTIVATIONS)
  # Dropout, only while training (the loss's network calls; never in evaluation or sampling): ``dropout`` on the
  # embedding output and on each residual branch's output before it is added, ``attention_dropout`` on the
  # attention weights (the XLA attention only: the fused kernels have no dropout).
  dropout: float = 0.0
  attention_dropout: float = 0.0
  # GPT-2's depth-scaled init: the projections that write into the residual stream (attention out, GLU wo) start
  # with their variance divided by 2 * num_layers, so the stream's variance at init does not grow with depth.
  depth_scaled_init: bool = False

  def __post_init__(self):
    _checks.check_choice("norm", self.norm, NORMS)
    _checks.check_choice("model.mlp_activation", self.mlp_activation, tuple(MLP_ACTIVATIONS))
    for name in ("dropout", "attention_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name} is a rate in [0, 1); got {getattr(self, name)}")
    if self.attention_dropout > 0 and self.attention_impl not in ("xla", "auto"):
      raise ValueError(f"model.attention_dropout={self.attention_dropout} needs model.attention_impl='xla': the "
                       f"{self.attention_impl!r} kernel has no dropout (use 0, or the XLA attention)")
    _checks.check_choice("dtype", self.dtype, DTYPES)
    _checks.check_choice("model.head_impl", self.head_impl, HEAD_IMPLS)
    _checks.check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    for name in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads", "mlp_dim", "cond_dim",
                 "vocab_pad_multiple", "head_tile"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"model.{name} must be a positive integer; got {getattr(self, name)}")
    if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
      raise ValueError(f"model.d_model={self.d_model} must split into num_heads={self.num_heads} heads of even "
                       "width (rotary embeddings rotate pairs)")

  @property
  def attention_kernel(self) -> str:
    """``attention_impl`` with 'auto' resolved for the platform being compiled for (XLA under attention
    dropout, which only the XLA attention has, and on GPUs in float32, which cuDNN's attention does not take)."""
    if self.attention_impl != "auto":
      return self.attention_impl
    kernel = AUTO_KERNELS.get(target_platform(), ("xla", "xla"))[0]
    if self.attention_dropout > 0 or (kernel == "cudnn" and self.dtype != "bfloat16"):  # cuDNN's is 16-bit only
      return "xla"
    return kernel

  def head_kernel(self) -> str:
    """``head_impl`` with 'auto' resolved for the platform being compiled for (the losses that need the whole
    distribution never ask: ``state.loss_terms``)."""
    if self.head_impl != "auto":
      return self.head_impl
    return AUTO_KERNELS.get(target_platform(), ("xla", "xla"))[1]

  @property
  def has_dropout(self) -> bool:
    return self.dropout > 0 or self.attention_dropout > 0

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def padded_vocab_size(self) -> int:
    """Rows of the embedding and the output head; the logits are cut back to ``vocab_size``."""
    return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x, names):
  """A sharding constraint by logical activation names; a no-op unless the caller traces under a mesh and
  ``nn.logical_axis_rules`` (the train and eval steps do, see ``train.compile_steps``)."""
  return nn.with_logical_constraint(x, names)


_RESIDUAL = ("activation_batch", "activation_length", "activation_embed")


class Norm(nn.Module):
  """RMSNorm or LayerNorm in float32, with a learned scale over ``embed`` unless ``learned_scale`` is False (under
  adaLN the per-sample modulation (1 + scale(t)) already scales every channel, as in DiT)."""
  kind: str
  learned_scale: bool = True

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + 1e-6)
    if not self.learned_scale:
      return x32
    scale = self.param("scale", _partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), jnp.float32)
    return x32 * scale


def rotary(x_BxLxHxK, base: float, positions_L=None):
  """Rotary position embedding over the last axis (pairs (i, i + K/2)), at ``positions_L`` (default 0..L-1).

  Written as x * cos + flip(x) * sin on a [..., 2, K/2] view: a reverse instead of a concatenate, which XLA CPU
  fuses with the products."""
  length, width = x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1]
  freq = base ** (-jnp.arange(0, width // 2, dtype=jnp.float32) / (width // 2))
  if positions_L is None:
    positions_L = jnp.arange(length)
  angle_LxK2 = jnp.asarray(positions_L, jnp.float32)[:, None] * freq[None, :]
  cos = jnp.cos(angle_LxK2)[None, :, None, None, :]
  sin = (jnp.sin(angle_LxK2)[:, None, :] * jnp.array([-1.0, 1.0])[:, None])[None, :, None]
  pairs = x_BxLxHxK.astype(jnp.float32).reshape(x_BxLxHxK.shape[:-1] + (2, width // 2))
  out = pairs * cos + jnp.flip(pairs, axis=-2) * sin
  return out.reshape(x_BxLxHxK.shape).astype(x_BxLxHxK.dtype)


def dropout(x, rate: float, key):
  """Inverted dropout: each element kept with probability 1 - rate and scaled by 1 / (1 - rate), so its expected
  value is x; ``rate`` 0 returns x itself."""
  if rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dropout(nn.Module):
  """``dropout`` with a key from the 'dropout' RNG stream; the identity when ``deterministic`` or ``rate`` is 0."""
  rate: float
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))


def segment_mask(segments_BxL):
  """``[B, 1, L, L]`` bool: query i sees key j when both lie in the same document of a packed row (the same
  non-zero segment id); padding (segment 0) is seen by nobody."""
  return ((segments_BxL[:, :, None] == segments_BxL[:, None, :]) & (segments_BxL[:, None, :] > 0))[:, None]


def attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal: bool, kv_valid_M=None, dropout_rate: float = 0.0,
              dropout_key=None):
  """Softmax attention with heads moved next to the batch, so both products are plain batched matmuls, the
  1/sqrt(K) scale applied to q and the softmax normalisation applied to the [B, H, L, K] output rather than to the
  [B, H, L, L] weights. On CPU this is about 15% faster forward and backward than the XLA path of
  ``jax.nn.dot_product_attention``; ``tests/test_model.py`` checks the two agree. ``kv_valid_M`` (bool, broadcast
  against the ``[B, H, L, M]`` scores) hides keys: a KV cache's unwritten slots, or other documents of a packed
  row (``segment_mask``). A query that sees no key (padding) gets zeros, as in every kernel of
  ``model.attention_impl``. With ``dropout_key``, the weights are dropped at ``dropout_rate`` after the softmax's
  normalisation (a dropped weight still counts in it), as in the usual dropout on attention probabilities."""
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  scores_BxHxLxL = jnp.matmul(q * (1.0 / math.sqrt(q.shape[-1])), jnp.swapaxes(k, -1, -2),
                              preferred_element_type=jnp.float32)
  if causal:
    length = q.shape[2]
    scores_BxHxLxL = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores_BxHxLxL, -1e30)
  if kv_valid_M is not None:
    scores_BxHxLxL = jnp.where(kv_valid_M, scores_BxHxLxL, -1e30)
  weights = jnp.exp(scores_BxHxLxL - jax.lax.stop_gradient(jnp.max(scores_BxHxLxL, axis=-1, keepdims=True)))
  if kv_valid_M is not None:  # a row that sees no key has weights exp(0) = 1 everywhere: make them 0
    weights = jnp.where(kv_valid_M, weights, 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  if kv_valid_M is not None:
    total = jnp.where(total > 0, total, 1.0)
  if dropout_key is not None:
    weights = dropout(weights, dropout_rate, dropout_key)
  out_BxHxLxK = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out_BxHxLxK = out_BxHxLxK / total
  return jnp.swapaxes(out_BxHxLxK, 1, 2).astype(v.dtype)


# The dtype weight gradients are made in: every matmul and lookup of a float32 parameter in a lower compute dtype
# produces its parameter's gradient in it, so that where XLA reduces a gradient across devices as it is made (FSDP
# without accumulation: a reduce-scatter of the weight-gradient matmul's partial sums) it reduces in this dtype, not
# in the compute dtype the plain transpose of ``x.astype(bf16) @ w.astype(bf16)`` would give. The train step sets
# it to ``train.grad_reduce_dtype`` (``weight_gradients_in``).
_WEIGHT_GRAD_DTYPE = contextvars.ContextVar("weight_grad_dtype", default="float32")


@contextlib.contextmanager
def weight_gradients_in(dtype):
  """Within, the model's weight gradients come out of their matmuls and lookups in ``dtype`` (read at trace time)."""
  token = _WEIGHT_GRAD_DTYPE.set(jnp.dtype(dtype).name)
  try:
    yield
  finally:
    _WEIGHT_GRAD_DTYPE.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x_NxI, w_IxO, dtypes):
  """``x @ w`` in ``dtype``, whose weight gradient is made in ``grad_dtype`` (the product's accumulator), then
  given in ``w``'s dtype; the input gradient is in ``x``'s dtype as usual. ``dtypes``: the names (dtype,
  grad_dtype, x's, w's)."""
  return x_NxI.astype(dtypes[0]) @ w_IxO.astype(dtypes[0])


def _project_fwd(x_NxI, w_IxO, dtypes):
  x_c, w_c = x_NxI.astype(dtypes[0]), w_IxO.astype(dtypes[0])
  return x_c @ w_c, (x_c, w_c)


def _project_bwd(dtypes, saved, dy_NxO):
  dtype, grad_dtype, x_dtype, w_dtype = dtypes
  x_c, w_c = saved
  dx = jnp.matmul(dy_NxO, w_c.T, preferred_element_type=dtype).astype(x_dtype)
  dw = jnp.matmul(x_c.T, dy_NxO, preferred_element_type=grad_dtype).astype(w_dtype)
  return dx, dw


_project.defvjp(_project_fwd, _project_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup(table_VxD, tokens, dtypes):
  """``table.astype(dtype)[tokens]``, whose table gradient is scatter-added in ``grad_dtype``. ``dtypes``: the
  names (dtype, grad_dtype, the table's)."""
  return jnp.take(table_VxD.astype(dtypes[0]), tokens, axis=0)


def _lookup_fwd(table_VxD, tokens, dtypes):
  # The residual is the tokens and a 0-row slice for the table's shape: never the (gathered) table itself.
  return _lookup(table_VxD, tokens, dtypes), (tokens, jnp.zeros((table_VxD.shape[0], 0), dtypes[2]))


def _lookup_bwd(dtypes, saved, dy_BxLxD):
  _, grad_dtype, table_dtype = dtypes
  tokens, shape_Vx0 = saved
  d_table = jnp.zeros((shape_Vx0.shape[0], dy_BxLxD.shape[-1]), grad_dtype).at[tokens].add(
      dy_BxLxD.astype(grad_dtype))
  return d_table.astype(table_dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Linear(nn.Module):
  """A bias-free projection from the last ``in_axes`` axes of x to ``features`` (a tuple of output axes).

  The kernel has shape ``in_shape + features`` with logical axis ``names``; the product itself is one 2-D matmul
  ``[tokens, prod(in)] @ [prod(in), prod(out)]``. On CPU, XLA lowers a dot with batch axes folded into the
  contraction (the weight gradient of a 3-D ``einsum``) several times slower than the same 2-D matmul.
  """
  features: tuple[int, ...]
  names: tuple[str, ...]
  dtype: jnp.dtype
  in_axes: int = 1
  init_scale: float = 1.0        # multiplies the LeCun-normal init's variance (1 / fan_in)

  @nn.compact
  def __call__(self, x, return_kernel: bool = False):
    """``x @ kernel``, or with ``return_kernel`` the float32 kernel itself (for a fused head)."""
    in_shape = x.shape[-self.in_axes:]
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal",
                                            in_axis=tuple(range(self.in_axes)),
                                            out_axis=tuple(range(self.in_axes, len(self.names))))
    kernel = self.param("kernel", _partitioned(init, self.names),
                        tuple(in_shape) + tuple(self.features), jnp.float32)
    if return_kernel:
      return kernel
    fan_in, fan_out = math.prod(in_shape), math.prod(self.features)
    dtypes = (jnp.dtype(self.dtype).name, _WEIGHT_GRAD_DTYPE.get(), x.dtype.name, kernel.dtype.name)
    y = _project(x.reshape(-1, fan_in), kernel.reshape(fan_in, fan_out), dtypes)
    return y.reshape(x.shape[:-self.in_axes] + tuple(self.features))


def residual_init_scale(cfg: ModelConfig) -> float:
  """The init variance multiplier of a projection into the residual stream (``model.depth_scaled_init``)."""
  return 1.0 / (2 * cfg.num_layers) if cfg.depth_scaled_init else 1.0


class Attention(nn.Module):
  """Self-attention. With ``decode=True`` each call takes the next token(s) and attends to a KV cache in the
  ``cache`` collection; initialising with ``decode=True`` sizes the cache from the input length.

  A causal model (the AR baseline) writes every call's keys and values and attends causally. The bidirectional
  denoiser decodes block diffusion: a call takes one block, which attends to the cached blocks and to itself, and
  only a ``commit`` call (the block's clean tokens, once it is sampled) writes its keys and values. Its cache is a
  ring of as many slots as the init's length: past that, the oldest block's slots are reused, a sliding window."""
  config: ModelConfig
  decode: bool = False
  deterministic: bool = True
  commit: bool = False
  block_size: int = 0   # block diffusion: the most tokens a block holds (the kernels skip key blocks by it)
  write_stale: bool = False  # also store this full pass's keys and values (an approximate cache's refresh)

  @nn.compact
  def __call__(self, x_BxLxD, segments_BxL=None, blocks_BxL=None, mask_BxLxL=None, window_start=None):
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    heads = (cfg.num_heads, head_dim)
    q, k, v = (_constrain(Linear(heads, ("embed", "heads", "kv"), cfg.compute_dtype, name=n)(x_BxLxD),
                          ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
               for n in ("query", "key", "value"))
    if window_start is not None or self.write_stale:
      return self._out(self._stale_step(q, k, v, window_start))
    if self.decode:
      ready = self.has_variable("cache", "cached_key")
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      if not cfg.causal:
        slot_positions = self.variable("cache", "slot_positions", lambda: jnp.full((k.shape[1],), -1, jnp.int32))
        if ready:
          return self._out(self._block_step(q, k, v, cached_k, cached_v, slot_positions, index))
      elif ready:  # a decoding step: write the new keys at `index` and attend to everything written so far
        start = index.value
        positions = start + jnp.arange(q.shape[1])
        k_new = rotary(k, cfg.rope_base, positions)
        at = tuple(jnp.asarray(i, jnp.int32) for i in (0, start, 0, 0))  # int32 also under 64-bit JAX
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_new, at)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, at)
        index.value = start + q.shape[1]
        capacity = cached_k.value.shape[1]
        visible = jnp.arange(capacity)[None, :] <= positions[:, None]  # [L, M]: causal within the new tokens
        out_BxLxHxK = attention(rotary(q, cfg.rope_base, positions), cached_k.value, cached_v.value,
                                causal=False, kv_valid_M=visible)
        return self._out(out_BxLxHxK)
    # Rotary scores depend only on the offset between positions, so row positions serve documents packed in a row.
    # A block-diffusion row (x_t then x_0) gives both halves the positions 0..N-1.
    length = q.shape[1]
    positions = None if blocks_BxL is None else jnp.tile(jnp.arange(length // 2), 2)
    q, k = rotary(q, cfg.rope_base, positions), rotary(k, cfg.rope_base, positions)
    kernel = cfg.attention_kernel
    if kernel == "xla":
      drop = not self.deterministic and cfg.attention_dropout > 0
      if mask_BxLxL is not None:
        valid = mask_BxLxL[:, None]
      elif blocks_BxL is not None:
        valid = attention_kernels.visible(segments_BxL, length, q.shape[0], False, blocks_BxL)[:, None]
      else:
        valid = None if segments_BxL is None else segment_mask(segments_BxL)
      out_BxLxHxK = attention(q, k, v, causal=cfg.causal and blocks_BxL is None and mask_BxLxL is None,
                              kv_valid_M=valid,
                              dropout_rate=cfg.attention_dropout,
                              dropout_key=self.make_rng("dropout") if drop else None)
    else:
      if mask_BxLxL is not None:
        raise ValueError(f"an explicit attention mask needs model.attention_impl='xla'; got {cfg.attention_impl!r}")
      attend = attention_kernels.select(kernel, interpret=cfg.kernel_interpret)
      extra = {} if blocks_BxL is None else {"blocks_BxL": blocks_BxL, "block_size": self.block_size}
      out_BxLxHxK = attend(q, k, v, segments_BxL, cfg.causal, **extra).astype(v.dtype)
    return self._out(out_BxLxHxK)

  def _block_step(self, q, k, v, cached_k, cached_v, slot_positions, index):
    """One block of block diffusion against the cache: the block's queries see every filled slot and the block's
    own keys; a ``commit`` call then writes the block's keys and values into the next slots, modulo the ring."""
    cfg = self.config
    start, width = index.value, q.shape[1]
    capacity = cached_k.value.shape[1]
    if self.commit and capacity % width:
      raise ValueError(f"the block-diffusion cache holds {capacity} positions, not a whole number of blocks of "
                       f"{width}: size it as a multiple of the block size")
    positions = start + jnp.arange(width)
    q, k = rotary(q, cfg.rope_base, positions), rotary(k, cfg.rope_base, positions)
    keys = jnp.concatenate([cached_k.value, k], axis=1)
    values = jnp.concatenate([cached_v.value, v], axis=1)
    seen_M = jnp.concatenate([slot_positions.value >= 0, jnp.ones((width,), bool)])
    out_BxLxHxK = attention(q, keys, values, causal=False, kv_valid_M=seen_M)
    if self.commit:
      slots = positions % capacity
      cached_k.value = cached_k.value.at[:, slots].set(k)
      cached_v.value = cached_v.value.at[:, slots].set(v)
      slot_positions.value = slot_positions.value.at[slots].set(positions.astype(jnp.int32))
      index.value = start + width
    return out_BxLxHxK

  def _stale_step(self, q, k, v, window_start):
    """The approximate KV cache of a masked model (Fast-dLLM's, ``models/approximate_cache.py``). A refresh
    (``write_stale``) is the plain bidirectional pass over all L positions, which also stores every position's
    keys and values. A window call (``window_start``) takes the tokens of positions start..start+W-1: its keys
    and values replace the stored ones there, and its queries attend to all L, the rest as stored (stale). Both
    use the XLA attention, whatever ``model.attention_impl`` says."""
    cfg = self.config
    width = q.shape[1]
    start = jnp.asarray(0 if window_start is None else window_start, jnp.int32)
    positions = start + jnp.arange(width)
    q, k = rotary(q, cfg.rope_base, positions), rotary(k, cfg.rope_base, positions)
    if self.write_stale:
      self.put_variable("cache", "stale_key", k)
      self.put_variable("cache", "stale_value", v)
      return attention(q, k, v, causal=False)
    if not self.has_variable("cache", "stale_key"):
      raise ValueError("a window call reads the keys and values a refresh stored: run the full pass with "
                       "write_stale=True first and pass its 'cache' collection")
    at = (jnp.zeros((), jnp.int32), start, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    keys = jax.lax.dynamic_update_slice(self.get_variable("cache", "stale_key"), k.astype(cfg.compute_dtype), at)
    values = jax.lax.dynamic_update_slice(self.get_variable("cache", "stale_value"), v, at)
    return attention(q, keys, values, causal=False)

  def _out(self, out_BxLxHxK):
    cfg = self.config
    return Linear((cfg.d_model,), ("heads", "kv", "embed"), cfg.compute_dtype, in_axes=2,
                  init_scale=residual_init_scale(cfg), name="out")(out_BxLxHxK)


class GluMlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    gate = Linear((cfg.mlp_dim,), ("embed", "mlp"), cfg.compute_dtype, name="wi_gate")(x_BxLxD)
    up = Linear((cfg.mlp_dim,), ("embed", "mlp"), cfg.compute_dtype, name="wi_up")(x_BxLxD)
    hidden = _constrain(MLP_ACTIVATIONS[cfg.mlp_activation](gate) * up,
                        ("activation_batch", "activation_length", "activation_mlp"))
    return Linear((cfg.d_model,), ("mlp", "embed"), cfg.compute_dtype, init_scale=residual_init_scale(cfg),
                  name="wo")(hidden)


class Block(nn.Module):
  """Pre-norm block; with a conditioning vector, adaLN-zero shifts, scales and gates both branches. ``scanned``
  blocks return ``(x, None)``, the carry and output ``nn.scan`` expects. Unless ``deterministic``, each branch's
  output is dropped out (``model.dropout``) before it joins the residual stream."""
  config: ModelConfig
  decode: bool = False
  scanned: bool = False
  deterministic: bool = True
  commit: bool = False
  block_size: int = 0
  write_stale: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, cond_BxC, segments_BxL=None, blocks_BxL=None, mask_BxLxL=None, window_start=None):
    cfg = self.config
    if cond_BxC is None:
      mods = [None] * 6
    else:
      mod = nn.Dense(6 * cfg.d_model, dtype=jnp.float32, name="adaln",
                     kernel_init=_partitioned(nn.initializers.zeros, ("cond", "embed")),
                     bias_init=_partitioned(nn.initializers.zeros, ("embed",)))(cond_BxC)
      mods = jnp.split(mod[:, None, :], 6, axis=-1)

    def branch(h, module, norm_name, shift, scale, gate, *extra):
      y = Norm(cfg.norm, learned_scale=cond_BxC is None, name=norm_name)(h)
      if shift is not None:
        y = y * (1.0 + scale) + shift
      # The barrier makes XLA materialise the modulated input once; otherwise (on CPU) it fuses the norm and
      # modulation into each consuming matmul and recomputes them there: about 5% of a train step.
      y = module(jax.lax.optimization_barrier(y.astype(cfg.compute_dtype)), *extra)
      y = Dropout(cfg.dropout, self.deterministic)(y)
      return _constrain(h + (y if gate is None else y * gate).astype(h.dtype), _RESIDUAL)

    attend = Attention(cfg, self.decode, self.deterministic, self.commit, self.block_size, self.write_stale,
                       name="attention")
    x_BxLxD = branch(x_BxLxD, attend, "attention_norm", *mods[:3], segments_BxL, blocks_BxL, mask_BxLxL,
                     window_start)
    x_BxLxD = branch(x_BxLxD, GluMlp(cfg, name="mlp"), "mlp_norm", *mods[3:])
    return (x_BxLxD, None) if self.scanned else x_BxLxD


class Embed(nn.Module):
  """Token embedding ``[V_padded, D]``. The table is stored sharded by its parameter rules (FSDP), but gathered
  whole before the lookup (its 'activation' layout is replicated): a lookup into an FSDP-sharded table would give
  activations split over ``embed``, which XLA can only bring back to the batch-sharded residual stream by
  replicating them ("involuntary full rematerialization")."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL):
    cfg = self.config
    table = self.param("embedding", _partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
                       (cfg.padded_vocab_size, cfg.d_model), jnp.float32)
    table = _constrain(table, (None, "activation_embed"))
    return _lookup(table, tokens_BxL, (cfg.compute_dtype.name, _WEIGHT_GRAD_DTYPE.get(), table.dtype.name))


def timestep_embedding(t_B, dim: int):
  """Sinusoidal features of 1000 t, ``[B, dim]``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class Transformer(nn.Module):
  """``__call__(tokens_BxL, t_B=None, decode=False, segments_BxL=None) -> logits_BxLxV`` in float32.
  ``decode=True`` runs the model incrementally against a KV cache (``mutable=['cache']``): the causal model
  token by token, the bidirectional one block by block for block diffusion, where ``commit=True`` appends the
  block's (clean) keys and values to the cache (``Attention``).
  ``segments_BxL`` (packed rows, ``data/prepared.py``) keeps attention within each document; 0 marks padding.
  ``head_inputs=True`` returns what the output head would read instead of the logits: ``(h_BxLxD, W_DxV)`` in
  float32, ``W`` the head's kernel with its padded columns (``padded_vocab_size``), for a fused head.
  ``deterministic=False`` turns dropout on (``model.dropout``, ``model.attention_dropout``; training only): pass
  ``rngs={'dropout': key}`` to ``apply``.
  ``clean_BxL`` with ``blocks_BxL`` (block diffusion, BD3-LM): one pass over x_t (``tokens_BxL``) followed by x_0
  (``clean_BxL``), both at positions 0..L-1, under the block-diffusion mask (``pallas_kernels.attention.visible``)
  given each position's block number ``blocks_BxL`` (``d3pm_jax.blocks.block_ids``); the result is the x_t half's
  (logits of p(x_0 | x_t of the block, x_0 of the blocks before it)). The parameters are the same network's.
  ``block_size`` (the most tokens a block holds) lets the attention kernels skip the key blocks the mask rules
  out; the XLA attention does not need it. A ``block_size`` of at least L (MD4 as block diffusion, L' = L) runs
  the plain pass over x_t alone, which gives the same logits: ``blocks_BxL`` must then number one block per row
  (per document with ``segments_BxL``), as ``d3pm_jax.blocks.block_ids`` does.
  ``mask_BxLxL`` (bool, query by key; XLA attention only) replaces every other attention rule: any mask, for
  research and for tests that build one from its definition.
  ``write_stale=True`` (``mutable=['cache']``) also stores every layer's keys and values of this full pass;
  ``window_start=s`` then runs ``tokens_BxL`` as positions s..s+W-1 against them (``Attention._stale_step``):
  the approximate KV cache of masked-diffusion sampling (``models/approximate_cache.py``)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, t_B=None, decode: bool = False, segments_BxL=None, head_inputs: bool = False,
               deterministic: bool = True, clean_BxL=None, blocks_BxL=None, mask_BxLxL=None,
               commit: bool = False, block_size: int = 0, write_stale: bool = False, window_start=None):
    cfg = self.config
    deterministic = deterministic or decode
    if segments_BxL is not None and decode:
      raise ValueError("segment ids are for training and scoring packed rows, not for KV-cache decoding")
    if tokens_BxL.shape[1] > cfg.max_len:
      raise ValueError(f"sequence length {tokens_BxL.shape[1]} exceeds model.max_len={cfg.max_len}")
    if (clean_BxL is None) != (blocks_BxL is None):
      raise ValueError("a block-diffusion pass needs both clean_BxL (x_0) and blocks_BxL (each position's block)")
    length = tokens_BxL.shape[1]
    if (write_stale or window_start is not None) and (decode or cfg.causal or clean_BxL is not None
                                                      or segments_BxL is not None or mask_BxLxL is not None):
      raise ValueError("an approximate KV cache (write_stale, window_start) serves the bidirectional denoiser's "
                       "plain pass: no decode, causal model, block-diffusion pass, segments or mask")
    if clean_BxL is not None:
      if decode or cfg.causal:
        raise ValueError("a block-diffusion pass runs the bidirectional denoiser (model.causal=False, no decode)")
      if clean_BxL.shape != tokens_BxL.shape or blocks_BxL.shape != tokens_BxL.shape:
        raise ValueError(f"x_t {tokens_BxL.shape}, x_0 {clean_BxL.shape} and blocks {blocks_BxL.shape} must have "
                         "one shape")
      if block_size >= length:
        # One block per row (per document with segment ids): x_t sees only its own block's x_t and the x_0 half
        # is never seen, so the pass is the plain bidirectional one over x_t, at half the cost.
        clean_BxL = blocks_BxL = None
      else:
        tokens_BxL = jnp.concatenate([tokens_BxL, clean_BxL], axis=1)
        # Laid out by row as the activations are: the block numbers are an iota nobody shards, and the attention
        # mask made from them was otherwise built for the whole global batch on every device.
        blocks_BxL = _constrain(jnp.tile(blocks_BxL, (1, 2)), ("activation_batch", "activation_length"))
        if segments_BxL is not None:
          segments_BxL = jnp.tile(segments_BxL, (1, 2))
    x_BxLxD = _constrain(Dropout(cfg.dropout, deterministic)(Embed(cfg, name="embed")(tokens_BxL)), _RESIDUAL)
    cond_BxC = None
    if cfg.time_conditioning:
      if t_B is None:
        raise ValueError("this model is time-conditioned (model.time_conditioning=True); pass t_B")
      hidden = nn.Dense(cfg.cond_dim, name="time_in", kernel_init=_partitioned(nn.initializers.lecun_normal(),
                                                                              ("cond", "cond_hidden")),
                        bias_init=_partitioned(nn.initializers.zeros, ("cond_hidden",)))
      out = nn.Dense(cfg.cond_dim, name="time_out", kernel_init=_partitioned(nn.initializers.lecun_normal(),
                                                                            ("cond_hidden", "cond")),
                     bias_init=_partitioned(nn.initializers.zeros, ("cond",)))
      cond_BxC = out(nn.silu(hidden(timestep_embedding(t_B, cfg.cond_dim))))
    if cfg.scan_layers:
      # Parameters (and KV caches) gain a leading 'layers' axis of size num_layers: params["blocks"][...].
      block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
      blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast,) * 5, length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxLxD, _ = blocks(cfg, decode, scanned=True, deterministic=deterministic, commit=commit,
                          block_size=block_size, write_stale=write_stale, name="blocks")(
          x_BxLxD, cond_BxC, segments_BxL, blocks_BxL, mask_BxLxL, window_start)
    else:
      block = nn.remat(Block) if cfg.remat else Block
      for layer in range(cfg.num_layers):
        layer_block = block(cfg, decode, deterministic=deterministic, commit=commit, block_size=block_size,
                            write_stale=write_stale, name=f"block_{layer}")
        x_BxLxD = layer_block(x_BxLxD, cond_BxC, segments_BxL, blocks_BxL, mask_BxLxL, window_start)
    x_BxLxD = x_BxLxD[:, :length]  # a block-diffusion pass scores its x_t half only
    y = Norm(cfg.norm, learned_scale=cond_BxC is None, name="final_norm")(x_BxLxD)
    if cond_BxC is not None:
      shift, scale = jnp.split(nn.Dense(2 * cfg.d_model, name="final_adaln",
                                        kernel_init=_partitioned(nn.initializers.zeros, ("cond", "embed")),
                                        bias_init=_partitioned(nn.initializers.zeros, ("embed",)))(cond_BxC)[:, None],
                               2, axis=-1)
      y = y * (1.0 + scale) + shift
    head = Linear((cfg.padded_vocab_size,), ("embed", "vocab"), jnp.float32, name="head")
    if head_inputs:
      return y, head(y, return_kernel=True)
    logits = head(y)
    logits = _constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits if cfg.padded_vocab_size == cfg.vocab_size else logits[..., :cfg.vocab_size]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Analytic forward FLOPs per token: 2 per multiply-add of every matmul (projections, GLU, output head) plus
  the attention scores and the weighted sum (2 * 2 * seq_len * d_model per layer). Embedding gathers, norms and
  the per-sequence time MLP are not counted. A train step costs three times this (forward + backward)."""
  per_layer = 4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.mlp_dim
  matmul_params = cfg.num_layers * per_layer + cfg.d_model * cfg.padded_vocab_size
  attention = cfg.num_layers * 4 * seq_len * cfg.d_model
  return 2.0 * matmul_params + attention
