"""The default job: a ~4M-parameter masked-diffusion (MD4) model on the stdlib corpus, as bytes.

Run:    d3pm-train --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny
Gives:  about 3.6 bits per byte on validation after 600 steps of batch 32 x 128 bytes, in about 9 minutes on
        2 CPU cores (measured on the development machine; see the README), then four decoded samples.
Args:   ':runlocal' trains 60 steps as a smoke test.
"""
from d3pm_jax.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, ("runlocal",))
  cfg = base_config()
  cfg.process.update(name="absorbing", loss="masked", schedule="linear")
  cfg.model.update(num_layers=4, d_model=256, num_heads=4, mlp_dim=640, cond_dim=128, max_len=128,
                   time_conditioning=True)
  cfg.data.update(name="stdlib", tokenizer="bytes", seq_len=128)
  cfg.train.update(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50, eval_every=200, eval_batches=8,
                   checkpoint_every=200, sample_steps=128)
  if arg == "runlocal":
    cfg.train.update(steps=60, eval_every=60, checkpoint_every=60, log_every=10)
  return cfg
