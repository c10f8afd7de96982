"""The tiny config the tests import: a 2-layer, d=32 model on 16-byte windows of the stdlib corpus.

Run: d3pm-train --config=configs/test.py --workdir=/tmp/d3pm_test   (seconds; the bits are not meaningful)
"""
from d3pm_jax.config import base_config, parse_arg

PROCESSES = {
    None: ("absorbing", "masked"),
    "absorbing_d3pm": ("absorbing", "d3pm"),
    "uniform": ("uniform", "ctmc"),
    "nearest_neighbor": ("nearest_neighbor", "ctmc"),
    "autoregressive": ("autoregressive", "ar"),
    "bd3lm": ("absorbing", "masked"),  # block diffusion: blocks of 4, no time conditioning
}


def get_config(arg=None):
  arg = parse_arg(arg, tuple(k for k in PROCESSES if k))
  cfg = base_config()
  cfg.process.name, cfg.process.loss = PROCESSES[arg]
  cfg.process.num_steps = 50
  # Byte neighbours form a near-path graph whose spectral gap is tiny; a uniform share makes it mix by t = 1.
  cfg.process.nn_uniform_rate = 0.1
  cfg.model.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, cond_dim=16, max_len=16,
                   time_conditioning=True)
  cfg.data.seq_len = 16
  if arg == "bd3lm":
    cfg.process.block_size = 4
    cfg.model.time_conditioning = False
  cfg.train.update(steps=4, batch_size=4, warmup_steps=1, log_every=1, eval_every=4, eval_batches=1,
                   checkpoint_every=2, num_samples=2, sample_steps=4)
  return cfg
