"""Entry point: ``d3pm-train --config=configs/x.py[:arg] --workdir=DIR [--config.train.steps=...]``.

Parses flags, converts the locked config once into frozen dataclasses, trains, then prints validation bits per
token and a few decoded samples.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from d3pm_jax import train
from d3pm_jax.config import from_config
from d3pm_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':arg'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the corpus fingerprint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --config.section.key=value")
  logging.set_verbosity(logging.WARNING)  # orbax and JAX log every checkpoint at INFO
  preliminary = from_config(_CONFIG.value, vocab_size=2)  # validates every key before any work
  data = pipeline.build_data(preliminary.data, preliminary.train.batch_size, preliminary.train.seed, _WORKDIR.value)
  config = from_config(_CONFIG.value, vocab_size=pipeline.vocab_size_of(data, preliminary.data))
  result = train.train_and_evaluate(config, _WORKDIR.value, data)
  unit = "byte" if config.data.tokenizer == "bytes" and config.data.name == "stdlib" else "token"
  print(f"\nvalidation: {result['validation']['bits_per_token']:.4f} bits per {unit} "
        f"({result['validation']['tokens']} tokens)")
  print(f"\n{config.train.num_samples} samples ({config.train.sample_steps} steps):")
  train.print_samples(config, result)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
