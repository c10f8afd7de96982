"""Bidirectional (or causal) softmax attention with segment ids, by implementation (``model.attention_impl``):

  ``xla``     the model's own matmul attention (``d3pm_jax.models.transformer.attention``), every backend.
  ``cudnn``   ``jax.nn.dot_product_attention(implementation='cudnn')``: cuDNN's fused attention on NVIDIA GPUs.
  ``splash``  splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) on TPUs.
  ``pallas``  this module's flash-attention kernels (Triton-style, one program per block of queries, an online
              softmax over key blocks; a ``custom_vjp`` whose backward recomputes the probabilities) for GPUs.

All take ``q, k, v`` as ``[B, L, H, K]`` (rotary positions already applied), scale the scores by ``1/sqrt(K)`` and
take ``segments_BxL``: query i attends to key j only when both carry the same non-zero segment id (documents
packed in a row; 0 is padding). A query that sees no key (padding) gets zeros, so its output and its gradients
are exactly 0. ``attention_reference`` is the naive definition they are all tested against.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import NEG, precision_of, target_platform, vmapped

IMPLS = ("xla", "cudnn", "splash", "pallas")
PLATFORMS = {"cpu": ("xla",), "gpu": ("xla", "cudnn", "pallas"), "tpu": ("xla", "splash")}


def block_diffusion_rule(q_clean, k_clean, q_block, k_block):
  """Block diffusion's rule for broadcast boolean (``*_clean``: the position is in the x_0 half) and block-number
  arrays, numpy or jax: x_t sees x_t of its own block and x_0 of earlier blocks, x_0 sees x_0 up to its block."""
  return ((~q_clean & ~k_clean & (k_block == q_block)) | (~q_clean & k_clean & (k_block < q_block))
          | (q_clean & k_clean & (k_block <= q_block)))


def visible(segments_BxL, length: int, batch: int, causal: bool, blocks_BxL=None):
  """``[B, L, L]`` bool: which keys each query sees (the segment rule, and j <= i when ``causal``).

  ``blocks_BxL`` (block diffusion, BD3-LM) makes the row x_t followed by x_0, L = 2N, and gives each position's
  block number (the same numbers in both halves). Besides the segment rule, an x_t query of block b sees the x_t
  keys of block b and the x_0 keys of blocks < b; an x_0 query of block b sees the x_0 keys of blocks <= b; no x_0
  query sees x_t."""
  seg = jnp.ones((batch, length), jnp.int32) if segments_BxL is None else segments_BxL
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  if causal and blocks_BxL is not None:
    raise ValueError("the block-diffusion mask replaces the causal one: pass causal=False with blocks_BxL")
  if causal:
    mask &= jnp.tril(jnp.ones((length, length), bool))[None]
  if blocks_BxL is not None:
    if length % 2:
      raise ValueError(f"a block-diffusion row is x_t followed by x_0: its length must be even; got {length}")
    clean = jnp.arange(length) >= length // 2
    mask &= block_diffusion_rule(clean[None, :, None], clean[None, None, :], blocks_BxL[:, :, None],
                                 blocks_BxL[:, None, :])
  return mask


def attention_reference(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL=None, causal: bool = False, blocks_BxL=None):
  """The definition, in float32 from the full ``[B, H, L, L]`` scores: softmax over the visible keys
  (``visible``), zeros for a query that sees none."""
  batch, length, _, width = q_BxLxHxK.shape
  q, k, v = (x.astype(jnp.float32) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(width)
  mask = visible(segments_BxL, length, batch, causal, blocks_BxL)[:, None]
  scores = jnp.where(mask, scores, NEG)  # before exp: no inf (and no NaN gradient) where a row sees nothing
  weights = jnp.where(mask, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhqs,bshk->bqhk", weights / jnp.where(total > 0, total, 1.0), v)
  return out.astype(v_BxLxHxK.dtype)


# ---------------------------------------------------------------- Pallas flash attention (Triton-style)

@dataclasses.dataclass(frozen=True)
class _Plan:
  length: int
  width: int
  block_q: int
  block_k: int
  causal: bool
  interpret: bool
  half: int = 0          # block diffusion: x_t is rows [0, half), x_0 rows [half, 2 half); 0 otherwise
  block_size: int = 0    # block diffusion: the most tokens a block holds (it bounds which key blocks are visited)

  @property
  def padded_length(self):
    step = max(self.block_q, self.block_k)
    return -(-self.length // step) * step

  @property
  def padded_width(self):
    return max(16, pl.next_power_of_2(self.width))

  def params(self):
    # Heads of width 128: the backward's two [block, 128] float32 accumulators spill on 4 warps, not on 8.
    return pltriton.CompilerParams(num_warps=8 if self.padded_width >= 128 else 4, num_stages=2)


def _dot(a, b, contract, precision):
  """``a @ b`` contracting axis ``contract[0]`` of a with ``contract[1]`` of b, b cast to a's dtype."""
  return jax.lax.dot_general(a, b.astype(a.dtype), ((contract[:1], contract[1:]), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def _ceil_div(a, b):
  return (a + b - 1) // b


def _key_ranges(i, plan: _Plan, xp=jnp):
  """The key blocks query block ``i`` visits, as ranges ``(lo, hi)`` of key-block indices (two for block
  diffusion, the second starting where the first ends): all; (causal) those up to its diagonal; (block diffusion)
  for its x_t rows, the x_t keys within a block's reach and the x_0 keys before them, and for its x_0 rows the x_0
  keys up to a block past them. The mask decides visibility inside the visited blocks; the ranges only skip blocks
  that hold no visible key. ``xp`` is ``jnp`` in a kernel, ``np`` to count the visits of a static block index."""
  num_k = plan.padded_length // plan.block_k
  r0, r1 = i * plan.block_q, (i + 1) * plan.block_q
  if plan.half:
    half, reach, bk = plan.half, plan.block_size - 1, plan.block_k
    noisy_end = xp.minimum(r1, half)                     # x_t rows [r0, noisy_end), if r0 < half
    a_lo = xp.where(r0 < half, xp.maximum(r0 - reach, 0) // bk, 0)
    a_hi = xp.where(r0 < half, _ceil_div(xp.minimum(noisy_end + reach, half), bk), 0)
    # x_0 keys: an x_t row sees those of earlier positions; an x_0 row those up to the end of its block.
    b_end = xp.maximum(xp.where(r0 < half, half + noisy_end - 1, 0),
                       xp.where(r1 > half, xp.minimum(r1 + reach, 2 * half), 0))
    b_lo = xp.maximum(half // bk, a_hi)
    return (a_lo, a_hi), (b_lo, xp.maximum(b_lo, xp.minimum(_ceil_div(b_end, bk), num_k)))
  if plan.causal:
    return ((0, xp.minimum(num_k, _ceil_div(r1, plan.block_k))),)
  return ((0, num_k),)


def _query_ranges(j, plan: _Plan, xp=jnp):
  """The query blocks that see a key of key block ``j``, as ranges (``_key_ranges`` turned around)."""
  num_q = plan.padded_length // plan.block_q
  c0, c1 = j * plan.block_k, (j + 1) * plan.block_k
  if plan.half:
    half, reach, bq = plan.half, plan.block_size - 1, plan.block_q
    clean_first = xp.maximum(c0, half) - half            # first x_0 key's position, if c1 > half
    # x_t rows: within a block's reach of the x_t keys, and after the first x_0 key's position.
    a_lo = xp.minimum(xp.where(c0 < half, xp.maximum(c0 - reach, 0), half),
                      xp.where(c1 > half, clean_first + 1, half)) // bq
    a_hi = xp.where(c1 > half, _ceil_div(half, bq), _ceil_div(xp.minimum(c1 + reach, half), bq))
    # x_0 rows: from a block before the first x_0 key's position on.
    b_lo = xp.maximum(xp.maximum(half + clean_first - reach, half) // bq, a_hi)
    return (a_lo, a_hi), (b_lo, xp.where(c1 > half, num_q, b_lo))
  if plan.causal:  # query blocks above this key block's diagonal see none of its keys
    return ((c0 // plan.block_q, num_q),)
  return ((0, num_q),)


def _visit(ranges, body, carry):
  """``body(index, carry)`` over each range of block indices (disjoint, in order)."""
  for lo, hi in ranges:
    carry = jax.lax.fori_loop(lo, hi, body, carry)
  return carry


def _scores(q, k, seg_q, seg_k, blk_q, blk_k, rows, cols, scale, plan: _Plan):
  """Scaled scores of a query block against a key block, and which of them are visible (``visible``'s rules)."""
  s = _dot(q, k, (1, 1), precision_of(q.dtype)) * scale
  valid = (seg_q[:, None] == seg_k[None, :]) & (seg_k[None, :] > 0)
  if plan.causal:
    valid &= cols[None, :] <= rows[:, None]
  if plan.half:
    valid &= block_diffusion_rule(rows[:, None] >= plan.half, cols[None, :] >= plan.half, blk_q[:, None],
                                  blk_k[None, :])
  return jnp.where(valid, s, NEG), valid


def _fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, blkq_ref, blkk_ref, o_ref, lse_ref, *, plan, scale):
  i = pl.program_id(2)
  block_q, block_k = q_ref.shape[0], plan.block_k
  q = q_ref[...]
  precision = precision_of(q.dtype)
  seg_q, blk_q = segq_ref[...], blkq_ref[...]
  rows = i * block_q + jnp.arange(block_q)

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    cols = j * block_k + jnp.arange(block_k)
    s, valid = _scores(q, k, seg_q, segk_ref[keys], blk_q, blkk_ref[keys], rows, cols, scale, plan)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1)
    acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v, (1, 0), precision)
    return m_new, l, acc

  init = (jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = _visit(_key_ranges(i, plan), body, init)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -NEG)  # +1e30: exp(s - lse) = 0


def _probabilities(q, k, seg_q, seg_k, blk_q, blk_k, lse, rows, cols, scale, plan):
  s, valid = _scores(q, k, seg_q, seg_k, blk_q, blk_k, rows, cols, scale, plan)
  return jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, blkq_ref, blkk_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               plan, scale):
  i = pl.program_id(2)
  block_q, block_k = q_ref.shape[0], plan.block_k
  q, do = q_ref[...], do_ref[...].astype(q_ref.dtype)
  precision = precision_of(q.dtype)
  seg_q, blk_q, lse, delta = segq_ref[...], blkq_ref[...], lse_ref[...], delta_ref[...]
  rows = i * block_q + jnp.arange(block_q)

  def body(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    cols = j * block_k + jnp.arange(block_k)
    p = _probabilities(q, k, seg_q, segk_ref[keys], blk_q, blkk_ref[keys], lse, rows, cols, scale, plan)
    dp = _dot(do, v, (1, 1), precision)
    return dq + _dot((p * (dp - delta[:, None])).astype(k.dtype), k, (1, 0), precision)

  dq = _visit(_key_ranges(i, plan), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, blkq_ref, blkk_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, plan, scale):
  j = pl.program_id(2)
  block_q, block_k = plan.block_q, k_ref.shape[0]
  k, v = k_ref[...], v_ref[...]
  precision = precision_of(k.dtype)
  seg_k, blk_k = segk_ref[...], blkk_ref[...]
  cols = j * block_k + jnp.arange(block_k)

  def body(i, carry):
    dk, dv = carry
    queries = pl.ds(i * block_q, block_q)
    q = q_ref[queries, :]
    do = do_ref[queries, :].astype(k.dtype)
    lse, delta = lse_ref[queries], delta_ref[queries]
    rows = i * block_q + jnp.arange(block_q)
    p = _probabilities(q, k, segq_ref[queries], seg_k, blkq_ref[queries], blk_k, lse, rows, cols, scale, plan)
    dv = dv + _dot(p.astype(do.dtype), do, (0, 0), precision)
    dp = _dot(do, v, (1, 1), precision)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), precision)
    return dk, dv

  dk, dv = _visit(_query_ranges(j, plan), body, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _to_heads(x_BxLxHxK, plan: _Plan):
  """``[B, H, L_pad, K_pad]``, zero-padded (zero key and query columns leave the scores unchanged)."""
  x = jnp.swapaxes(x_BxLxHxK, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, plan.padded_length - plan.length), (0, plan.padded_width - plan.width)))


def _from_heads(x_BxHxLxK, plan: _Plan):
  return jnp.swapaxes(x_BxHxLxK[:, :, :plan.length, :plan.width], 1, 2)


def _specs(plan: _Plan, by_query: bool):
  """Block specs over the grid (B, H, blocks): the blocked operand's rows, the others whole."""
  lp, kp = plan.padded_length, plan.padded_width
  block = plan.block_q if by_query else plan.block_k
  rows = pl.BlockSpec((None, None, block, kp), lambda b, h, i: (b, h, i, 0))
  whole = pl.BlockSpec((None, None, lp, kp), lambda b, h, i: (b, h, 0, 0))
  seg_rows = pl.BlockSpec((None, block), lambda b, h, i: (b, i))
  seg_whole = pl.BlockSpec((None, lp), lambda b, h, i: (b, 0))
  vec_rows = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
  vec_whole = pl.BlockSpec((None, None, lp), lambda b, h, i: (b, h, 0))
  return rows, whole, seg_rows, seg_whole, vec_rows, vec_whole


# Per kernel: [block_q, block_k] x width products per visited block pair; the width-K arrays and the row vectors
# (int32 ids, float32 statistics) of a program's own block, then of the other side's block read at each visit.
_WORK = {"forward": (2, 2, 3, 2, 2),  # scores, output; q o, segments blocks lse; k v, segments blocks
         "dq": (3, 3, 4, 2, 2),       # scores, dp, dq; q do dq, segments blocks lse delta; k v, segments blocks
         "dkv": (4, 4, 2, 2, 4)}      # scores, dv, dp, dk; k v dk dv, segments blocks; q do, segments blocks lse delta


def _cost(plan: _Plan, kernel: str, batch: int, heads: int, itemsize: int) -> pl.CostEstimate:
  """What the ``forward``, ``dq`` or ``dkv`` kernel does over ``batch`` x ``heads`` when every query is live: its
  products (``_WORK``) over the padded width for each pair of query and key blocks it visits (``_key_ranges``;
  ``_query_ranges`` for dk/dv), an exp per score, with the forward's rescale per row and visit and its log per
  row; the bytes moved: each program's own block once, the other side's block at every visit."""
  products, own_arrays, own_vectors, other_arrays, other_vectors = _WORK[kernel]
  bq, bk, kp = plan.block_q, plan.block_k, plan.padded_width
  own, other, ranges = (bk, bq, _query_ranges) if kernel == "dkv" else (bq, bk, _key_ranges)
  count = plan.padded_length // own
  visits = batch * heads * sum(max(0, int(hi) - int(lo)) for b in range(count) for lo, hi in ranges(b, plan, np))
  programs = batch * heads * count
  exps = visits * bq * bk + (visits * bq + programs * bq if kernel == "forward" else 0)
  moved = (programs * own * (own_arrays * kp * itemsize + own_vectors * 4)
           + visits * other * (other_arrays * kp * itemsize + other_vectors * 4))
  return pl.CostEstimate(flops=2 * products * visits * bq * bk * kp, transcendentals=exps, bytes_accessed=moved)


def _flash_forward(plan: _Plan, q, k, v, seg, blk):
  batch, heads = q.shape[:2]
  lp = plan.padded_length
  rows, whole, seg_rows, seg_whole, vec_rows, _ = _specs(plan, by_query=True)
  kernel = functools.partial(_fwd_kernel, plan=plan, scale=1.0 / math.sqrt(plan.width))
  return pl.pallas_call(
      kernel, grid=(batch, heads, lp // plan.block_q),
      in_specs=[rows, whole, whole, seg_rows, seg_whole, seg_rows, seg_whole], out_specs=(rows, vec_rows),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, lp), jnp.float32)),
      interpret=plan.interpret, compiler_params=plan.params(),
      cost_estimate=_cost(plan, "forward", batch, heads, q.dtype.itemsize))(q, k, v, seg, seg, blk, blk)


def _flash_backward(plan: _Plan, q, k, v, seg, blk, out, lse, do):
  batch, heads = q.shape[:2]
  lp = plan.padded_length
  scale = 1.0 / math.sqrt(plan.width)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, H, L]: rowsum(dO * O)
  rows, whole, seg_rows, seg_whole, vec_rows, vec_whole = _specs(plan, by_query=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, scale=scale),
      grid=(batch, heads, lp // plan.block_q),
      in_specs=[rows, whole, whole, seg_rows, seg_whole, seg_rows, seg_whole, rows, vec_rows, vec_rows],
      out_specs=rows, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=plan.interpret,
      compiler_params=plan.params(), cost_estimate=_cost(plan, "dq", batch, heads, q.dtype.itemsize),
  )(q, k, v, seg, seg, blk, blk, do, lse, delta)
  rows, whole, seg_rows, seg_whole, vec_rows, vec_whole = _specs(plan, by_query=False)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, plan=plan, scale=scale),
      grid=(batch, heads, lp // plan.block_k),
      in_specs=[whole, rows, rows, seg_whole, seg_rows, seg_whole, seg_rows, whole, vec_whole, vec_whole],
      out_specs=(rows, rows),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      interpret=plan.interpret, compiler_params=plan.params(),
      cost_estimate=_cost(plan, "dkv", batch, heads, k.dtype.itemsize),
  )(q, k, v, seg, seg, blk, blk, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, seg, blk):
  return _flash_forward(plan, q, k, v, seg, blk)[0]


def _flash_fwd(plan, q, k, v, seg, blk):
  out, lse = _flash_forward(plan, q, k, v, seg, blk)
  return out, (q, k, v, seg, blk, out, lse)


def _flash_bwd(plan, residuals, do):
  q, k, v, seg, blk, out, lse = residuals
  dq, dk, dv = _flash_backward(plan, q, k, v, seg, blk, out, lse, do)
  return dq, dk, dv, np.zeros(seg.shape, jax.dtypes.float0), np.zeros(blk.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def per_shard(attend, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL, blocks_BxL=None):
  """``attend(q, k, v, segments)`` (``attend(q, k, v, segments, blocks)`` with block-diffusion ``blocks_BxL``) on
  one device, or per shard of the mesh in scope (``jax.shard_map``): the batch over (data, fsdp), the heads over
  tensor. A kernel is a custom call XLA cannot partition: without this it would gather q, k and v and run whole
  on every device. Under ``common.vmapped_axes`` the batch is one replica's rows of a vmap laid over those axes:
  they are left to the vmap (whose batching adds them to the specs), and the shard_map stays even with no axes of
  its own, for the same reason."""
  batch, length, heads, _ = q_BxLxHxK.shape
  if segments_BxL is None:
    segments_BxL = jnp.ones((batch, length), jnp.int32)
  rows_in = (segments_BxL,) if blocks_BxL is None else (segments_BxL, blocks_BxL)
  mesh = jax.sharding.get_abstract_mesh()
  shape = {} if mesh.empty else dict(mesh.shape)
  taken = vmapped()
  rows = tuple(a for a in ("data", "fsdp") if shape.get(a, 1) > 1 and a not in taken)
  head_axis = "tensor" if shape.get("tensor", 1) > 1 else None
  if not rows and head_axis is None and not any(shape.get(a, 1) > 1 for a in taken):
    return attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *rows_in)
  row_size = math.prod(shape[a] for a in rows)
  if batch % row_size or (head_axis and heads % shape[head_axis]):
    raise ValueError(f"attention with batch {batch} and {heads} heads does not divide over the mesh "
                     f"{shape} (batch over {rows}, heads over 'tensor'); change the batch or model.num_heads")
  spec = P(rows or None, None, head_axis, None)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec) + (P(rows or None, None),) * len(rows_in),
                       out_specs=spec, check_vma=False)(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, *rows_in)


def _check_block_diffusion(length: int, blocks_BxL, block_size: int, causal: bool):
  """A block-diffusion call (``blocks_BxL`` given) needs an x_t-then-x_0 row (even length), a positive
  ``block_size`` (the most tokens a block holds) and no causal mask."""
  if blocks_BxL is None:
    return
  if causal:
    raise ValueError("the block-diffusion mask replaces the causal one: pass causal=False with blocks_BxL")
  if length % 2 or block_size < 1:
    raise ValueError(f"a block-diffusion row is x_t then x_0 (an even length; got {length}) in blocks of at most "
                     f"block_size tokens (got {block_size}); pass both")


def flash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL=None, causal: bool = False, *,
                    blocks_BxL=None, block_size: int = 0, block_q: int = 64, block_k: int = 64,
                    interpret: bool = False):
  """This project's Pallas flash attention; ``block_q`` and ``block_k`` are powers of two (Triton), the length
  padded to whole blocks (as padding) and the head width to a power of two (with zeros). Per shard under a
  mesh. With ``blocks_BxL`` and ``block_size``, the block-diffusion mask (``visible``), visiting only the key
  blocks it can reach: about a quarter of the full 2L x 2L scores when the blocks are short."""
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two (Triton's blocks are); got {value}")
  _check_block_diffusion(q_BxLxHxK.shape[1], blocks_BxL, block_size, causal)
  local = functools.partial(_flash_attention, causal=causal, block_q=block_q, block_k=block_k, interpret=interpret,
                            block_size=block_size)
  return per_shard(local, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL, blocks_BxL)


def _flash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL, blocks_BxL=None, *, causal, block_q, block_k,
                     interpret, block_size):
  batch, length, _, width = q_BxLxHxK.shape
  diffusion = blocks_BxL is not None
  plan = _Plan(length=length, width=width, block_q=block_q, block_k=block_k, causal=causal, interpret=interpret,
               half=length // 2 if diffusion else 0, block_size=block_size if diffusion else 0)
  pad = ((0, 0), (0, plan.padded_length - length))
  seg = jnp.pad(segments_BxL.astype(jnp.int32), pad)
  blk = jnp.pad(blocks_BxL.astype(jnp.int32), pad) if diffusion else jnp.zeros_like(seg)
  out = _flash(plan, *(_to_heads(x, plan) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)), seg, blk)
  return _from_heads(out, plan)


# ---------------------------------------------------------------- the kept kernels

def splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL=None, causal: bool = False, *,
                     blocks_BxL=None, block_size: int = 0, block: int = 128, interpret: bool = False):
  """Splash attention (TPU), one kernel per batch element; the length must be a multiple of ``block``, itself a
  multiple of 128 (the TPU's lanes). Per shard under a mesh. Block diffusion (``blocks_BxL``, ``block_size``)
  on a stream: the mask is static (splash's ``NumpyMask``, blocks of ``block_size`` from position 0), so that
  splash skips the blocks it rules out; packed rows, whose blocks restart at each document, are refused."""
  _check_block_diffusion(q_BxLxHxK.shape[1], blocks_BxL, block_size, causal)
  if blocks_BxL is not None and segments_BxL is not None:
    raise ValueError("splash attention's masks are static, and a packed row's blocks restart at each document: "
                     "for block diffusion on packed rows use model.attention_impl='pallas' or 'xla'")
  local = functools.partial(_splash_attention, causal=causal, block=block, interpret=interpret,
                            block_size=block_size if blocks_BxL is not None else 0)
  return per_shard(local, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL)


def stream_block_mask(length: int, block_size: int) -> np.ndarray:
  """``[2N, 2N]`` bool: ``visible``'s block-diffusion rule for one stream row of N = ``length / 2`` positions in
  blocks of ``block_size`` from position 0 (static, for masks that must be known when the kernel is built)."""
  half = length // 2
  block = np.tile(np.arange(half) // block_size, 2)
  clean = np.arange(length) >= half
  return block_diffusion_rule(clean[:, None], clean[None, :], block[:, None], block[None, :])


def _splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL, *, causal, block, interpret, block_size):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  batch, length, heads, width = q_BxLxHxK.shape
  if block % 128 or length % block:
    raise ValueError(f"splash attention needs the length ({length}) to be a multiple of its block ({block}); "
                     f"use model.attention_impl='xla' for this length")
  shape = (length, length)
  if block_size:
    head_mask = splash.NumpyMask(stream_block_mask(length, block_size))
  else:
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  mask = splash.MultiHeadMask([head_mask] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  seg = segments_BxL.astype(jnp.int32)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BxLxHxK / math.sqrt(width), k_BxLxHxK, v_BxLxHxK))
  # Splash pairs equal segment ids, padding with padding; a padded query (segment 0) then sees only padding keys,
  # and its output is zeroed here, as every implementation's is.
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)
  return jnp.where((seg > 0)[:, :, None, None], jnp.swapaxes(out, 1, 2), 0).astype(v_BxLxHxK.dtype)


def cudnn_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segments_BxL=None, causal: bool = False, *,
                    blocks_BxL=None, block_size: int = 0):
  """cuDNN's fused attention through ``jax.nn.dot_product_attention`` (NVIDIA GPUs). Segment ids and block
  diffusion's mask (``blocks_BxL``) reach it as a dense ``[B, 1, L, L]`` mask, which cuDNN applies as a bias:
  correct, with no skipping of masked blocks."""
  _check_block_diffusion(q_BxLxHxK.shape[1], blocks_BxL, block_size, causal)
  batch, length = q_BxLxHxK.shape[:2]
  dense = segments_BxL is not None or blocks_BxL is not None
  mask = visible(segments_BxL, length, batch, False, blocks_BxL)[:, None] if dense else None
  out = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask, is_causal=causal,
                                     implementation="cudnn")
  if segments_BxL is None:
    return out
  return jnp.where((segments_BxL > 0)[:, :, None, None], out, 0).astype(out.dtype)


def select(impl: str, *, interpret: bool = False):
  """``attend(q, k, v, segments_BxL, causal, blocks_BxL=None, block_size=0)`` of a kernel implementation (not
  ``xla``, which is the model's own), checked against the target platform (``common.target_platform``):
  ``interpret`` runs the Pallas ones (``pallas``, ``splash``) anywhere."""
  if impl not in IMPLS[1:]:
    raise ValueError(f"unknown attention kernel {impl!r}; valid: {list(IMPLS[1:])} ('xla' is the model's own)")
  backend = target_platform()
  runs_here = impl in PLATFORMS.get(backend, ("xla",)) or (interpret and impl in ("pallas", "splash"))
  if not runs_here:
    raise ValueError(f"model.attention_impl={impl!r} cannot run on this backend ({backend!r}), which supports "
                     f"{list(PLATFORMS.get(backend, ('xla',)))}" + (" (set model.kernel_interpret=True to interpret "
                                                                     "the Pallas kernels)" if impl != "cudnn" else ""))
  if impl == "pallas":
    return functools.partial(flash_attention, interpret=interpret)
  if impl == "splash":
    return functools.partial(splash_attention, interpret=interpret)
  return cudnn_attention
