"""Sampler throughput against the network's own cost, and against autoregressive KV-cache decoding.

    python benchmarks/sampling.py [--batch 4] [--quick] [--lengths 128,512,1024] [--steps 16,64,256]
                                  [--bd3-length 1024] [--bd3-blocks 4,16]

A random (untrained) stdlib_tiny-shaped model (4 layers, d=256, absorbing process): speed does not depend on
the weights. Prints tokens/s for lengths 128 / 512 / 1024 with 16 / 64 / 256 steps beside AR decoding of the
same lengths and width; the sampler's overhead as the time of a K-step sample over K bare forward passes
(target <= 1.10); and the speedup of skipping the network on unchanged steps when steps >= length (a model
without time conditioning, where skipping is exact). Block diffusion (BD3-LM) at --bd3-length (1024): tokens/s
of the block sampler with its exact KV cache and without it (every step recomputing the whole prefix in one
2L pass), L' steps per block (one token a step on average), beside AR decoding of the same length (target:
cache >= 3x).
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from d3pm_jax import sampling
from d3pm_jax.models import block_decoding
from d3pm_jax.models.transformer import ModelConfig, Transformer
from d3pm_jax.processes import make_process
from d3pm_jax.training.metrics import median_seconds

import harness  # the sibling helper (this directory is the script's path)


def model_and_params(time_conditioning: bool, causal: bool = False, max_len: int = 1024):
  cfg = ModelConfig(vocab_size=257, max_len=max_len, num_layers=4, d_model=256, num_heads=4, mlp_dim=640,
                    time_conditioning=time_conditioning, causal=causal)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1,)))["params"])
  return model, params


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--quick", action="store_true", help="one repetition (and lengths 128 and 512 by default)")
  parser.add_argument("--lengths", default="", help="comma-separated sequence lengths (default 128,512,1024)")
  parser.add_argument("--steps", default="16,64,256", help="comma-separated reverse-step counts")
  parser.add_argument("--bd3-length", type=int, default=0, help="block diffusion's length (default 1024; 128 "
                                                                 "with --quick)")
  parser.add_argument("--bd3-blocks", default="4,16", help="comma-separated block sizes")
  args = parser.parse_args()
  batch, reps = args.batch, (1 if args.quick else 3)
  lengths = tuple(int(n) for n in (args.lengths or ("128,512" if args.quick else "128,512,1024")).split(","))
  step_counts = tuple(int(n) for n in args.steps.split(","))
  process = make_process("absorbing", 257, "cosine")
  model, params = model_and_params(time_conditioning=True)
  ar_model, ar_params = model_and_params(time_conditioning=False, causal=True)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {batch}; 4 layers, d=256, 4 heads")
  print(f"{'length':>6s} {'steps':>5s} {'diffusion tok/s':>15s} {'AR KV-cache tok/s':>17s} {'overhead':>9s}")
  for length in lengths:
    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))
    x = jnp.zeros((batch, length), jnp.int32)
    t = jnp.full((batch,), 0.5)
    one_forward = median_seconds(forward, (params, x, t), reps)
    ar = jax.jit(lambda p, k: sampling.autoregressive_sample(ar_model, p, k, batch, length, 256))
    ar_tok_s = batch * length / median_seconds(ar, (ar_params, jax.random.PRNGKey(0)), reps)
    for steps in step_counts:
      cfg = sampling.SamplerConfig(num_steps=steps)
      run = jax.jit(lambda p, k: sampling.sample(process, lambda xt, tb: model.apply({"params": p}, xt, tb), k,
                                                 batch, length, cfg)[0])
      seconds = median_seconds(run, (params, jax.random.PRNGKey(1)), reps)
      print(f"{length:6d} {steps:5d} {batch * length / seconds:15.1f} {ar_tok_s:17.1f} "
            f"{seconds / (steps * one_forward):9.3f}")
  # Skipping unchanged steps: 4 x more steps than positions, so most steps change nothing.
  length = min(lengths)
  steps = 4 * length
  untimed_model, untimed_params = model_and_params(time_conditioning=False)
  results = {}
  for skip in (False, True):
    cfg = sampling.SamplerConfig(num_steps=steps, skip_unchanged=skip)
    run = jax.jit(lambda p, k: sampling.sample(
        process, lambda xt, tb: untimed_model.apply({"params": p}, xt), k, batch, length, cfg,
        time_conditioned=False)[0])
    results[skip] = median_seconds(run, (untimed_params, jax.random.PRNGKey(2)), reps)
  print(f"skip unchanged steps (length {length}, {steps} steps, no time conditioning): "
        f"{results[False]:.2f} s -> {results[True]:.2f} s, speedup {results[False] / results[True]:.2f}x")
  print("target: overhead <= 1.10")
  bd3_length = args.bd3_length or (128 if args.quick else 1024)
  block_diffusion(process, batch, bd3_length, [int(b) for b in args.bd3_blocks.split(",")], reps)


def block_diffusion(process, batch: int, length: int, block_sizes, reps: int):
  """Tokens/s of the block sampler with and without its KV cache, and of AR decoding, at ``length``."""
  model, params = model_and_params(time_conditioning=False, max_len=length)
  ar_model, ar_params = model_and_params(time_conditioning=False, causal=True, max_len=length)
  ar = jax.jit(lambda p, k: sampling.autoregressive_sample(ar_model, p, k, batch, length, 256))
  ar_tok_s = batch * length / median_seconds(ar, (ar_params, jax.random.PRNGKey(0)), reps)
  print(f"block diffusion at length {length} (L' steps per block): AR KV-cache decoding {ar_tok_s:.1f} tok/s")
  print(f"{'L_prime':>7s} {'cached tok/s':>12s} {'uncached tok/s':>14s} {'cache speedup':>13s} {'vs AR':>6s}")
  for block_size in block_sizes:
    cfg = sampling.SamplerConfig(num_steps=block_size)
    speeds = {}
    for cached in (True, False):
      if cached:
        fns = block_decoding.cached(model, params, batch, block_size,
                                    block_decoding.window_for(model, length, block_size))
      else:
        fns = block_decoding.uncached(model, params, batch, length, block_size, process.mask_id)
      run = jax.jit(lambda k, fns=fns: sampling.block_sample(process, *fns, k, batch, length, block_size, cfg))
      key = jax.random.PRNGKey(3)
      if cached:
        seconds = median_seconds(run, (key,), reps)
      else:  # L / L' x L' passes over 2L positions: compiled ahead, then one timed run (minutes at L = 1024)
        compiled = run.lower(key).compile()
        start = time.perf_counter()
        jax.block_until_ready(compiled(key))
        seconds = time.perf_counter() - start
      speeds[cached] = batch * length / seconds
    print(f"{block_size:7d} {speeds[True]:12.1f} {speeds[False]:14.1f} {speeds[True] / speeds[False]:12.2f}x "
          f"{speeds[True] / ar_tok_s:5.2f}x")
  print("target: cache speedup >= 3x at length 1024")


if __name__ == "__main__":
  main()
