"""stdlib corpus, block diffusion (BD3-LM): masked diffusion inside blocks of L' bytes, autoregressive across them.

The same model, data and budget as configs/stdlib_tiny.py (MD4); the loss is block diffusion's with blocks of 4
(':4', the default) or 16 (':16'), and the network has no time conditioning (BD3-LM's; one t per block).
Run:    d3pm-train --config=configs/stdlib_bd3lm.py:4 --workdir=/tmp/stdlib_bd3lm4
Args:   ':4' or ':16', the block size.
"""
from d3pm_jax.config import parse_arg, stdlib_tiny

BLOCK_SIZES = {"4": 4, "16": 16}


def get_config(arg=None):
  cfg = stdlib_tiny("absorbing", "masked")
  cfg.process.block_size = BLOCK_SIZES[parse_arg(arg, tuple(BLOCK_SIZES)) or "4"]
  cfg.model.time_conditioning = False
  return cfg
