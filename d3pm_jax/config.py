"""The config boundary: an ml_collections ConfigDict in, frozen dataclasses out.

``base_config()`` holds every key with its default; files under ``configs/`` start from it and override. The
ConfigDict is locked, so an unknown key (``--config.trian.steps=5``) raises, naming the key. ``from_config``
converts it once, at the entry point, into ``ExperimentConfig``; nothing below reads a ConfigDict.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from d3pm_jax import _checks
from d3pm_jax.models.transformer import ModelConfig
from d3pm_jax.runtime.sharding import MeshConfig

PROCESS_NAMES = ("absorbing", "uniform", "nearest_neighbor", "autoregressive")
LOSSES = ("masked", "ctmc", "d3pm", "ar")
DATASETS = ("stdlib", "markov", "text8", "openwebtext", "lm1b")
LR_SCHEDULES = ("cosine", "inverse_sqrt")
GRAD_REDUCE_DTYPES = ("float32", "bfloat16")


# Process fields that change what the loss trains, never the network a checkpoint holds: a run may resume with
# other values, so an MD4/MDLM checkpoint (no time conditioning) fine-tunes into block diffusion, as BD3-LM does.
OBJECTIVE_FIELDS = ("block_size", "clip_low", "clip_high", "clip_search")


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
  """Which corruption process and which loss. ``autoregressive`` trains the causal baseline with the same loop."""
  name: str = "absorbing"
  loss: str = "masked"
  schedule: str = "linear"       # every shipped config, and MD4's and MDLM's text setups
  eps: float = 1e-4
  num_steps: int = 1000          # T of the discrete-time D3PM loss
  hybrid_lambda: float = 0.01    # D3PM's hybrid loss weight
  nn_k: int = 8
  nn_rate_scale: float = 4.0
  nn_uniform_rate: float = 0.0
  nn_embeddings: str = ""        # .npy path; empty: hand-built byte features (bytes tokenizer only)
  # Block diffusion (BD3-LM, absorbing + masked): masked diffusion inside blocks of this many tokens, autoregressive
  # across blocks (d3pm_jax/blocks.py). 0: one block of the whole sequence (MD4/MDLM).
  block_size: int = 0
  # Training draws t from U[clip_low, clip_high] (BD3-LM's clipped schedule; masked loss only). Evaluation always
  # integrates over the whole [0, 1], so reported figures stay bounds.
  clip_low: float = 0.0
  clip_high: float = 1.0
  # At each validation, pick the window of losses.CLIP_WINDOWS whose per-block loss estimate varies least on a
  # validation batch (BD3-LM's data-driven schedule), log it, and train with it until the next (block diffusion).
  clip_search: bool = False

  def __post_init__(self):
    _checks.check_choice("process", self.name, PROCESS_NAMES)
    _checks.check_choice("loss", self.loss, LOSSES)
    valid = {"absorbing": ("masked", "ctmc", "d3pm"), "uniform": ("ctmc", "d3pm"),
             "nearest_neighbor": ("ctmc", "d3pm"), "autoregressive": ("ar",)}[self.name]
    if self.loss not in valid:
      raise ValueError(f"process {self.name!r} cannot train with loss {self.loss!r}; valid: {sorted(valid)}")
    if self.block_size < 0:
      raise ValueError(f"process.block_size must be >= 0 (0: one block, plain masked diffusion); got "
                       f"{self.block_size}")
    if not 0.0 <= self.clip_low < self.clip_high <= 1.0:
      raise ValueError(f"the clipped schedule needs 0 <= process.clip_low < process.clip_high <= 1; got "
                       f"({self.clip_low}, {self.clip_high})")
    if self.clip_search and not self.block_size:
      raise ValueError("process.clip_search searches block diffusion's time window: set process.block_size (for "
                       "MD4, block_size = data.seq_len with model.time_conditioning=False)")
    if (self.block_size or self.window != (0.0, 1.0)) and (self.name, self.loss) != ("absorbing", "masked"):
      raise ValueError(f"process.block_size and process.clip_low/clip_high belong to masked diffusion (process "
                       f"'absorbing', loss 'masked'); got process {self.name!r} with loss {self.loss!r}")

  @property
  def window(self) -> tuple[float, float]:
    """Training's time window (clip_low, clip_high)."""
    return (self.clip_low, self.clip_high)

  @property
  def is_autoregressive(self) -> bool:
    return self.name == "autoregressive"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "stdlib"
  tokenizer: str = "bytes"
  tokenizer_path: str = ""       # sentencepiece .model; empty: train one in the workdir
  spm_vocab_size: int = 4096
  seq_len: int = 128
  validation_permille: int = 20
  markov_states: int = 8
  markov_windows: int = 4096
  prepared_dir: str = ""         # a d3pm-prepare output; empty: read the corpus directly (stdlib, markov)
  # Train on windows cropped at random offsets of the (stream-packed) training text rather than its fixed rows
  # (MD4's text8 pipeline); evaluation keeps the fixed validation rows.
  random_crops: bool = False
  # Each row's first token is given clean and left out of the likelihood, in training and evaluation (BD3-LM's
  # ignore_bos: its LM1B rows start with [CLS], d3pm-prepare --packing=wrapped); block diffusion only.
  ignore_bos: bool = False

  def __post_init__(self):
    _checks.check_choice("data set", self.name, DATASETS)
    if self.seq_len < 2:
      raise ValueError(f"data.seq_len must be >= 2; got {self.seq_len}")
    if self.random_crops and self.name == "markov":
      raise ValueError("data.random_crops crops a prepared token stream; the synthetic 'markov' source has none")
    if self.name in ("text8", "openwebtext", "lm1b") and not self.prepared_dir:
      raise ValueError(f"data set {self.name!r} is read from prepared shards: run d3pm-prepare "
                       f"--dataset={self.name} --source=... --out=DIR, then pass --config.data.prepared_dir=DIR")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 32
  grad_accum: int = 1
  # The element type gradients are summed in across the replicas of train.make_train_step ('data', and 'fsdp' with
  # grad_accum > 1), whatever the model's compute dtype: 'bfloat16' halves the bytes that sum moves, at its rounding.
  grad_reduce_dtype: str = "float32"
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  # After linear warm-up: 'cosine' decays to learning_rate * min_lr_ratio at train.steps (1.0: constant);
  # 'inverse_sqrt' (D3PM's) decays as learning_rate * sqrt(warmup_steps / step), min_lr_ratio unused.
  lr_schedule: str = "cosine"
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.03
  b1: float = 0.9
  b2: float = 0.99
  grad_clip: float = 1.0
  max_consecutive_skips: int = 10  # steps in a row with a non-finite loss or gradients before the run stops
  ema_decay: float = 0.999
  seed: int = 0
  log_every: int = 50
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  # On SIGTERM or Ctrl-C the run saves a checkpoint at the step in flight and exits 0; if that takes longer than
  # this many seconds it exits with status 1 instead, the previous checkpoint intact.
  preemption_grace_s: float = 120.0
  num_samples: int = 4
  sample_steps: int = 64

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "sample_steps", "max_consecutive_skips"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"train.{name} must be >= 1; got {getattr(self, name)}")
    if not -2**63 <= self.seed < 2**63:
      raise ValueError(f"train.seed must fit in 64 bits, [-2**63, 2**63); got {self.seed}")
    if not self.preemption_grace_s > 0:
      raise ValueError(f"train.preemption_grace_s must be > 0 seconds; got {self.preemption_grace_s}")
    if self.grad_clip < 0:
      raise ValueError(f"train.grad_clip must be >= 0 (0: no clipping); got {self.grad_clip}")
    _checks.check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
    _checks.check_choice("train.grad_reduce_dtype", self.grad_reduce_dtype, GRAD_REDUCE_DTYPES)
    if self.lr_schedule == "inverse_sqrt" and self.warmup_steps < 1:
      raise ValueError("train.lr_schedule='inverse_sqrt' decays as sqrt(warmup_steps / step): it needs "
                       f"train.warmup_steps >= 1; got {self.warmup_steps}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  model: ModelConfig
  process: ProcessConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig = MeshConfig()


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default, locked; ``model.vocab_size`` and ``model.causal`` are derived from the tokenizer
  and the process."""
  def section(cls, skip=()):
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip})

  cfg = ml_collections.ConfigDict()
  cfg.model = section(ModelConfig, skip=("vocab_size", "causal"))
  cfg.process = section(ProcessConfig)
  cfg.data = section(DataConfig)
  cfg.train = section(TrainConfig)
  cfg.mesh = section(MeshConfig)
  cfg.lock()  # config files may change values but never add keys: a misspelt key raises at once
  return cfg


def _typed(cls, values: dict, section: str):
  out = {}
  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    value, default = values[f.name], f.default
    if isinstance(default, bool) and not isinstance(value, bool):
      raise ValueError(f"config key {section}.{f.name} must be a bool; got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config key {section}.{f.name} must be a number; got {value!r}")
      if isinstance(default, int) and not float(value).is_integer():
        raise ValueError(f"config key {section}.{f.name} must be an integer; got {value!r}")
      value = type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
      raise ValueError(f"config key {section}.{f.name} must be a string; got {value!r}")
    out[f.name] = value
  unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"unknown config keys {sorted(section + '.' + k for k in unknown)}")
  return out


def from_config(cfg: ml_collections.ConfigDict | dict, vocab_size: int) -> ExperimentConfig:
  """Converts a config into frozen dataclasses. ``vocab_size`` is the tokenizer's; the model's vocabulary adds
  the mask (absorbing) or a start token (autoregressive). The autoregressive baseline is causal and never
  time-conditioned, whatever ``model.time_conditioning`` says."""
  raw: dict[str, Any] = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  unknown = set(raw) - {"model", "process", "data", "train", "mesh"}
  if unknown:
    raise ValueError(f"unknown config sections {sorted(unknown)}; valid: ['data', 'mesh', 'model', 'process', "
                     "'train']")
  process = ProcessConfig(**_typed(ProcessConfig, raw.get("process", {}), "process"))
  extra = 1 if process.name in ("absorbing", "autoregressive") else 0
  model_values = _typed(ModelConfig, {k: v for k, v in raw.get("model", {}).items() if k != "vocab_size"}, "model")
  if process.is_autoregressive:  # the causal baseline sees no diffusion time
    model_values["time_conditioning"] = False
  model = ModelConfig(vocab_size=vocab_size + extra, causal=process.is_autoregressive, **model_values)
  if model.head_impl not in ("xla", "auto") and process.loss not in ("masked", "ar"):
    raise ValueError(f"model.head_impl={model.head_impl!r} fuses the output head with a cross-entropy, which only "
                     f"the masked ELBO and the AR baseline use; process.loss={process.loss!r} needs the full "
                     f"distribution: use model.head_impl='xla'")
  data = DataConfig(**_typed(DataConfig, raw.get("data", {}), "data"))
  if data.seq_len > model.max_len:
    raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_len={model.max_len}")
  if data.ignore_bos and not process.block_size:
    raise ValueError("data.ignore_bos gives each row's first token clean and unscored, as BD3-LM's block diffusion "
                     "does: set process.block_size (and process.loss='masked'), or data.ignore_bos=False")
  if process.block_size:
    if data.seq_len % process.block_size:
      raise ValueError(f"process.block_size={process.block_size} must divide data.seq_len={data.seq_len}; valid: "
                       f"{[d for d in range(1, data.seq_len + 1) if data.seq_len % d == 0]}")
    if model.time_conditioning:
      raise ValueError("block diffusion draws one t per block, and the network conditions on one t per row: set "
                       "model.time_conditioning=False (BD3-LM trains without it)")
  mesh_values = _typed(MeshConfig, raw.get("mesh", {}), "mesh")
  if "rules" in mesh_values:  # ConfigDicts and JSON turn the rules into lists; they are pairs
    mesh_values["rules"] = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                                 for name, axes in mesh_values["rules"])
  return ExperimentConfig(model=model, process=process, data=data,
                          train=TrainConfig(**_typed(TrainConfig, raw.get("train", {}), "train")),
                          mesh=MeshConfig(**mesh_values))


def stdlib_tiny(process: str = "absorbing", loss: str = "masked", arg: str | None = None):
  """The stdlib byte-level experiment shared by ``configs/stdlib_*.py``: a ~4M-parameter model, 600 steps of
  batch 32 x 128 bytes. Only the process and the loss differ between those configs, so they compare processes at
  equal budgets. ``arg='runlocal'`` trains 60 steps as a smoke test."""
  arg = parse_arg(arg, ("runlocal",))
  cfg = base_config()
  cfg.process.update(name=process, loss=loss, schedule="linear", num_steps=1000, hybrid_lambda=0.01,
                     nn_k=8, nn_rate_scale=4.0, nn_uniform_rate=0.1)
  cfg.model.update(num_layers=4, d_model=256, num_heads=4, mlp_dim=640, cond_dim=128, max_len=128,
                   time_conditioning=True)
  cfg.data.update(name="stdlib", tokenizer="bytes", seq_len=128)
  cfg.train.update(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=50, eval_every=100, eval_batches=8,
                   checkpoint_every=200, sample_steps=128)
  if arg == "runlocal":
    cfg.train.update(steps=60, eval_every=60, checkpoint_every=60, log_every=10)
  return cfg


def experiment_from_dict(raw: dict) -> ExperimentConfig:
  """Inverse of ``dataclasses.asdict(experiment)`` (as written to ``workdir/experiment.json``)."""
  return from_config({k: raw[k] for k in ("process", "data", "train", "mesh")} |
                     {"model": {k: v for k, v in raw["model"].items() if k not in ("vocab_size", "causal")}},
                     vocab_size=raw["model"]["vocab_size"] - (1 if raw["process"]["name"] in
                                                             ("absorbing", "autoregressive") else 0))


# What a paper config's ``reference()`` records for a field its reference has no setting for (this library's
# architecture fields beside another network): it differs by construction, so a deviation bullet must name it
# (tests/test_paper_configs.py).
NOT_IN_REFERENCE = "not in the reference"


def prepared_path(name: str) -> str:
  """Where the paper configs expect ``d3pm-prepare --out``: ``$D3PM_DATA/<name>`` (``data/<name>`` when unset)."""
  return os.path.join(os.environ.get("D3PM_DATA", "data"), name)


def sibling_config(config_file: str, name: str):
  """The module of ``configs/<name>.py`` beside ``config_file`` (a config's ``__file__``), for a config that
  starts from another's ``get_config``."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, valid: tuple[str, ...]) -> str | None:
  """For ``get_config(arg)``: ``arg`` must be None or one of ``valid``."""
  if arg is not None and arg not in valid:
    raise ValueError(f"unknown config argument {arg!r}; valid: {sorted(valid)}")
  return arg
