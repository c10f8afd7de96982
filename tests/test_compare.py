"""d3pm-compare on a micro budget (the tiny test config, absorbing diffusion and the AR baseline): it resumes an
unfinished run, writes the tables and three real PNGs, and a second run (here through the CLI) trains and
evaluates nothing, checked through the runs' step counters and logs rather than timing."""
import json
import os
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from d3pm_jax.evaluation import compare, evaluate
from d3pm_jax.training import checkpoints, train

from test_train import ROOT, experiment

CONFIGS = [str(ROOT / "configs" / "test.py"), str(ROOT / "configs" / "test.py") + ":autoregressive",
           str(ROOT / "configs" / "test.py") + ":absorbing_d3pm"]
OVERRIDES = ["train.eval_every=2"]
SETTINGS = {"max_windows": 24, "batch": 8, "time_samples": 2, "sample_steps": [2, 4], "num_samples": 4,
            "infill_windows": 4, "infill_steps": 4, "frontier": True, "frontier_temperatures": [0.8, 1.2],
            "frontier_top_p": [0.9], "frontier_steps": 4}


def counters(workdir):
  """Per run: the latest checkpoint's step, the lines of metrics.jsonl, and eval.json's bytes."""
  out = {}
  for name in ("test", "test_autoregressive"):
    sub = os.path.join(workdir, name)
    with open(os.path.join(sub, "metrics.jsonl")) as f, open(os.path.join(sub, "eval.json")) as g:
      out[name] = (checkpoints.read_progress(sub)["step"], len(f.readlines()), g.read())
  return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare"))
  # An unfinished run already in place: 2 of the 4 steps.
  train.train_and_evaluate(experiment(eval_every=2), os.path.join(workdir, "test"), stop_after=2, quiet=True)
  logged = []
  summary = compare.compare(CONFIGS, workdir, overrides=OVERRIDES, eval_settings=SETTINGS, log=logged.append)
  return workdir, summary, logged


@pytest.mark.slow
def test_compare_resumes_trains_and_evaluates_every_run(compared):
  workdir, summary, logged = compared
  runs = summary["runs"]
  assert (runs["test"]["status"], runs["test_autoregressive"]["status"]) == ("resumed", "trained")
  assert any("resuming from step 2" in line for line in logged)
  assert all(run["evaluated"] and run["steps"] == 4 for run in runs.values())
  assert runs["test"]["tokens_seen"] == 4 * 4 * 16 and runs["test"]["params"] > 0
  assert runs["test"]["train_seconds"] > 0
  # The AR run is the evaluator and the reference; both runs were evaluated with the same settings.
  assert summary["reference"] == "test_autoregressive"
  assert summary["evaluator"] == os.path.join(workdir, "test_autoregressive")
  evals = [json.load(open(os.path.join(workdir, n, "eval.json"))) for n in runs]
  assert evals[0]["settings"] == evals[1]["settings"] and evals[0]["settings"]["max_windows"] == 24
  assert all(e["generation"]["evaluator"]["workdir"] == summary["evaluator"] for e in evals)
  # The validation curve of the resumed run holds every evaluation (steps 2 and 4), logged by both sessions.
  curve = compare._validation_curve(os.path.join(workdir, "test"), experiment())
  assert curve["tokens"] == [2 * 64, 4 * 64]


def test_a_training_stopped_on_request_stops_the_comparison(tmp_path, monkeypatch):
  """SIGTERM during a run's training (a cluster reclaiming the machine) saves that run's step and ends the
  comparison: before, the next run started training and the signal was lost."""
  monkeypatch.setenv("D3PM_FAULT", "TERM:step_dispatched:2")
  with pytest.raises(compare.Preempted, match="test stopped at step 2 of 4 on request"):
    compare.compare(CONFIGS[:2], str(tmp_path), overrides=OVERRIDES, eval_settings=SETTINGS, log=lambda _: None)
  assert checkpoints.read_progress(str(tmp_path / "test"))["step"] == 2
  assert not (tmp_path / "test_autoregressive").exists()


def test_paired_difference_is_the_difference_on_common_windows(compared):
  workdir, summary, _ = compared
  a = np.load(os.path.join(workdir, "test", "eval_windows.npz"))
  b = np.load(os.path.join(workdir, "test_autoregressive", "eval_windows.npz"))
  assert np.array_equal(a["rows"], b["rows"]) and np.array_equal(a["bytes"], b["bytes"])
  versus = summary["runs"]["test"]["versus_reference"]
  ea = json.load(open(os.path.join(workdir, "test", "eval.json")))["likelihood"]
  eb = json.load(open(os.path.join(workdir, "test_autoregressive", "eval.json")))["likelihood"]
  # On the same windows the difference of the bounds is the difference of the two runs' own figures...
  assert versus["bits_per_byte"] == pytest.approx(ea["bits_per_byte"] - eb["bits_per_byte"], abs=1e-9)
  assert versus["windows"] == 24
  # ...and its interval is the paired one: the standard error of per-window differences, not of either run.
  diff = a["nats"] - b["nats"]
  per_window = diff / a["bytes"]
  assert versus["bits_per_byte_95"] == pytest.approx(
      evaluate.ratio_mean_interval(diff, a["bytes"], a["documents"])[1] / np.log(2.0), rel=1e-9)
  assert versus["bits_per_byte_95"] < ea["bits_per_byte_95"] + eb["bits_per_byte_95"]
  assert np.std(per_window) > 0


def test_a_d3pm_run_reports_exact_minus_continuous_and_its_continuous_bound_on_every_window(compared):
  """The D3PM run (exact bound on all 24 windows here): the gap line is its exact bound minus its continuous
  bound, window by window over the bytes (recomputed from eval_windows.npz), and its continuous-time row and
  paired difference cover every evaluated window. Mutations: the gap's sign reversed; the continuous row read
  from the exact subset."""
  workdir, summary, _ = compared
  run = summary["runs"]["test_absorbing_d3pm"]
  saved = np.load(os.path.join(workdir, "test_absorbing_d3pm", "eval_windows.npz"))
  gap = run["exact_minus_continuous"]
  assert gap["windows"] == 24
  assert gap["bits_per_byte"] == pytest.approx(
      (saved["nats"] - saved["continuous_nats"]).sum() / saved["bytes"].sum() / np.log(2.0), rel=1e-9)
  assert run["continuous_versus_reference"]["windows"] == 24
  result = json.load(open(os.path.join(workdir, "test_absorbing_d3pm", "eval.json")))
  assert result["continuous_bound"]["sequences"] == 24
  report = open(os.path.join(workdir, "report.md")).read()
  assert re.search(r"\| test_absorbing_d3pm \| absorbing \(d3pm\) \| continuous-time bound \(ctmc, K = 2\) \| "
                   r"24 \(\d+\) \|", report)
  assert ("`test_absorbing_d3pm`: its exact discrete-time bound minus its continuous-time bound on the same 24 "
          "windows") in report


def test_report_has_the_tables_and_real_plots(compared):
  workdir, _, _ = compared
  report = open(os.path.join(workdir, "report.md")).read()
  for heading in ("## Likelihood on the validation split", "## Budget", "## Generation", "## Infilling"):
    assert heading in report
  assert re.search(r"\| test_autoregressive \| autoregressive \(ar\) \| exact NLL \| 24 \(\d+\) \|", report)
  assert "| test | 2 |" in report and "| test | 4 |" in report  # gen-ppl at both step counts
  assert "| test | confidence |" in report and "(reference)" in report
  for name in compare.PLOTS + (compare.FRONTIER_PLOT,):
    assert f"]({name})" in report
    assert_real_png(os.path.join(workdir, name))
  # The reconstruction term of each continuous bound is shown (absorbing: ~eps of the bits, so near 0).
  recon = json.load(open(os.path.join(workdir, "test", "eval.json")))["reconstruction_bits_per_byte"]
  assert 0 <= recon < 0.01 and f"`test` {recon:.4f}" in report
  # The frontier section has a row per run, and its figures are the eval.json ones; it names the diffusion runs'
  # frontier steps (not the AR run's one step per token, 16, which it once printed).
  assert "## Generative frontiers" in report and "4 steps for diffusion runs" in report
  for name in ("test", "test_autoregressive", "test_absorbing_d3pm"):
    fr = json.load(open(os.path.join(workdir, name, "eval.json")))["frontier"]
    assert [(p["temperature"], p["top_p"]) for p in fr["points"]] == [(0.8, 1.0), (1.2, 1.0), (1.0, 0.9)]
    assert f"| {name} | " in report.split("## Generative frontiers")[1]


def assert_real_png(path):
  """The file decodes as an image with axes, text and coloured curves on a white ground."""
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 300 and image.shape[1] > 500
  rgb = image[..., :3]
  ink = np.any(rgb < 0.9, axis=-1)  # not white: axes, text, lines
  assert 0.01 < ink.mean() < 0.5
  # The curves are drawn in colour (matplotlib's default cycle), not only black axes and text.
  coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
  assert coloured.sum() > 200, path


def test_running_again_trains_and_evaluates_nothing(compared):
  workdir, _, _ = compared
  before = counters(workdir)
  report = open(os.path.join(workdir, "report.md")).read()
  flags = [f"--configs={','.join(CONFIGS)}", f"--workdir={workdir}", f"--override={','.join(OVERRIDES)}"]
  flags += [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in SETTINGS.items()]
  out = subprocess.run([sys.executable, "-m", "d3pm_jax.cli.compare", *flags], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "test: reused, evaluation reused" in out.stdout
  assert "test_autoregressive: reused, evaluation reused" in out.stdout
  assert counters(workdir) == before
  assert open(os.path.join(workdir, "report.md")).read() == report


def test_compare_refuses_configs_over_different_data(tmp_path):
  with pytest.raises(ValueError, match="must read the same data"):
    compare.compare([CONFIGS[0], str(ROOT / "configs" / "stdlib_ar.py")], str(tmp_path))  # seq_len 16 vs 128


def test_bad_overrides_and_settings_name_the_valid_choices(tmp_path):
  _, cfg = compare.load_config_file(CONFIGS[0])
  with pytest.raises(ValueError, match=r"no key 'train.stepz'.*'steps'"):
    compare.apply_overrides(cfg, ["train.stepz=3"])
  with pytest.raises(ValueError, match=r"no section 'trian'.*'train'"):
    compare.apply_overrides(cfg, ["trian.steps=3"])
  compare.apply_overrides(cfg, ["train.steps=7", "process.schedule=cosine"])
  assert (cfg.train.steps, cfg.process.schedule) == (7, "cosine")
  with pytest.raises(ValueError, match="unknown evaluation settings.*time_samples"):
    compare.eval_settings_with_defaults({"time_sample": 3})
  with pytest.raises(ValueError, match="config files"):
    compare.load_config_file("configs/nope.py")


def test_paired_difference_uses_common_windows_and_the_chosen_bound(tmp_path):
  """Two runs that evaluated overlapping rows, one with NaN where its exact bound was not computed: the
  difference covers the rows both have, of the chosen bound, in bits per byte."""
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  np.savez(a / "eval_windows.npz", rows=np.array([0, 2, 4, 6]), bytes=np.array([10, 20, 30, 40]),
           nats=np.array([5.0, np.nan, 9.0, 12.0]), continuous_nats=np.array([4.0, 6.0, 8.0, 11.0]),
           tokens=np.array([10, 20, 30, 40]), documents=np.arange(4))
  np.savez(b / "eval_windows.npz", rows=np.array([2, 4, 6, 8]), bytes=np.array([20, 30, 40, 50]),
           nats=np.array([3.0, 7.0, 7.0, 1.0]), continuous_nats=np.full(4, np.nan), tokens=np.array([20, 30, 40, 50]),
           documents=np.arange(4))
  headline = compare.paired_difference(str(a), str(b))  # rows 4 and 6 (row 2 is NaN in a)
  assert headline["windows"] == 2
  assert headline["bits_per_byte"] == pytest.approx(((9 - 7) + (12 - 7)) / 70 / np.log(2))
  continuous = compare.paired_difference(str(a), str(b), "continuous_nats", "nats")  # rows 2, 4, 6
  assert continuous["windows"] == 3
  assert continuous["bits_per_byte"] == pytest.approx(((6 - 3) + (8 - 7) + (11 - 7)) / 90 / np.log(2))
  own_gap = compare.paired_difference(str(a), str(a), "nats", "continuous_nats")  # rows 0, 4, 6
  assert own_gap["bits_per_byte"] == pytest.approx(3.0 / 80 / np.log(2))
  assert compare.paired_difference(str(a), str(b), "nats", "continuous_nats") is None  # b has no continuous nats


def test_a_block_diffusion_runs_prefix_completion_has_its_section(compared):
  """A run with prefix completion (block diffusion's stand-in for infilling) gets a table row per strategy with
  its figures; the other runs get none."""
  workdir, summary, _ = compared
  results = {n: json.load(open(os.path.join(workdir, n, "eval.json"))) for n in summary["runs"]}
  results["test"]["prefix_completion"] = {"windows": 3, "steps": 5, "prompt_tokens": 8, "by_strategy": {
      "ancestral": {"accuracy": 0.25, "unigram_entropy": 3.5, "evaluator_ppl": 12.5},
      "confidence": {"accuracy": 0.5, "unigram_entropy": 2.25}}}
  report = compare.format_report(summary, results)
  section = report.split("## Prefix completion (block diffusion)")[1].split("## Plots")[0]
  assert "first 8 tokens (whole blocks where half a window holds one) of 3 validation windows" in section
  assert "5 steps a block" in section
  assert "| test | ancestral | 0.2500 | 3.500 | 12.50 |" in section
  assert "| test | confidence | 0.5000 | 2.250 | - |" in section
  assert "test_autoregressive" not in section
