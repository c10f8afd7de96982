"""d3pm-eval on trained tiny runs: the AR likelihood equals a direct computation over the same windows, the
interval and byte counts are consistent, the D3PM run reports its exact bound and the continuous bound beside it."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from d3pm_jax.evaluation.eval_workdir import evaluate_workdir
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.training import checkpoints, train

from test_compare import assert_real_png
from test_train import ROOT, experiment


def direct_ar_nats(config, params, tokens_NxL, weights_NxL):
  """The causal model's NLL of ``tokens``, position by position in float64 numpy."""
  bos = config.model.vocab_size - 1
  inputs = np.concatenate([np.full((tokens_NxL.shape[0], 1), bos), tokens_NxL[:, :-1]], axis=1)
  logits = np.asarray(Transformer(config.model).apply({"params": params}, jnp.asarray(inputs)), np.float64)[..., :bos]
  log_p = scipy.special.log_softmax(logits, axis=-1)
  return -(np.take_along_axis(log_p, tokens_NxL[..., None], -1)[..., 0] * weights_NxL).sum()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  runs = {}
  for arg in ("autoregressive", "absorbing_d3pm"):
    workdir = str(tmp_path_factory.mktemp(arg))
    train.train_and_evaluate(experiment(arg, steps=3, eval_every=3, checkpoint_every=3), workdir, quiet=True)
    runs[arg] = workdir
  return runs


def test_autoregressive_likelihood_equals_a_direct_computation(trained):
  workdir = trained["autoregressive"]
  result = evaluate_workdir(workdir, batch=8, max_windows=20)
  config = checkpoints.load_experiment(workdir)
  params, step = checkpoints.restore_params(workdir, config)
  assert result["checkpoint_step"] == step == 3 and result["windows"] == 20
  # The same 20 windows, scored position by position with the causal model.
  from d3pm_jax.data import pipeline
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, workdir)
  rows = np.linspace(0, data.val_windows.shape[0] - 1, 20).round().astype(int)
  windows, weights = data.val_windows[rows], data.val_weights[rows]
  nats = direct_ar_nats(config, params, windows, weights)
  like = result["likelihood"]
  assert like["tokens"] == int(weights.sum())
  assert like["bits_per_token"] == pytest.approx(nats / weights.sum() / math.log(2.0), rel=1e-5)
  assert like["bits_per_byte"] == pytest.approx(like["bits_per_token"], rel=1e-12)  # bytes: one token, one byte
  assert 0 < like["bits_per_token_95"] < 1.0
  assert "loss_by_time" not in result
  assert json.load(open(os.path.join(workdir, "eval.json")))["likelihood"] == like


def test_d3pm_run_reports_its_exact_bound_and_the_continuous_bound(trained):
  workdir = trained["absorbing_d3pm"]
  result = evaluate_workdir(workdir, batch=8, max_windows=32, exact_windows=16, time_samples=4)
  assert result["bound"] == "exact discrete-time VLB (T = 50)"
  exact, continuous = result["likelihood"], result["continuous_bound"]
  assert (exact["sequences"], continuous["sequences"], result["exact_windows"]) == (16, 32, 16)
  # The exact bound covers 16 windows spread over the 32 (ends included); eval_windows.npz lines the nats up with
  # the split's rows.
  saved = np.load(os.path.join(workdir, "eval_windows.npz"))
  subset = np.linspace(0, 31, 16).round().astype(int)
  assert np.array_equal(np.flatnonzero(~np.isnan(saved["nats"])), subset)
  config = checkpoints.load_experiment(workdir)
  from d3pm_jax.data import pipeline
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, workdir)
  assert np.array_equal(saved["tokens"], data.val_weights[saved["rows"]].sum(axis=1))
  assert exact["tokens"] == saved["tokens"][subset].sum() and continuous["tokens"] == saved["tokens"].sum()
  # Both bound the same network's NLL; an untrained network's two bounds agree to within their noise.
  assert abs(exact["bits_per_token"] - continuous["bits_per_token"]) < (
      exact["bits_per_token_95"] + continuous["bits_per_token_95"])
  assert sum(result["loss_by_time"]["draws"]) == 32 * 4  # every window's four stratified times are binned
  assert_real_png(os.path.join(workdir, "loss_vs_t.png"))


def test_cli_prints_the_table(trained):
  out = subprocess.run([sys.executable, "-m", "d3pm_jax.cli.eval", f"--workdir={trained['absorbing_d3pm']}",
                        "--quick", f"--evaluator={trained['autoregressive']}", "--sample_steps=2,4", "--frontier",
                        "--frontier_temperatures=0.9,1.1", "--frontier_top_p=0.9"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "exact discrete-time VLB (T = 50)" in out.stdout and "continuous-time bound (ctmc)" in out.stdout
  assert "64 of" in out.stdout and "scored by this project's autoregressive baseline" in out.stdout
  assert "    2 steps: gen-ppl" in out.stdout and "    4 steps: gen-ppl" in out.stdout
  assert "8 windows, 8 steps, ancestral: token accuracy" in out.stdout and ", confidence: token accuracy" in out.stdout
  assert "frontier at 8 steps, 4 samples each" in out.stdout and "temperature 1.00, top_p 0.90: gen-ppl" in out.stdout
  assert "gen-ppl at the data's entropy: " in out.stdout and "the evaluator's own samples: gen-ppl" in out.stdout
  assert_real_png(os.path.join(trained["absorbing_d3pm"], "frontier.png"))
  bad = subprocess.run([sys.executable, "-m", "d3pm_jax.cli.eval", "--workdir=/nonexistent"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
  assert bad.returncode != 0 and "is /nonexistent a d3pm-train workdir" in bad.stderr


def test_generation_is_scored_by_the_evaluator(trained):
  from d3pm_jax.evaluation.eval_workdir import generation_quality, load_evaluator
  from d3pm_jax.training import state
  workdir, evaluator = trained["absorbing_d3pm"], trained["autoregressive"]
  config = checkpoints.load_experiment(workdir)
  params, _ = checkpoints.restore_params(workdir, config)
  model, process = Transformer(config.model), state.build_process(config.process, config.model)
  out, samples = generation_quality(config, model, process, params, load_evaluator(config, evaluator), [2, 8],
                                    num_samples=6)
  assert sorted(out["by_steps"]) == ["2", "8"] and out["evaluator"]["checkpoint_step"] == 3
  ev_config = checkpoints.load_experiment(evaluator)
  ev_params, _ = checkpoints.restore_params(evaluator, ev_config)
  for steps, tokens in samples.items():
    assert tokens.shape == (6, config.data.seq_len) and tokens.max() < ev_config.model.vocab_size - 1
    nats = direct_ar_nats(ev_config, ev_params, tokens, np.ones(tokens.shape))
    got = out["by_steps"][str(steps)]
    assert got["gen_ppl"] == pytest.approx(math.exp(nats / tokens.size), rel=1e-4)
    assert got["samples_per_second"] > 0 and 0 < got["unigram_entropy"] <= 8
  with pytest.raises(ValueError, match="must be an autoregressive baseline's workdir"):
    load_evaluator(config, workdir)


def test_the_d3pm_figures_are_the_public_losses_at_the_runs_T(trained):
  """``evaluate_workdir``'s D3PM figures recomputed through the public functions at the evaluator's keys (the
  batch of windows [i, i + batch) at ``fold_in(key, i)``, the exact bound's under ``fold_in(key, 1)``): the exact
  bound is ``losses.d3pm_vlb_exact`` at the run's T = 50, the label says so, and the same windows at T = 25 give
  another figure; the continuous bound is ``evaluate.continuous_nelbo``. Mutation: evaluating at another T than
  the config's (the label would still say 50)."""
  import jax
  from d3pm_jax import losses
  from d3pm_jax.data import pipeline
  from d3pm_jax.evaluation import evaluate
  from d3pm_jax.training import state
  workdir = trained["absorbing_d3pm"]
  result = evaluate_workdir(workdir, batch=8, max_windows=16, exact_windows=8, time_samples=2, infill_windows=0)
  assert result["bound"] == "exact discrete-time VLB (T = 50)"
  config = checkpoints.load_experiment(workdir)
  params, _ = checkpoints.restore_params(workdir, config)
  model, process = Transformer(config.model), state.build_process(config.process, config.model)
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, workdir)
  rows = pipeline.spread_rows(len(data.val_windows), 16)
  windows, weights = jnp.asarray(data.val_windows[rows]), jnp.asarray(data.val_weights[rows])
  logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B)
  key = jax.random.PRNGKey(0)
  subset = pipeline.spread_rows(16, 8)

  def exact_bits(num_steps):
    nats = losses.d3pm_vlb_exact(process, logits_fn, jax.random.fold_in(jax.random.fold_in(key, 1), 0),
                                 windows[subset], num_steps, weights[subset])
    return float(nats.sum() / weights[subset].sum() / math.log(2.0))

  assert result["likelihood"]["bits_per_token"] == pytest.approx(exact_bits(50), rel=1e-5)
  assert abs(exact_bits(25) - exact_bits(50)) > 1e-3
  continuous = sum(float(evaluate.continuous_nelbo(process, logits_fn, jax.random.fold_in(key, i), windows[i:i + 8],
                                                   num_time_samples=2, kind="ctmc",
                                                   weights_BxL=weights[i:i + 8])["nelbo"].sum()) for i in (0, 8))
  assert result["continuous_bound"]["bits_per_token"] == pytest.approx(
      continuous / float(weights.sum()) / math.log(2.0), rel=1e-5)


def test_generation_rows_sample_as_the_sampler_options_say(trained, monkeypatch):
  """``sampler`` options reach the generation rows' sampler (threshold decoding in 2 blocks is traced for them)
  and are recorded in the settings; an evaluation without them records no 'sampler' key, so evaluations made
  before the option existed still match their settings."""
  from d3pm_jax import sampling
  traced = []
  original = sampling._threshold
  monkeypatch.setattr(sampling, "_threshold", lambda *a, **k: traced.append(a[6]) or original(*a, **k))
  options = {"strategy": "threshold", "threshold": 0.0, "num_blocks": 2}
  common = dict(batch=8, max_windows=8, exact_windows=8, time_samples=2, sample_steps=[4], num_samples=4,
                infill_windows=0, evaluator=trained["autoregressive"])
  result = evaluate_workdir(trained["absorbing_d3pm"], sampler=options, **common)
  assert result["settings"]["sampler"] == dict(sorted(options.items())) and "4" in result["generation"]["by_steps"]
  assert len(traced) == 2 and all(cfg.strategy == "threshold" for cfg in traced)  # one loop per block
  plain = evaluate_workdir(trained["absorbing_d3pm"], **common)
  assert "sampler" not in plain["settings"] and len(traced) == 2
