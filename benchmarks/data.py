"""Input pipeline throughput against the train step: tokens/s of the grain pipeline reading prepared ArrayRecord
shards (the stdlib corpus prepared by ``d3pm-prepare``, batches of 32 x 128 as ``stdlib_tiny`` trains), and tokens/s
of the ``stdlib_tiny`` train step on the same batch shape, both measured in this process. The pipeline must
outpace the step by at least 10x so that it never starves it.

    python benchmarks/data.py [--batches 2000] [--steps 30] [--prepared DIR]
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from d3pm_jax.config import from_config, stdlib_tiny
from d3pm_jax.data import pipeline, prepare


from train_step import bench  # the sibling benchmark's train-step timer
import harness  # the sibling helper (this directory is the script's path)


def pipeline_tokens_per_second(prepared_dir: str, batch_size: int, batches: int) -> dict:
  """Reads ``batches`` consecutive training batches (shuffled rows, as training reads them) from the shards."""
  data = pipeline.build_data(from_config(_config(prepared_dir), vocab_size=256).data, batch_size, seed=0)
  data.train_batches[0]  # opens the shards
  start = time.perf_counter()
  total = 0
  for i in range(1, batches + 1):
    total += np.asarray(data.train_batches[i]).size
  seconds = time.perf_counter() - start
  return {"tokens_per_s": total / seconds, "batches": batches, "seconds": seconds}


def _config(prepared_dir: str):
  cfg = stdlib_tiny()
  cfg.data.prepared_dir = prepared_dir
  return cfg


def main():
  parser = harness.parser(__doc__)
  parser.add_argument("--batches", type=int, default=2000, help="batches read from the shards")
  parser.add_argument("--steps", type=int, default=30, help="timed train steps (the median is reported)")
  parser.add_argument("--prepared", default="", help="a prepared stdlib directory (default: prepare one now)")
  args = parser.parse_args()
  cfg = stdlib_tiny()
  batch, seq_len = cfg.train.batch_size, cfg.data.seq_len
  with tempfile.TemporaryDirectory() as scratch:
    prepared_dir = args.prepared or os.path.join(scratch, "stdlib")
    if not args.prepared:
      start = time.perf_counter()
      metadata = prepare.prepare_stdlib(prepared_dir, seq_len=seq_len)
      print(f"prepared the stdlib corpus: {metadata['splits']['train']['rows']:,} training rows of {seq_len} in "
            f"{time.perf_counter() - start:.1f} s")
    reading = pipeline_tokens_per_second(prepared_dir, batch, args.batches)
  peak = harness.stated_peak()
  step = bench("stdlib_tiny", cfg, args.steps, peak)
  print(f"grain pipeline, prepared shards: {reading['tokens_per_s']:12,.0f} tokens/s "
        f"({reading['batches']} batches of {batch} x {seq_len} in {reading['seconds']:.2f} s)")
  print(f"stdlib_tiny train step:          {step['tokens_per_s']:12,.0f} tokens/s ({step['step_ms']:.1f} ms/step)")
  ratio = reading["tokens_per_s"] / step["tokens_per_s"]
  print(f"pipeline / train step: {ratio:.1f}x (target >= 10x): {'met' if ratio >= 10 else 'NOT met'}")


if __name__ == "__main__":
  main()
