"""Each kernel of ``pallas_kernels/`` and its pure-JAX twin against XLA's plain computation: median time,
achieved FLOP/s (the useful matmul FLOPs of the operation, not counting a kernel's recomputation) and bytes/s (the
operands and results that must cross memory at least once), and the float32 matmul peak measured in this process.

    python benchmarks/kernels.py [--reps 10]

On a CPU the Pallas kernels only run interpreted (which times Python, not a kernel), so the rows are XLA and the
jnp twins; on a GPU the Triton-style Pallas kernels (and cuDNN's attention) are timed too, on a TPU the Mosaic
ones and splash attention.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from d3pm_jax.models.transformer import attention, segment_mask  # noqa: E402
from d3pm_jax.training.metrics import median_seconds  # noqa: E402
from pallas_kernels import attention as attention_kernels, fused_ce, fused_sample  # noqa: E402
import harness  # noqa: E402  (the sibling helper: this directory is the script's path)


def row(name: str, seconds: float, flops: float, nbytes: float, peak: float) -> str:
  return (f"{name:<44s} {1e3 * seconds:9.2f} ms {flops / seconds / 1e9:9.1f} GFLOP/s ({flops / seconds / 1e9 / peak:6.1%}"
          f" of peak) {nbytes / seconds / 1e9:7.2f} GB/s")


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--tokens", type=int, default=2048, help="N: rows of the output-head kernels")
  parser.add_argument("--width", type=int, default=256, help="D: model width of the output-head kernels")
  parser.add_argument("--vocab", type=int, default=8192, help="V: classes of the output-head kernels")
  parser.add_argument("--attention", default="4,512,4,64", help="B,L,H,K of the attention kernels")
  args = parser.parse_args()
  gpu, tpu = jax.default_backend() == "gpu", jax.default_backend() == "tpu"
  peak = harness.stated_peak()

  n, d, v = args.tokens, args.width, args.vocab
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v - 1, n), jnp.int32)
  weights = jnp.asarray(rng.random(n) * (rng.random(n) < 0.5), jnp.float32)  # about half the rows masked
  print(f"\noutput head + weighted cross-entropy, loss and gradients (h, W): N = {n}, D = {d}, V = {v}")
  heads = {"xla (naive [N, V] logits)": fused_ce.weighted_ce_reference,
           "tiled twin (lax.scan, tiles of 2048)": functools.partial(fused_ce.weighted_ce_tiled, tile_v=2048)}
  if gpu:
    heads["pallas kernels"] = fused_ce.weighted_ce_pallas
  if tpu:
    heads["pallas kernels (Mosaic)"] = fused_ce.weighted_ce_pallas_tpu
  flops, nbytes = 6.0 * n * d * v, 4.0 * 2 * (n * d + d * v)  # forward + two gradient matmuls; read h, W, write both
  for name, fn in heads.items():
    step = jax.jit(jax.value_and_grad(lambda h, w, fn=fn: fn(h, w, targets, weights, num_classes=v,
                                                               exclude=v - 1).sum(), argnums=(0, 1)))
    print(row(name, median_seconds(step, (h, w), args.reps), flops, nbytes, peak))

  print(f"\noutput head + Gumbel-max sampling (ids and probabilities): N = {n}, D = {d}, V = {v}")
  samplers = {"xla (naive [N, V] logits)": fused_sample.sample_reference,
              "tiled twin (lax.scan, tiles of 2048)": functools.partial(fused_sample.sample_tiled, tile_v=2048)}
  if gpu:
    samplers["pallas kernel"] = fused_sample.sample_pallas
  if tpu:
    samplers["pallas kernel (Mosaic)"] = fused_sample.sample_pallas_tpu
  for name, fn in samplers.items():
    draw = jax.jit(lambda h, w, fn=fn: fn(h, w, 7, num_classes=v, exclude=v - 1, temperature=0.9))
    print(row(name, median_seconds(draw, (h, w), args.reps), 2.0 * n * d * v, 4.0 * (n * d + d * v), peak))

  b, length, heads_, k = (int(x) for x in args.attention.split(","))
  q, kk, vv = (jnp.asarray(rng.normal(size=(b, length, heads_, k)), jnp.float32) for _ in range(3))
  segments = jnp.asarray(np.repeat(np.arange(length) // (length // 4) + 1, b).reshape(length, b).T, jnp.int32)
  print(f"\nbidirectional attention with segment ids, forward and backward: B = {b}, L = {length}, H = {heads_}, "
        f"K = {k}")
  attends = {"xla (the model's own)": lambda q, k, v, s, c: attention(q, k, v, c, segment_mask(s))}
  if gpu:
    attends["cudnn"] = attention_kernels.cudnn_attention
    attends["pallas flash attention"] = attention_kernels.flash_attention
  if tpu:
    attends["splash"] = attention_kernels.splash_attention
  # Five [L, L] x K matmuls (2 forward, 3 backward beyond the recomputed scores) at 2 FLOPs per multiply-add.
  flops, nbytes = 2.0 * 5 * b * heads_ * length * length * k, 4.0 * 8 * b * length * heads_ * k
  for name, fn in attends.items():
    step = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v, segments, False).sum(), argnums=(0, 1, 2)))
    print(row(name, median_seconds(step, (q, kk, vv), args.reps), flops, nbytes, peak))


if __name__ == "__main__":
  main()
