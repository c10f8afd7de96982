"""Non-finite steps: a step whose loss (hence gradients) is NaN is skipped and counted, leaving parameters,
optimiser state and EMA exactly as they were; train.max_consecutive_skips of them in a row stop the run with a
message, and the latest checkpoint holds the last good parameters. The NaN is planted through the loss: batches
whose first token is POISON get a NaN loss."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.data import pipeline
from d3pm_jax.training import checkpoints, train
from d3pm_jax.training.state import loss_terms

from test_train import experiment

POISON = 0  # a NUL byte: never in the stdlib's .py sources


@pytest.fixture
def planted(monkeypatch):
  real = loss_terms

  def poisoned(config, model, process, params, key, x0_BxL, *args, **kwargs):
    out = real(config, model, process, params, key, x0_BxL, *args, **kwargs)
    return {k: jnp.where(x0_BxL[0, 0] == POISON, jnp.nan, v) for k, v in out.items()}

  monkeypatch.setattr(train, "loss_terms", poisoned)

  def data_with_poison(config, steps):
    """The run's data with the batches of these (1-based) steps poisoned."""
    data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed)
    batches = [np.array(data.train_batches[i]) for i in range(12)]
    assert all(b[0, 0] != POISON for b in batches)
    for step in steps:
      batches[step - 1][0, 0] = POISON
    return dataclasses.replace(data, train_batches=batches)
  return data_with_poison


def _state_leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state, state.ema_params))]


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_counted(tmp_path, planted):
  config = experiment(steps=6, checkpoint_every=1, keep_checkpoints=10, eval_every=100, log_every=1,
                      max_consecutive_skips=3)
  data = planted(config, steps=[3])
  before = train.train_and_evaluate(config, str(tmp_path), data, stop_after=2, quiet=True)["state"]
  before = _state_leaves(before)
  skipped = train.train_and_evaluate(config, str(tmp_path), data, stop_after=1, quiet=True)["state"]
  for a, b in zip(_state_leaves(skipped), before):  # step 3 changed nothing but the step counter and the rng
    np.testing.assert_array_equal(a, b)
  assert int(skipped.step) == 3
  final = train.train_and_evaluate(config, str(tmp_path), data, quiet=True)["state"]
  assert all(np.isfinite(x).all() for x in _state_leaves(final))
  assert any((a != b).any() for a, b in zip(_state_leaves(final), before))  # steps 4-6 trained
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if '"skipped"' in line]
  by_step = {r["step"]: r for r in records}
  assert by_step[3]["skipped"] == 1.0 and by_step[2]["skipped"] == 0.0 and by_step[4]["skipped"] == 0.0
  assert by_step[6]["skipped_total"] == 1.0


def test_consecutive_nan_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, planted):
  config = experiment(steps=10, checkpoint_every=1, keep_checkpoints=10, eval_every=100, log_every=1,
                      max_consecutive_skips=3)
  one_step = train.train_and_evaluate(config, str(tmp_path / "reference"), planted(config, []), stop_after=1,
                                      quiet=True)["state"]
  with pytest.raises(train.NonFiniteTraining, match=r"3 consecutive steps \(up to step 4\) had a non-finite loss "
                                                    r"or gradients \(train.max_consecutive_skips=3\).*run the same "
                                                    r"command to resume"):
    train.train_and_evaluate(config, str(tmp_path / "run"), planted(config, [2, 3, 4]), quiet=True)
  params, step = checkpoints.restore_params(str(tmp_path / "run"), config)
  assert step == 3  # the run stopped at step 4, before saving it (the skip is counted before each save)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(one_step.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the parameters after step 1, the last good one
