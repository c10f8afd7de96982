"""stdlib corpus, block diffusion (BD3-LM): masked diffusion inside blocks of L' bytes, autoregressive across them.

The same model, data and budget as configs/stdlib_tiny.py (MD4); the loss is block diffusion's with blocks of 4
(':4', the default) or 16 (':16'), and the network has no time conditioning (BD3-LM's; one t per block).
':md4' is one block of the whole 128-byte window: MD4's objective without time conditioning. A '-clip' suffix
(':4-clip', ':md4-clip') trains on the clipped schedule whose window the train loop searches at each validation
(process.clip_search); evaluation still integrates over the whole [0, 1].
Run:    d3pm-train --config=configs/stdlib_bd3lm.py:4 --workdir=/tmp/stdlib_bd3lm4
Args:   ':4', ':16' or ':md4', each optionally with '-clip'.
"""
from d3pm_jax.config import parse_arg, stdlib_tiny

BLOCK_SIZES = {"4": 4, "16": 16, "md4": None}  # None: the whole window
ARGS = tuple(BLOCK_SIZES) + tuple(f"{size}-clip" for size in BLOCK_SIZES)


def get_config(arg=None):
  size, _, clip = (parse_arg(arg, ARGS) or "4").partition("-")
  cfg = stdlib_tiny("absorbing", "masked")
  cfg.process.block_size = BLOCK_SIZES[size] or cfg.data.seq_len
  cfg.process.clip_search = bool(clip)
  cfg.model.time_conditioning = False
  return cfg
