"""Orbax checkpoints of a workdir: save and resume the train state (with the data position and the experiment's
fingerprint), and read a finished run's parameters and config without the train loop."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp

from d3pm_jax.config import OBJECTIVE_FIELDS, ExperimentConfig, ProcessConfig, experiment_from_dict
from d3pm_jax.models.transformer import EXECUTION_FIELDS, ModelConfig, REGULARISATION_FIELDS, Transformer
from d3pm_jax.training.state import TrainState, init_state, make_optimizer


def fingerprint(config: ExperimentConfig) -> dict:
  """What a checkpoint must agree with to be resumed: the model and the process (training knobs may change,
  dropout among them, and so may how the model is computed: ``EXECUTION_FIELDS``, such as which output-head
  kernel, and the objective's block size and time window: ``OBJECTIVE_FIELDS``)."""
  model = {k: v for k, v in dataclasses.asdict(config.model).items()
           if k not in EXECUTION_FIELDS + REGULARISATION_FIELDS}
  process = {k: v for k, v in dataclasses.asdict(config.process).items() if k not in OBJECTIVE_FIELDS}
  return {"model": model, "process": process,
          "seq_len": config.data.seq_len, "data": config.data.name, "tokenizer": config.data.tokenizer}


# A field a checkpoint's fingerprint lacks was added to the library after it was written: it had the default.
_DEFAULTS = {"model": {f.name: f.default for f in dataclasses.fields(ModelConfig)},
             "process": {f.name: f.default for f in dataclasses.fields(ProcessConfig)}}


def check_compatible(saved: dict, current: dict) -> None:
  """Raises, naming every differing key, unless the two fingerprints agree as JSON stores them (tuples as lists).
  A model or process field missing from the saved fingerprint (a checkpoint older than the field) counts as its
  default."""
  saved, current = (json.loads(json.dumps(d)) for d in (saved, current))
  diffs = []
  for section in sorted(set(saved) | set(current)):
    a, b = saved.get(section), current.get(section)
    if isinstance(a, dict) and isinstance(b, dict):
      a = {**{k: v for k, v in _DEFAULTS.get(section, {}).items() if k in b and k not in a}, **a}
      diffs += [f"{section}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      diffs.append(f"{section}: checkpoint {a!r} vs config {b!r}")
  if diffs:
    raise ValueError("the workdir holds a checkpoint of a different experiment; use a new --workdir or restore "
                     "the original config. Differences: " + "; ".join(diffs))


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_manager(workdir: str, cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save_checkpoint(manager, state: TrainState, step: int, data_state: dict, experiment: dict) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
      experiment=ocp.args.JsonSave(experiment)))


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager of ``workdir``'s checkpoints: for looking at a run, never for training it."""
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(read_only=True))


def restore_params(workdir: str, config: ExperimentConfig, use_ema: bool = False):
  """The parameters (or EMA parameters) of ``workdir``'s latest checkpoint, and its step."""
  manager = _reader(workdir)
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint under {workdir}/checkpoints; train first with d3pm-train --workdir={workdir}")
  check_compatible(_saved_fingerprint(manager, step), fingerprint(config))  # a foreign checkpoint, named as such
  model = Transformer(config.model)
  # Onto this process's first device, whatever mesh (or number of hosts) saved the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                    jax.eval_shape(lambda: init_state(config, model, make_optimizer(config.train))))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  manager.close()
  return (state.ema_params if use_ema else state.params), step


TMP_MARK = ".orbax-checkpoint-tmp"


def discard_incomplete(workdir: str, log=print) -> list:
  """Removes (on process 0) and logs the checkpoints of ``workdir`` whose save never finished: a process killed
  mid-save leaves ``STEP.orbax-checkpoint-tmp`` (a checkpoint is renamed to ``STEP`` only once whole, so these are
  never read). Call before training starts; returns the names found."""
  directory = checkpoint_dir(workdir)
  partial = sorted(n for n in (os.listdir(directory) if os.path.isdir(directory) else []) if TMP_MARK in n)
  for name in partial:
    log(f"skipping the incomplete checkpoint {name} (its save was interrupted); removing it")
    if jax.process_index() == 0:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  return partial


def _saved_fingerprint(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(experiment=ocp.args.JsonRestore()))["experiment"]


def restore_checkpoint(manager, abstract_state: TrainState, expected: dict, log=print):
  """(state, data_state) from the newest readable checkpoint, or None when there is none; refused unless its
  fingerprint equals ``expected``. A checkpoint that cannot be read (files lost or truncated after it was
  committed, e.g. by a full disk) is logged, renamed ``STEP.unreadable`` (kept for inspection, out of the manager's
  sight) and the next older one tried; when none can be read this raises rather than start afresh over them."""
  steps = sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      saved = _saved_fingerprint(manager, step)
    except Exception as e:  # noqa: BLE001 - any failure to read means: use an older checkpoint
      saved, error = None, e
    if saved is not None:
      check_compatible(saved, expected)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]
      except Exception as e:  # noqa: BLE001
        error = e
    log(f"checkpoint {step} cannot be read ({type(error).__name__}: {str(error)[:300]}); renamed it "
        f"{step}.unreadable" + (f", trying step {steps[i + 1]}" if i + 1 < len(steps) else ""))
    if jax.process_index() == 0:
      path = os.path.join(str(manager.directory), str(step))
      os.replace(path, path + ".unreadable")
    manager.reload()
  if steps:
    raise ValueError(f"none of the checkpoints {sorted(steps)} in {manager.directory} can be read (see above); "
                     f"move the directory away to train from scratch")
  return None


def read_progress(workdir: str) -> dict | None:
  """``{"step": ..., "next_batch": ..., "train_seconds": ..., "skipped_steps": ...}`` of ``workdir``'s latest
  checkpoint (the wall time of the train loop over all its sessions, compilation included, and the steps whose
  update was skipped as non-finite), or None when it has no checkpoint."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = _reader(workdir)
  step = manager.latest_step()
  data = None if step is None else manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  manager.close()
  return None if step is None else {"step": int(step), **data}


def load_experiment(workdir: str) -> ExperimentConfig:
  """The config a ``d3pm-train`` run wrote to ``workdir/experiment.json``."""
  path = os.path.join(workdir, "experiment.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist; is {workdir} a d3pm-train workdir?")
  with open(path) as f:
    return experiment_from_dict(json.load(f))
