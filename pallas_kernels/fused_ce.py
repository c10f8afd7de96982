"""The output head fused with a weighted cross-entropy: ``loss_N = weights_N * CE(h_N @ W, targets_N)``, never
materialising the ``[N, V]`` logits.

At 8 x 1024 tokens and GPT-2's 50,257 classes the float32 logits of one micro-batch are 1.6 GB, and their
gradient as much again. Here the vocabulary is visited in tiles of ``tile_v`` columns with an online
log-sum-exp (running max and rescaled sum), so only ``[N, tile_v]`` is ever live; the backward pass recomputes
each tile's logits from ``h`` and ``W`` and the saved log-sum-exp.

The cross-entropy runs over the classes ``[0, num_classes)`` less ``exclude``: the absorbing process's mask
class (the SUBS parameterisation: the denoiser never predicts the mask), and the padding columns of a head
padded to a multiple of the tile (``model.vocab_pad_multiple``). The weights carry everything else: the
ELBO's ``-alpha'(t) / (1 - alpha(t))``, the mask (0 at unmasked positions) and padding (0). They are constants:
no gradient flows to them (they depend on t and the corruption, never on parameters).

Three implementations of one contract, each checked against the others (``tests/test_fused_ce.py``):

  ``weighted_ce_reference``  the naive ``[N, V]`` computation, the definition.
  ``weighted_ce_tiled``      a ``lax.scan`` over vocabulary tiles with a ``custom_vjp``: pure JAX, every backend.
  ``weighted_ce_pallas``     Pallas kernels for GPUs (``fused_ce_triton.py``); ``interpret=True`` runs them on the
                             CPU. Rows of weight 0 are gathered into whole blocks that skip their matmuls (the
                             masked ELBO's unmasked positions cost nothing).
  ``weighted_ce_pallas_tpu`` Mosaic TPU kernels (``fused_ce_mosaic.py``); ``pltpu.force_tpu_interpret_mode()``
                             runs them on the CPU.

Products take ``dot_dtype`` inputs (``h`` and ``W`` are cast to it: bfloat16 on the fast path) with float32
accumulation and a stated precision; the log-sum-exp and the gradients are float32.

Under a mesh. Called inside a trace with a mesh in scope (``train.under_mesh_rules``) that has more than one
device, the fused implementations run per shard through ``jax.shard_map``: rows over ``(data, fsdp)``, the
vocabulary over ``tensor``. Each shard computes its columns' running max, sum and target logit; the log-sum-exp
and the target logit are combined across ``tensor`` by a ``pmax`` and ``psum``; the backward pass uses the
combined log-sum-exp, and shard_map's transpose sums ``dh`` over ``tensor`` and ``dW`` over the row axes. No
``[N, V]`` tensor and no gathered activations exist anywhere.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import fused_ce_mosaic, fused_ce_triton
from pallas_kernels.common import NEG, by_backend, valid_columns, vmapped, xla_precision

IMPLS = ("xla", "tiled", "pallas")
def _check(h_NxD, w_DxV, targets_N, weights_N, num_classes: int, exclude):
  n, d = h_NxD.shape
  if w_DxV.ndim not in (2, 3) or w_DxV.shape[-2] != d or (w_DxV.ndim == 3 and n % w_DxV.shape[0]):
    raise ValueError(f"W must be [D={d}, V], or [R, D, V] with R dividing N={n} (per replica); got {w_DxV.shape}")
  if targets_N.shape != (n,) or weights_N.shape != (n,):
    raise ValueError(f"targets and weights must be [N={n}]; got {targets_N.shape} and {weights_N.shape}")
  if not 0 < num_classes <= w_DxV.shape[-1]:
    raise ValueError(f"num_classes must lie in [1, V={w_DxV.shape[-1]}]; got {num_classes}")
  if exclude is not None and not 0 <= exclude < num_classes:
    raise ValueError(f"exclude must be a class in [0, {num_classes}) or None; got {exclude}")


# ---------------------------------------------------------------- the definition

def weighted_ce_reference(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None):
  """``weights_N * (logsumexp over the classes - logit[target])`` from the full float32 ``[N, V]`` logits."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  logits_NxV = jnp.dot(h_NxD.astype(jnp.float32), w_DxV.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
  valid, _ = valid_columns(jnp.arange(w_DxV.shape[1]), 0, w_DxV.shape[1], num_classes, exclude)
  logits_NxV = jnp.where(valid, logits_NxV, -jnp.inf)
  ce_N = (jax.nn.logsumexp(logits_NxV, axis=-1)
          - jnp.take_along_axis(logits_NxV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0])
  return jax.lax.stop_gradient(weights_N.astype(jnp.float32)) * ce_N




# ---------------------------------------------------------------- pure JAX, tiled

@dataclasses.dataclass(frozen=True)
class TiledPlan:
  """A ``lax.scan`` over vocabulary tiles of ``tile`` columns (the same contract as the kernels' plans)."""
  v: int
  num_classes: int
  exclude: int | None
  tile: int = 2048
  dot_dtype: str = "float32"
  skips_zero_rows = False

  def _tiles(self, w_DxV):
    w = w_DxV.astype(self.dot_dtype)
    pad = -w.shape[1] % self.tile
    w = jnp.pad(w, ((0, 0), (0, pad))) if pad else w
    return jnp.moveaxis(w.reshape(w.shape[0], -1, self.tile), 1, 0)

  def _logits(self, h, index, w_DxT, offset):
    logits = jnp.dot(h, w_DxT, precision=xla_precision(self.dot_dtype), preferred_element_type=jnp.float32)
    valid, cols = valid_columns(index * self.tile + jnp.arange(self.tile), offset, self.v, self.num_classes,
                                self.exclude)
    return logits, valid, cols

  def partials(self, h_NxD, w_DxV, targets_N, weights_N, offset):
    h = h_NxD.astype(self.dot_dtype)
    n = h.shape[0]

    def step(carry, inputs):
      m_N, s_N, target_N = carry
      logits_NxT, valid, cols = self._logits(h, *inputs, offset)
      logits_NxT = jnp.where(valid, logits_NxT, NEG)
      m_new = jnp.maximum(m_N, logits_NxT.max(axis=-1))
      s_N = s_N * jnp.exp(m_N - m_new) + jnp.where(valid, jnp.exp(logits_NxT - m_new[:, None]), 0.0).sum(axis=-1)
      target_N = target_N + jnp.where(cols[None, :] == targets_N[:, None], logits_NxT, 0.0).sum(axis=-1)
      return (m_new, s_N, target_N), None

    tiles = self._tiles(w_DxV)
    init = (jnp.full((n,), NEG, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m_N, s_N, target_N), _ = jax.lax.scan(step, init, (jnp.arange(tiles.shape[0]), tiles))
    return m_N[None], s_N[None], target_N[None]

  def backward(self, h_NxD, w_DxV, targets_N, lse_N, coef_N, offset):
    h = h_NxD.astype(self.dot_dtype)
    precision = xla_precision(self.dot_dtype)

    def step(dh_NxD, inputs):
      index, w_DxT = inputs
      logits_NxT, valid, cols = self._logits(h, index, w_DxT, offset)
      p_NxT = jnp.where(valid, jnp.exp(logits_NxT - lse_N[:, None]), 0.0)
      dlogits = jnp.where(coef_N[:, None] != 0, coef_N[:, None] * (p_NxT - (cols[None, :] == targets_N[:, None])),
                          0.0).astype(self.dot_dtype)
      dh_NxD = dh_NxD + jax.lax.dot_general(dlogits, w_DxT, (((1,), (1,)), ((), ())), precision=precision,
                                            preferred_element_type=jnp.float32)
      return dh_NxD, jax.lax.dot_general(h, dlogits, (((0,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

    tiles = self._tiles(w_DxV)
    dh_NxD, dw_TxDxT = jax.lax.scan(step, jnp.zeros(h.shape, jnp.float32), (jnp.arange(tiles.shape[0]), tiles))
    dw_DxV = jnp.moveaxis(dw_TxDxT, 0, 1).reshape(h.shape[1], -1)[:, :w_DxV.shape[1]]
    return dh_NxD, dw_DxV


# ---------------------------------------------------------------- one custom_vjp for every plan

def combine(m_SxN, s_SxN, target_SxN, vocab_axis=None):
  """``(lse_N, target_N)`` from per-split partial maxima, sums and target logits (splits on axis 0), and across
  the ``vocab_axis`` shards of a mesh when given."""
  m_N = jnp.max(m_SxN, axis=0)
  if vocab_axis is not None:
    m_N = jax.lax.pmax(m_N, vocab_axis)
  s_N = jnp.sum(s_SxN * jnp.exp(m_SxN - m_N), axis=0)
  target_N = jnp.sum(target_SxN, axis=0)
  if vocab_axis is not None:
    s_N, target_N = jax.lax.psum((s_N, target_N), vocab_axis)
  return m_N + jnp.log(jnp.where(s_N > 0, s_N, 1.0)), target_N


def _int_zeros(x):
  """The cotangent of an integer input: float0 zeros."""
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(plan, vocab_axis, h_NxD, w_DxV, targets_N, weights_N, offset):
  """``weights * ce`` from ``plan`` (``TiledPlan``, ``fused_ce_triton.TritonPlan``, ``fused_ce_mosaic.MosaicPlan``:
  each gives ``partials`` and ``backward``) over this shard's columns, combined across ``vocab_axis``."""
  return _fused_fwd(plan, vocab_axis, h_NxD, w_DxV, targets_N, weights_N, offset)[0]


def _fused_fwd(plan, vocab_axis, h_NxD, w_DxV, targets_N, weights_N, offset):
  lse_N, target_N = combine(*plan.partials(h_NxD, w_DxV, targets_N, weights_N, offset), vocab_axis)
  live = weights_N != 0
  lse_N = jnp.where(live, lse_N, 0.0)
  loss_N = jnp.where(live, weights_N * (lse_N - target_N), 0.0)
  return loss_N, (h_NxD, w_DxV, targets_N, weights_N, lse_N, offset)


def _fused_bwd(plan, vocab_axis, residuals, g_N):
  h_NxD, w_DxV, targets_N, weights_N, lse_N, offset = residuals
  if vocab_axis is not None:
    # The loss is replicated over the vocabulary shards, and shard_map hands each shard a part of its cotangent
    # (the parts sum to the whole): every shard's columns need the whole.
    g_N = jax.lax.psum(g_N, vocab_axis)
  dh, dw = plan.backward(h_NxD, w_DxV, targets_N, lse_N, g_N * weights_N, offset)
  return (dh.astype(h_NxD.dtype), dw.astype(w_DxV.dtype), _int_zeros(targets_N), jnp.zeros_like(weights_N),
          _int_zeros(offset))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _shard_loss(plan, vocab_axis, h_NxD, w_DxV, targets_N, weights_N, offset):
  """``_fused`` on one shard; for kernels, the rows of weight 0 moved behind the others first (a stable sort), so
  they fill whole blocks that the kernels skip: the masked ELBO's unmasked positions, wherever they are, cost
  nothing."""
  weights_N = jax.lax.stop_gradient(weights_N.astype(jnp.float32))
  targets_N = targets_N.astype(jnp.int32)
  if not plan.skips_zero_rows:
    return _fused(plan, vocab_axis, h_NxD, w_DxV, targets_N, weights_N, offset)
  order = jnp.argsort(weights_N == 0, stable=True)
  loss_N = _fused(plan, vocab_axis, h_NxD[order], w_DxV, targets_N[order], weights_N[order], offset)
  return jnp.zeros_like(loss_N).at[order].set(loss_N)


# ---------------------------------------------------------------- under a mesh

ROW_AXES = ("data", "fsdp")
VOCAB_AXIS = "tensor"


def mesh_layout(n: int, v: int):
  """``(mesh, row_axes, vocab_axis)`` of the mesh in scope for ``n`` rows and ``v`` columns: the axes of size > 1
  that shard them, less those a surrounding vmap already lays its mapped dimension over (``common.vmapped_axes``).
  ``(None, (), None)`` outside a mesh or on one device. Raises when the rows or the columns do not divide over
  their axes."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None, (), None
  shape = dict(mesh.shape)
  rows = tuple(a for a in ROW_AXES if shape.get(a, 1) > 1 and a not in vmapped())  # a surrounding vmap's are taken
  vocab = VOCAB_AXIS if shape.get(VOCAB_AXIS, 1) > 1 else None
  # Under a vmap over mesh axes the kernel still runs in a shard_map, even of no axes of its own: XLA cannot split
  # the vmap's batch of a custom call, and would gather it whole onto every device.
  if not rows and vocab is None and not any(shape.get(a, 1) > 1 for a in vmapped()):
    return None, (), None
  row_size = math.prod(shape[a] for a in rows)
  if n % row_size:
    raise ValueError(f"the fused head's {n} rows do not divide over mesh axes {rows} of size {row_size}; make "
                     "the batch a multiple of data x fsdp")
  if vocab and v % shape[vocab]:
    raise ValueError(f"the head's {v} columns do not divide over the {shape[vocab]} '{vocab}' shards; set "
                     f"model.vocab_pad_multiple to a multiple of {shape[vocab]}")
  return mesh, rows, vocab


def vocab_offset(vocab_axis, v_local: int):
  """The global id of this shard's first column."""
  return 0 if vocab_axis is None else jax.lax.axis_index(vocab_axis) * v_local


def _mesh_loss(make_plan, h_NxD, w_DxV, targets_N, weights_N):
  """The loss per row, per shard of the mesh in scope. A per-replica ``W`` (``[R, D, V]``: replica r's head for
  the r-th of R equal blocks of rows, as ``train.PerReplica`` makes it) has its replicas laid over the leading row
  axes whose sizes multiply to R, so each device reads its own replica's head and ``dW`` stays per replica: only
  the row axes past those sum it. (Outside a mesh, each replica's rows run in turn under a ``vmap``.)"""
  per_replica = w_DxV.ndim == 3
  mesh, rows, vocab = mesh_layout(h_NxD.shape[0], w_DxV.shape[-1])
  if mesh is None:
    if per_replica:
      split = lambda a: a.reshape((w_DxV.shape[0], -1) + a.shape[1:])
      return jax.vmap(lambda h, w, t, wt: _mesh_loss(make_plan, h, w, t, wt))(
          split(h_NxD), w_DxV, split(targets_N), split(weights_N)).reshape(-1)
    return _shard_loss(make_plan(*h_NxD.shape, w_DxV.shape[1]), None, h_NxD, w_DxV, targets_N, weights_N, 0)
  row_spec = rows or None
  w_spec = P(None, vocab)
  if per_replica:
    sizes = [math.prod(mesh.shape[a] for a in rows[:i]) for i in range(len(rows) + 1)]
    if w_DxV.shape[0] not in sizes:
      raise ValueError(f"a per-replica head of {w_DxV.shape[0]} replicas lies over no leading row axes of {rows} "
                       f"(sizes {dict(mesh.shape)})")
    w_spec = P(rows[:sizes.index(w_DxV.shape[0])] or None, None, vocab)

  def local(h, w, targets, weights):
    w = w[0] if per_replica else w  # each device holds one replica's head
    plan = make_plan(*h.shape, w.shape[1])
    return _shard_loss(plan, vocab, h, w, targets, weights, vocab_offset(vocab, w.shape[1]))

  return jax.shard_map(local, mesh=mesh, in_specs=(P(row_spec, None), w_spec, P(row_spec), P(row_spec)),
                       out_specs=P(row_spec), check_vma=False)(h_NxD, w_DxV, targets_N, weights_N)


# ---------------------------------------------------------------- the public functions

def weighted_ce_tiled(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                      tile_v: int = 2048, dot_dtype="float32"):
  """``weighted_ce_reference``'s value and gradients (for ``h`` and ``W``), holding ``[N, tile_v]`` logits at a
  time; per shard under a mesh."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  make = lambda n, d, v: TiledPlan(v=v, num_classes=num_classes, exclude=exclude, tile=int(tile_v),
                                   dot_dtype=jnp.dtype(dot_dtype).name)
  return _mesh_loss(make, h_NxD, w_DxV, targets_N, weights_N)


def weighted_ce_pallas(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                       dot_dtype="float32", interpret: bool = False, **blocks):
  """``weighted_ce_reference``'s value and gradients (for ``h`` and ``W``) from the Triton kernels of
  ``fused_ce_triton`` (``blocks``: ``TritonPlan``'s ``block_n``, ``tile_v``, ``chunk_d``, ``splits``,
  ``chunk_rows``, ``num_warps``, ``num_stages``); ``weights`` are constants (no gradient flows to them); per shard
  under a mesh. ``interpret=True`` runs the kernels on any backend."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  make = lambda n, d, v: fused_ce_triton.TritonPlan(n=n, d=d, v=v, num_classes=num_classes, exclude=exclude,
                                                    dot_dtype=jnp.dtype(dot_dtype).name, interpret=interpret,
                                                    **blocks)
  make(*h_NxD.shape, w_DxV.shape[-1])  # validates the blocks before any tracing
  return _mesh_loss(make, h_NxD, w_DxV, targets_N, weights_N)


def weighted_ce_pallas_tpu(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                           dot_dtype="float32", block_n: int = 0, tile_v: int = 0):
  """``weighted_ce_pallas`` as the Mosaic TPU kernels of ``fused_ce_mosaic`` (``block_n`` a multiple of 8 and
  ``tile_v`` of 128; 0 picks the largest that fit the default scoped VMEM). Under
  ``pltpu.force_tpu_interpret_mode()`` they run on any backend."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  make = lambda n, d, v: fused_ce_mosaic.MosaicPlan(n=n, d=d, v=v, num_classes=num_classes, exclude=exclude,
                                                    dot_dtype=jnp.dtype(dot_dtype).name, block_n=block_n,
                                                    tile_v=tile_v)
  make(*h_NxD.shape, w_DxV.shape[-1])
  return _mesh_loss(make, h_NxD, w_DxV, targets_N, weights_N)


def select(impl: str, *, tile_v: int = 2048, interpret: bool = False, dot_dtype="float32"):
  """The ``weighted_ce(h, W, targets, weights, *, num_classes, exclude)`` of implementation ``impl``
  (``tiled`` or ``pallas``; ``xla`` is the unfused head, which has none), its products in ``dot_dtype``. The
  Pallas kernels are Triton's on GPUs and Mosaic's on TPUs: on another backend they need ``interpret``."""
  return by_backend("fused head", impl, IMPLS[1:], hint=" ('xla' computes the logits and needs none)",
                    tiled=functools.partial(weighted_ce_tiled, tile_v=tile_v, dot_dtype=dot_dtype),
                    triton=functools.partial(weighted_ce_pallas, interpret=interpret, dot_dtype=dot_dtype),
                    mosaic=functools.partial(weighted_ce_pallas_tpu, dot_dtype=dot_dtype), interpret=interpret)
