"""The fused head's weighted cross-entropy as Triton-style Pallas kernels (GPUs; ``interpret=True`` anywhere).

Shapes are chosen for sm_90 (``tests/test_target_kernels.py`` compiles them with XLA:GPU at every shipped width):

  forward   grid (row blocks, vocabulary splits). Each program visits its split's vocabulary tiles in a loop and,
            inside it, the model width in chunks (a second loop, so Triton software-pipelines one chunk of ``h``
            and one of ``W`` at a time: shared memory does not grow with D). It keeps a running max, a rescaled sum
            and the target logit; the splits' partial results are combined outside the kernel (the log-sum-exp of
            partial log-sum-exps), which also gives a 2-D grid enough programs to fill the GPU.
  backward  per chunk of ``chunk_rows`` rows, a kernel over (row blocks, vocabulary tiles) computes each logits
            tile once and writes ``dlogits = coef * (softmax - onehot)`` in the dot dtype; the two products
            ``dh = dlogits @ W^T`` and ``dW += h^T @ dlogits`` are XLA's (cuBLAS) matmuls on that chunk. Only
            ``[chunk_rows, V]`` is ever live, and chunks whose weights are all 0 are skipped.

Every product takes its inputs in ``dot_dtype`` (bfloat16 on the fast path) with float32 accumulation, and states
its precision (``BF16_BF16_F32``, or ``F32_F32_F32`` - true float32, never TF32). Rows of weight 0 arrive gathered
into whole blocks (``fused_ce._shard_loss``); those programs compute nothing.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import NEG, HeadProblem, precision_of, valid_columns



def _power_of_two(name: str, value: int):
  if value < 1 or value & (value - 1):
    raise ValueError(f"{name} must be a power of two (Triton's blocks are); got {value}")


@dataclasses.dataclass(frozen=True)
class TritonPlan(HeadProblem):
  """Static shapes of one call: sizes, blocks, launch parameters. ``splits`` 0 chooses enough vocabulary splits
  for about 1024 forward programs; ``chunk_rows`` 0 chooses the rows of one backward chunk so that its
  ``dlogits`` take at most 64 MiB."""
  block_n: int = 64
  tile_v: int = 0      # 0: 128 for bfloat16 products (wgmma), 64 for float32 ones (FMA, register-bound)
  chunk_d: int = 64
  splits: int = 0
  chunk_rows: int = 0
  num_warps: int = 0   # 0: 4 for bfloat16 (one warpgroup), 8 for float32 (halves each thread's accumulators)
  num_stages: int = 0  # 0: as many as fit (``stages``)
  interpret: bool = False

  def __post_init__(self):
    for name, value in (("block_n", self.block_n), ("tile_v", self.tile), ("chunk_d", self.chunk_d),
                        ("num_warps", self.warps)):
      _power_of_two(name, value)
    precision_of(self.dot_dtype)
    if self.splits < 0 or self.chunk_rows < 0:
      raise ValueError(f"splits and chunk_rows must be >= 0 (0: chosen from the shapes); got {self.splits}, "
                       f"{self.chunk_rows}")

  @property
  def wide(self) -> bool:
    return jnp.dtype(self.dot_dtype).itemsize == 2

  @property
  def tile(self) -> int:
    return self.tile_v or (128 if self.wide else 64)

  @property
  def warps(self) -> int:
    return self.num_warps or (4 if self.wide else 8)

  @property
  def chunk(self) -> int:
    return min(self.chunk_d, pl.next_power_of_2(self.d))

  @property
  def d_pad(self) -> int:
    return -(-self.d // self.chunk) * self.chunk

  @property
  def num_tiles(self) -> int:
    return -(-self.v // self.tile)

  @property
  def num_splits(self) -> int:
    if self.splits:
      return min(self.splits, self.num_tiles)
    row_blocks = -(-self.n // self.block_n)
    return max(1, min(self.num_tiles, 1024 // row_blocks))

  @property
  def tiles_per_split(self) -> int:
    return -(-self.num_tiles // self.num_splits)

  @property
  def v_pad(self) -> int:
    return self.num_tiles * self.tile

  @property
  def rows_per_chunk(self) -> int:
    """Rows of one backward chunk, a multiple of ``block_n`` (chosen: ``block_n`` times a power of two, so that
    the usual power-of-two token counts need no padding rows)."""
    if self.chunk_rows:
      rows = self.chunk_rows
    else:
      fit = max(1, (64 << 20) // (self.v_pad * jnp.dtype(self.dot_dtype).itemsize * self.block_n))
      rows = self.block_n * (1 << (fit.bit_length() - 1))
    rows = min(rows, -(-self.n // self.block_n) * self.block_n)
    return -(-rows // self.block_n) * self.block_n

  @property
  def n_pad(self) -> int:
    return -(-self.n // self.rows_per_chunk) * self.rows_per_chunk

  def kernel_args(self) -> dict:
    return dict(tile_v=self.tile, v=self.v, chunk_d=self.chunk, num_chunks=self.d_pad // self.chunk,
                num_classes=self.num_classes, exclude=self.exclude, precision=precision_of(self.dot_dtype))

  @property
  def stages(self) -> int:
    """Software-pipelining depth: each stage holds one width chunk of ``h`` and of ``W`` in shared memory; as
    many as fit in 128 KiB (the rest of an sm_90 block's 227 KiB is left to the reductions' scratch), 2 to 4."""
    if self.num_stages:
      return self.num_stages
    per_stage = (self.block_n + self.tile) * self.chunk * jnp.dtype(self.dot_dtype).itemsize
    return max(2, min(4, (128 << 10) // per_stage))

  def params(self):
    return pltriton.CompilerParams(num_warps=self.warps, num_stages=self.stages)

  def cost(self, rows: int, forward: bool) -> pl.CostEstimate:
    """What one call over ``rows`` padded rows does when every row block is live: the ``[rows, v_pad]`` logits'
    product over the padded width; an exp per logit, and the forward's rescale per row and tile; the bytes its
    programs load and store: each row block's W columns once, its ``h`` again for every tile (the width loop
    reloads it), the row columns once per program; out, the forward's three partials per split or the dlogits.
    (JAX's Triton lowering does not pass it on to XLA today.)"""
    itemsize, logits = jnp.dtype(self.dot_dtype).itemsize, rows * self.v_pad
    loads = (self.num_tiles * rows * self.d_pad + rows // self.block_n * self.d_pad * self.v_pad) * itemsize
    if forward:  # targets and weights per program (a row block and a split), (m, s, target) per split out
      moved = loads + 5 * self.num_splits * rows * 4
      return pl.CostEstimate(flops=2 * logits * self.d_pad, transcendentals=logits + rows * self.num_tiles,
                             bytes_accessed=moved)
    moved = loads + 3 * self.num_tiles * rows * 4 + logits * itemsize  # targets, lse, coef per program; dlogits
    return pl.CostEstimate(flops=2 * logits * self.d_pad, transcendentals=logits, bytes_accessed=moved)

  def partials(self, *args):
    return _partials(self, *args)

  def backward(self, *args):
    return _backward(self, *args)


def _logits(h_ref, w_ref, j, *, tile_v, chunk_d, num_chunks, precision, acc_dtype=jnp.float32):
  """``[block_n, tile_v]`` float32 logits of vocabulary tile ``j``: a loop over width chunks, so only one chunk
  of ``h`` and ``W`` is staged at a time."""
  cols = pl.ds(pl.multiple_of(j * tile_v, tile_v), tile_v)

  def chunk(c, acc):
    width = pl.ds(pl.multiple_of(c * chunk_d, chunk_d), chunk_d)
    return acc + jnp.dot(h_ref[:, width], w_ref[width, cols], precision=precision, preferred_element_type=acc_dtype)

  return jax.lax.fori_loop(0, num_chunks, chunk, jnp.zeros((h_ref.shape[0], tile_v), acc_dtype))


def _columns(shape, j, tile_v, v, offset, num_classes, exclude):
  """``valid_columns`` of tile ``j`` for an array of ``shape`` (columns on axis 1)."""
  return valid_columns(j * tile_v + jax.lax.broadcasted_iota(jnp.int32, shape, 1), offset, v, num_classes, exclude)


def split_length(split, tiles_per_split: int, num_tiles: int):
  """Tiles of vocabulary split ``split`` (the last ones may have fewer, or none)."""
  return jnp.clip(num_tiles - split * tiles_per_split, 0, tiles_per_split)


def _forward_kernel(off_ref, h_ref, w_ref, t_ref, wt_ref, m_ref, s_ref, tgt_ref, *, tiles_per_split, num_tiles,
                    tile_v, v, chunk_d, num_chunks, num_classes, exclude, precision):
  """One block of rows and one vocabulary split: running max ``m``, sum ``s`` of exp(logit - m) and the target
  logit over the split's classes."""
  split = pl.program_id(1)
  rows = h_ref.shape[0]
  active = jnp.max(jnp.abs(wt_ref[...])) > 0

  @pl.when(active)
  def _():
    targets = t_ref[...]

    def tile(k, carry):
      m, s, target = carry
      j = split * tiles_per_split + k
      logits = _logits(h_ref, w_ref, j, tile_v=tile_v, chunk_d=chunk_d, num_chunks=num_chunks, precision=precision)
      valid, cols = _columns(logits.shape, j, tile_v, v, off_ref[0], num_classes, exclude)
      logits = jnp.where(valid, logits, NEG)
      m_new = jnp.maximum(m, jnp.max(logits, axis=1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.where(valid, jnp.exp(logits - m_new[:, None]), 0.0), axis=1)
      target = target + jnp.sum(jnp.where(cols == targets[:, None], logits, 0.0), axis=1)
      return m_new, s, target

    init = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    m, s, target = jax.lax.fori_loop(0, split_length(split, tiles_per_split, num_tiles), tile, init)
    m_ref[...] = m
    s_ref[...] = s
    tgt_ref[...] = target

  @pl.when(jnp.logical_not(active))
  def _():
    m_ref[...] = jnp.zeros((rows,), jnp.float32)
    s_ref[...] = jnp.zeros((rows,), jnp.float32)
    tgt_ref[...] = jnp.zeros((rows,), jnp.float32)


def _pad(x, *widths):
  return jnp.pad(x, tuple((0, w) for w in widths)) if any(widths) else x


def prepare(plan: TritonPlan, h_NxD, w_DxV, dtype=None):
  """``h`` and ``W`` in ``dtype`` (default the plan's dot dtype), zero-padded to the plan's whole blocks."""
  dtype = jnp.dtype(plan.dot_dtype if dtype is None else dtype)
  h = _pad(h_NxD.astype(dtype), plan.n_pad - plan.n, plan.d_pad - plan.d)
  w = _pad(w_DxV.astype(dtype), plan.d_pad - plan.d, plan.v_pad - plan.v)
  return h, w


_OFFSET = pl.BlockSpec((1,), lambda *_: (0,))


def _partials(plan: TritonPlan, h_NxD, w_DxV, targets_N, weights_N, offset):
  """``(m, s, target)``, each ``[splits, N]``: per vocabulary split, the running max, the sum of exp(logit - m)
  and the target logit (0 where the target is not among the split's columns) over this shard's columns, global
  ids from ``offset``. Rows in blocks of weight 0 get zeros."""
  h, w = prepare(plan, h_NxD, w_DxV)
  t, wt = (_pad(x, plan.n_pad - plan.n) for x in (targets_N, weights_N))
  bn, splits = plan.block_n, plan.num_splits
  row = pl.BlockSpec((bn,), lambda i, s: (i,))
  partial = pl.BlockSpec((None, bn), lambda i, s: (s, i))
  shape = jax.ShapeDtypeStruct((splits, plan.n_pad), jnp.float32)
  m, s, target = pl.pallas_call(
      functools.partial(_forward_kernel, tiles_per_split=plan.tiles_per_split, num_tiles=plan.num_tiles,
                        **plan.kernel_args()),
      grid=(plan.n_pad // bn, splits),
      in_specs=[_OFFSET, pl.BlockSpec((bn, plan.d_pad), lambda i, s: (i, 0)),
                pl.BlockSpec((plan.d_pad, plan.v_pad), lambda i, s: (0, 0)), row, row],
      out_specs=(partial, partial, partial), out_shape=(shape, shape, shape),
      interpret=plan.interpret, compiler_params=plan.params(), cost_estimate=plan.cost(plan.n_pad, forward=True),
  )(jnp.reshape(offset, (1,)).astype(jnp.int32), h, w, t, wt)
  return m[:, :plan.n], s[:, :plan.n], target[:, :plan.n]


def _dlogits_kernel(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, out_ref, *, tile_v, v, chunk_d, num_chunks,
                    num_classes, exclude, precision):
  """``coef * (softmax - onehot(target))`` of one block of rows and one vocabulary tile, in the dot dtype."""
  j = pl.program_id(1)
  coef = coef_ref[...]

  @pl.when(jnp.max(jnp.abs(coef)) > 0)
  def _():
    logits = _logits(h_ref, w_ref, j, tile_v=tile_v, chunk_d=chunk_d, num_chunks=num_chunks, precision=precision)
    valid, cols = _columns(logits.shape, j, tile_v, v, off_ref[0], num_classes, exclude)
    p = jnp.where(valid, jnp.exp(logits - lse_ref[...][:, None]), 0.0)
    onehot = (cols == t_ref[...][:, None]).astype(jnp.float32)
    # A row of weight 0 inside a live block contributes exactly 0, even where its hidden state is not finite.
    out_ref[...] = jnp.where(coef[:, None] != 0, coef[:, None] * (p - onehot), 0.0).astype(out_ref.dtype)

  @pl.when(jnp.max(jnp.abs(coef)) == 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _backward(plan: TritonPlan, h_NxD, w_DxV, targets_N, lse_N, coef_N, offset):
  """``(dh_NxD, dW_DxV)`` in float32 of ``sum(coef_N * ce_N)`` over this shard's columns (``lse_N`` over all)."""
  h, w = prepare(plan, h_NxD, w_DxV)
  pad = plan.n_pad - plan.n
  t, lse, coef = _pad(targets_N, pad), _pad(lse_N, pad), _pad(coef_N, pad)
  rows, bn, tile_v = plan.rows_per_chunk, plan.block_n, plan.tile
  precision = precision_of(plan.dot_dtype)
  row = pl.BlockSpec((bn,), lambda i, j: (i,))
  kernel = pl.pallas_call(
      functools.partial(_dlogits_kernel, **plan.kernel_args()), grid=(rows // bn, plan.v_pad // tile_v),
      in_specs=[_OFFSET, pl.BlockSpec((bn, plan.d_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((plan.d_pad, plan.v_pad), lambda i, j: (0, 0)), row, row, row],
      out_specs=pl.BlockSpec((bn, tile_v), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((rows, plan.v_pad), h.dtype), interpret=plan.interpret,
      compiler_params=plan.params(), cost_estimate=plan.cost(rows, forward=False))
  offset = jnp.reshape(offset, (1,)).astype(jnp.int32)

  def chunk(dw_DxV, inputs):
    h_RxD, t_R, lse_R, coef_R = inputs

    def live(dw_DxV):
      dl_RxV = kernel(offset, h_RxD, w, t_R, lse_R, coef_R)
      dh_RxD = jax.lax.dot_general(dl_RxV, w, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)
      h_live = jnp.where(coef_R[:, None] != 0, h_RxD, 0)  # rows of weight 0 add nothing, even non-finite ones
      return dw_DxV + jax.lax.dot_general(h_live, dl_RxV, (((0,), (0,)), ((), ())), precision=precision,
                                          preferred_element_type=jnp.float32), dh_RxD

    return jax.lax.cond(jnp.any(coef_R != 0), live, lambda dw: (dw, jnp.zeros(h_RxD.shape, jnp.float32)), dw_DxV)

  num = plan.n_pad // rows
  chunks = (h.reshape(num, rows, plan.d_pad), t.reshape(num, rows), lse.reshape(num, rows), coef.reshape(num, rows))
  dw, dh = jax.lax.scan(chunk, jnp.zeros((plan.d_pad, plan.v_pad), jnp.float32), chunks)
  return dh.reshape(plan.n_pad, plan.d_pad)[:plan.n, :plan.d], dw[:plan.d, :plan.v]
