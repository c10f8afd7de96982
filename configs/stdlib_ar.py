"""stdlib corpus, the autoregressive baseline: the same transformer, causal, next-byte cross-entropy.

The same model, data and budget as configs/stdlib_tiny.py; only the process and the loss differ.
Run:    d3pm-train --config=configs/stdlib_ar.py --workdir=/tmp/stdlib_ar
Args:   ':runlocal' trains 60 steps as a smoke test.
"""
from d3pm_jax.config import stdlib_tiny


def get_config(arg=None):
  return stdlib_tiny("autoregressive", "ar", arg)
