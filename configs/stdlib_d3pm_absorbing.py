"""stdlib corpus, absorbing (mask) diffusion with D3PM's discrete-time VLB, T = 1000, hybrid loss lambda = 0.01.

The same model, data and budget as configs/stdlib_tiny.py; only the process and the loss differ.
Run:    d3pm-train --config=configs/stdlib_d3pm_absorbing.py --workdir=/tmp/stdlib_d3pm_absorbing
Args:   ':runlocal' trains 60 steps as a smoke test.
"""
from d3pm_jax.config import stdlib_tiny


def get_config(arg=None):
  return stdlib_tiny("absorbing", "d3pm", arg)
