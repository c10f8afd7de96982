"""Entry point: ``d3pm-train --config=configs/x.py[:arg] --workdir=DIR [--config.train.steps=...]``.

Parses flags, joins the multi-process job if there is one (``multihost``), converts the locked config once into
frozen dataclasses, trains, then prints validation bits per token and a few decoded samples. Every process runs
this same program; only process 0 prints and writes logs.
"""
from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from d3pm_jax.cli import common
from d3pm_jax.config import base_config
from d3pm_jax.runtime import multihost
from d3pm_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':arg'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the corpus fingerprint.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", list(multihost.MODES),
                                  "Join a multi-process job: auto (explicit flags or a detected TPU pod / SLURM / "
                                  "Open MPI job), on (always call jax.distributed.initialize) or off.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes the job has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(path: str) -> None:
  """Creates ``path`` and writes a file in it, so an unusable workdir fails now, not after the data has loaded."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={path} cannot be written ({e.strerror or e}); pass a directory this user can "
                     f"create and write") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --config.section.key=value")
  logging.set_verbosity(logging.WARNING)  # orbax and JAX log every checkpoint at INFO
  multihost.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  check_workdir(_WORKDIR.value)
  config, data = train.build_experiment(_CONFIG.value, _WORKDIR.value)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value, data)
  except train.NonFiniteTraining as e:
    sys.exit(f"d3pm-train stopped: {e}")
  if result["preempted"] is not None:
    if multihost.is_leader():
      print(f"stopped at step {result['preempted']} on request; its checkpoint is saved in {_WORKDIR.value}: run "
            f"the same command to resume")
    return
  unit = ("character" if config.data.name == "text8" else
          "byte" if config.data.tokenizer == "bytes" and config.data.name == "stdlib" else "token")
  if multihost.is_leader():
    print(f"\nvalidation: {result['validation']['bits_per_token']:.4f} bits per {unit} "
          f"({result['validation']['tokens']} tokens)")
    print(f"\n{config.train.num_samples} samples ({config.train.sample_steps} steps):")
  train.print_samples(config, result)  # every process samples (one SPMD program); process 0 prints


def run():
  common.run(main, "d3pm-train", schema=base_config)


if __name__ == "__main__":
  run()
