"""The train loop: it learns, resumes exactly, accumulates gradients exactly, and refuses bad configs."""
import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from d3pm_jax.config import from_config
from d3pm_jax.data import pipeline
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import checkpoints, train
from d3pm_jax.training.state import build_process, init_state, loss_terms, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def experiment(arg=None, **train_overrides):
  cfg = load_config("test", arg)
  cfg.train.update(**train_overrides)
  return from_config(cfg, vocab_size=256)


@pytest.fixture(scope="module")
def data():
  exp = experiment()
  return pipeline.build_data(exp.data, exp.train.batch_size, exp.train.seed)


def parts(exp):
  model = Transformer(exp.model)
  process = build_process(exp.process, exp.model)
  optimizer = make_optimizer(exp.train)
  return model, process, optimizer


@pytest.mark.parametrize("arg,steps,lr,fraction", [("autoregressive", 200, 1e-2, 0.05), (None, 600, 3e-3, 0.3)])
def test_tiny_model_overfits_one_batch(data, arg, steps, lr, fraction):
  """Memorising 4 windows: the AR loss falls to a few percent; the masked-diffusion ELBO, which must also guess
  the windows from few unmasked tokens, to well under a third (measured: 1.4% and 20%)."""
  exp = experiment(arg, steps=steps, learning_rate=lr, warmup_steps=10, ema_decay=0.0, weight_decay=0.0)
  model, process, optimizer = parts(exp)
  state = init_state(exp, model, optimizer)
  step = jax.jit(train.make_train_step(exp, model, process, optimizer))
  batch = jnp.asarray(data.train_batches[0])

  @jax.jit
  def loss_at_fixed_noise(params):  # the loss averaged over 32 fixed draws of (t, x_t): low-variance
    keys = jax.random.split(jax.random.PRNGKey(123), 32)
    per_key = jax.vmap(lambda k: jnp.mean(loss_terms(exp, model, process, params, k, batch)["loss"]))(keys)
    return jnp.mean(per_key)

  start = float(loss_at_fixed_noise(state.params))
  for _ in range(exp.train.steps):
    state, _ = step(state, batch)
  end = float(loss_at_fixed_noise(state.params))
  assert end < fraction * start, (start, end)


class RecordingBatches:
  """Wraps the indexable batch source and records which batch indices the loop read."""

  def __init__(self, batches):
    self.batches, self.read = batches, []

  def __getitem__(self, i):
    self.read.append(i)
    return self.batches[i]


def with_recorder(data):
  return pipeline.Data(tokenizer=data.tokenizer, train_batches=RecordingBatches(data.train_batches),
                       val_windows=data.val_windows, val_weights=data.val_weights, info=data.info)


@pytest.mark.slow
def test_resume_is_exact(tmp_path, data):
  exp = experiment(steps=6, checkpoint_every=3, eval_every=100)
  straight_data = with_recorder(data)
  straight = train.train_and_evaluate(exp, str(tmp_path / "straight"), straight_data, quiet=True)
  first_data, second_data = with_recorder(data), with_recorder(data)
  train.train_and_evaluate(exp, str(tmp_path / "resumed"), first_data, stop_after=3, quiet=True)
  resumed = train.train_and_evaluate(exp, str(tmp_path / "resumed"), second_data, quiet=True)
  reads = [d.train_batches.read for d in (straight_data, first_data, second_data)]
  assert reads[0] == reads[1] + reads[2] == list(range(6))
  for name in ("params", "ema_params", "opt_state", "rng", "step"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(straight["state"], name),
                           getattr(resumed["state"], name))


def test_train_seconds_add_up_over_sessions(tmp_path, data, monkeypatch):
  """The wall time in a checkpoint is this session's plus the earlier sessions' (a clock that ticks 1000 s per
  read: each session reads it at its start and at its checkpoint, the last one also at the final evaluation)."""
  clock = iter(range(0, 10**6, 1000))
  monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: float(next(clock))))
  exp = experiment(steps=4, checkpoint_every=2, eval_every=100)
  train.train_and_evaluate(exp, str(tmp_path), data, stop_after=2, quiet=True)
  assert checkpoints.read_progress(str(tmp_path)) == {"step": 2, "next_batch": 2, "train_seconds": 1000.0,
                                                     "skipped_steps": 0}
  train.train_and_evaluate(exp, str(tmp_path), data, quiet=True)
  assert checkpoints.read_progress(str(tmp_path)) == {"step": 4, "next_batch": 4, "train_seconds": 3000.0,
                                                     "skipped_steps": 0}


def test_resuming_with_an_incompatible_model_is_refused(tmp_path, data):
  exp = experiment(steps=2, checkpoint_every=2, eval_every=100)
  train.train_and_evaluate(exp, str(tmp_path), data, quiet=True)
  cfg = load_config("test")
  cfg.train.update(steps=4, checkpoint_every=2, eval_every=100)
  cfg.model.d_model = 48
  with pytest.raises(ValueError, match=r"different experiment.*model.d_model: checkpoint 32 vs config 48"):
    train.train_and_evaluate(from_config(cfg, 256), str(tmp_path), data, quiet=True)


@pytest.mark.parametrize("arg", [None, "absorbing_d3pm", "uniform", "nearest_neighbor", "autoregressive", "bd3lm"])
def test_every_process_trains_with_finite_loss(tmp_path, data, arg):
  exp = experiment(arg, steps=3, eval_every=3, checkpoint_every=3)
  result = train.train_and_evaluate(exp, str(tmp_path), data, quiet=True)
  assert np.isfinite(result["validation"]["bits_per_token"]) and result["validation"]["bits_per_token"] > 0
  texts = train.print_samples(exp, result, writer_out=open(os.devnull, "w"))
  assert len(texts) == exp.train.num_samples


def test_gradient_accumulation_equals_full_batch(data):
  # The autoregressive loss is deterministic, so two half batches must give the full batch's update.
  one = experiment("autoregressive", grad_accum=1)
  two = experiment("autoregressive", grad_accum=2)
  batch = jnp.asarray(data.train_batches[0])
  states = []
  for exp in (one, two):
    model, process, optimizer = parts(exp)
    state = init_state(exp, model, optimizer)
    state, _ = jax.jit(train.make_train_step(exp, model, process, optimizer))(state, batch)
    states.append(state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *states)


def test_remat_equals_no_remat(data):
  exp = experiment()
  cfg = load_config("test")
  cfg.model.remat = True
  exp_remat = from_config(cfg, 256)
  batch = jnp.asarray(data.train_batches[0])
  grads = []
  for e in (exp, exp_remat):
    model, process, optimizer = parts(e)
    state = init_state(e, model, optimizer)
    loss = lambda p: jnp.mean(loss_terms(e, model, process, p, jax.random.PRNGKey(0), batch)["loss"])
    grads.append(jax.grad(loss)(state.params))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), *grads)


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "stepz", 3, r"unknown config keys \['train.stepz'\]"),
    ("train", "steps", "ten", "train.steps must be a number; got 'ten'"),
    ("train", "steps", 2.5, "train.steps must be an integer"),
    ("model", "remat", "yes", "model.remat must be a bool"),
    ("process", "name", "gaussian", "unknown process 'gaussian'"),
    ("process", "loss", "ctmc", None),  # absorbing trains with the CTMC ELBO too (the test config's is masked)
    ("model", "norm", "batch", "unknown norm 'batch'"),
    ("train", "grad_accum", 3, "divisible by train.grad_accum=3"),
])
def test_bad_config_values_are_rejected_naming_the_key(section, key, value, match):
  raw = load_config("test").to_dict()
  raw[section][key] = value
  if match is None:  # a valid value: no error, and it is the value the experiment gets
    assert getattr(getattr(from_config(raw, 256), section), key) == value
    assert load_config("test").to_dict()[section][key] != value  # not the default set again
    return
  with pytest.raises(ValueError, match=match):
    from_config(raw, 256)


def test_locked_config_rejects_unknown_keys_and_bad_args():
  cfg = load_config("test")
  with pytest.raises(AttributeError, match="stepz"):
    cfg.train.stepz = 3
  with pytest.raises(ValueError, match=r"unknown config argument 'huge'; valid: \["):
    load_config("test", "huge")
  with pytest.raises(ValueError, match="process 'uniform' cannot train with loss 'masked'"):
    raw = load_config("test", "uniform").to_dict()
    raw["process"]["loss"] = "masked"
    from_config(raw, 256)


def test_every_config_file_builds():
  for path in sorted((ROOT / "configs").glob("*.py")):
    cfg = load_config(path.stem)
    assert isinstance(cfg, ml_collections.ConfigDict)
    from_config(cfg, 256)


def test_cli_trains_and_prints_bits_and_samples(tmp_path):
  cmd = [sys.executable, "-m", "d3pm_jax.cli.train", f"--config={ROOT / 'configs' / 'test.py'}",
         f"--workdir={tmp_path}", "--config.train.steps=2", "--config.train.eval_every=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "validation:" in out.stdout and "bits per byte" in out.stdout and "samples" in out.stdout
  assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "corpus.json").exists()
  assert any((tmp_path / "tensorboard").iterdir())
  bad = subprocess.run(cmd[:-2] + ["--config.train.stepz=2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert bad.returncode != 0 and "stepz" in bad.stderr

