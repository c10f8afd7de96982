"""Train-step throughput and MFU for the stdlib_tiny model, and for a 3.8M-parameter 4-layer d=256 4-head model,
on batches of 32 x 128 bytes (the masked-diffusion loss).

    python benchmarks/train_step.py [--steps 600]

MFU = analytic FLOPs (3x the forward matmuls, ``forward_flops_per_token``) / measured median step time / the
float32 matmul peak measured in this same process (so the ratio holds whatever the machine is doing).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from d3pm_jax.config import from_config, stdlib_tiny
from d3pm_jax.models.transformer import Transformer, count_params, forward_flops_per_token
from d3pm_jax.training import train
from d3pm_jax.training.state import build_process, init_state, make_optimizer

import harness  # the sibling helper (this directory is the script's path)


def bench(name: str, cfg, steps: int, peak: float) -> dict:
  exp = from_config(cfg, vocab_size=256)
  model = Transformer(exp.model)
  process = build_process(exp.process, exp.model)
  optimizer = make_optimizer(exp.train)
  # The train loop's own step: placed on the mesh, traced under its sharding rules, state donated.
  placement = train.make_placement(exp, model, optimizer)
  state = jax.jit(lambda: init_state(exp, model, optimizer), out_shardings=placement.state)()
  step, _ = train.compile_steps(exp, model, process, optimizer, placement)
  batch = train.global_batch(placement.batch, np.random.default_rng(0).integers(
      0, 256, (exp.train.batch_size, exp.data.seq_len), dtype=np.int32))
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  tokens = batch.size
  flops = 3 * forward_flops_per_token(exp.model, exp.data.seq_len) * tokens
  return {"name": name, "params": count_params(state.params), "compile_s": compile_s, "step_ms": 1e3 * median,
          "tokens_per_s": tokens / median, "gflops": flops / median / 1e9, "mfu": flops / median / 1e9 / peak}


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--steps", type=int, default=100, help="timed steps per model (the median is reported)")
  args = parser.parse_args()
  peak = harness.stated_peak()
  rows = [bench("stdlib_tiny (MD4, 4x256x4h, GLU 640, adaLN)", stdlib_tiny(), args.steps, peak)]
  # The reference's size: 4 layers, d=256, 4 heads, GLU MLP, adaLN-zero, 3.8M parameters (GLU width 576 here).
  reference = stdlib_tiny()
  reference.model.mlp_dim = 576
  rows.append(bench("4x256x4h, GLU 576, adaLN (3.8M)", reference, args.steps, peak))
  print(f"{'model':44s} {'params':>9s} {'compile s':>9s} {'step ms':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'MFU':>6s}")
  for r in rows:
    print(f"{r['name']:44s} {r['params']:9,d} {r['compile_s']:9.2f} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} "
          f"{r['gflops']:8.1f} {r['mfu']:6.1%}")
  print("target: 7,500 tokens/s (1.2x the 6,300 of a widely used JAX MD4 implementation on this machine)")


if __name__ == "__main__":
  main()
