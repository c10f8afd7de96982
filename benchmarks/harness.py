"""What the benchmark scripts share (a helper, not a benchmark): their command line, and the line that states the
machine and the float32 matmul peak that every MFU printed after it is measured against, in the same process."""
from __future__ import annotations

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
  """A script's argument parser, its ``--help`` the module docstring as written."""
  return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def stated_peak() -> float:
  """Measures the float32 matmul peak now (GFLOP/s), prints it with the JAX version and platform, returns it."""
  import jax

  from d3pm_jax.training.metrics import matmul_peak
  peak = matmul_peak()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}: float32 matmul peak {peak:.1f} GFLOP/s")
  return peak
