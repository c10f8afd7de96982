"""Metrics of a run: ``metrics.jsonl`` and TensorBoard events written by process 0, a console progress line, and
the machine's float32 matmul rate that throughput figures are quoted against."""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


class MetricsWriter:
  """Metrics to ``metrics.jsonl`` and TensorBoard (``workdir/tensorboard``), from process 0 only, and a console
  progress line with rate and ETA."""

  def __init__(self, workdir: str, total_steps: int, quiet: bool = False):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total = total_steps
    self.is_writer = jax.process_index() == 0
    self.quiet = quiet or not self.is_writer
    self.start = time.time()
    self.start_step = None
    self.tensorboard = None
    if self.is_writer:
      import tensorboardX  # imported here: only the writing process needs it
      self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.is_writer:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step":
        self.tensorboard.add_scalar(k, v, step)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()

  def progress(self, step: int, metrics: dict) -> None:
    if self.start_step is None:
      self.start_step, self.start = step, time.time()
      return
    if self.quiet:
      return
    rate = (step - self.start_step) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    print(f"step {step}/{self.total} [{step / self.total:6.1%}] {rate:.2f} steps/s eta {eta:5.0f}s {shown}",
          flush=True)

  def log(self, text: str) -> None:
    if not self.quiet:
      print(text, flush=True)


def median_seconds(fn, args, reps: int) -> float:
  """Median wall seconds of ``fn(*args)`` over ``reps`` calls, each waited for, after one untimed call (which
  compiles it): what the benchmark scripts time."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(n: int = 1024, reps: int = 30) -> float:
  """Best float32 GFLOP/s of an n x n matmul chain on the default device: the peak that MFU and wall times are
  quoted against (measured in the same process, since the machine's speed varies from day to day)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ a)
  x = f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    x = f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
    x = x / jnp.max(jnp.abs(x))
  return 2 * n ** 3 / best / 1e9
