"""stdlib corpus, nearest-neighbour diffusion over byte features (8-NN graph, 10% uniform rate so it mixes) with the CTMC ELBO.

The same model, data and budget as configs/stdlib_tiny.py; only the process and the loss differ.
Run:    d3pm-train --config=configs/stdlib_nearest_neighbor.py --workdir=/tmp/stdlib_nearest_neighbor
Args:   ':runlocal' trains 60 steps as a smoke test.
"""
from d3pm_jax.config import stdlib_tiny


def get_config(arg=None):
  return stdlib_tiny("nearest_neighbor", "ctmc", arg)
