"""The evaluation flags that ``d3pm-eval`` and ``d3pm-compare`` share (defined once: absl refuses a flag defined
twice in one process), and the ``eval_workdir.evaluate_workdir`` keyword arguments they make. The generation
rows sample as the sampler flags say (``sampler_flags``: --strategy, --threshold, --remask, --cache...)."""
from __future__ import annotations

import sys
import time

from absl import flags

from d3pm_jax.cli import sampler_flags

flags.adopt_module_key_flags(sampler_flags)  # the commands that adopt these flags list the sampler's too

_TIME_SAMPLES = flags.DEFINE_integer("time_samples", 16, "Stratified times per sequence (continuous bounds).")
_BATCH = flags.DEFINE_integer("batch", 32, "Windows per evaluation batch.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 0, "Evaluate this many windows spread over the split (0: all).")
_EXACT_WINDOWS = flags.DEFINE_integer("exact_windows", 0, "D3PM runs: the exact bound (T network calls per window) "
                                     "on this many of the evaluated windows (0: all); the continuous bound covers all.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 64 windows (16 for an exact D3PM bound), 4 time samples, "
                            "4 samples per step count, 8 infilling windows of 8 steps.")
_EMA = flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the Monte-Carlo draws.")
_BINS = flags.DEFINE_integer("bins", 10, "Bins of t for the loss-by-time curve.")
_SAMPLE_STEPS = flags.DEFINE_list("sample_steps", ["16", "64", "256"], "Sampling step counts for generation.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 32, "Samples per step count.")
_INFILL_WINDOWS = flags.DEFINE_integer("infill_windows", 64, "Windows for infilling (0: skip).")
_INFILL_START = flags.DEFINE_integer("infill_start", -1, "First held-out position (-1: centre the span).")
_INFILL_LENGTH = flags.DEFINE_integer("infill_length", 0, "Held-out span length (0: an eighth of the window).")
_INFILL_STEPS = flags.DEFINE_integer("infill_steps", 64, "Sampling steps for infilling.")
_FRONTIER = flags.DEFINE_bool("frontier", False, "Also sweep temperature and nucleus p and report the generative "
                               "frontier (gen-ppl vs unigram entropy; needs an evaluator).")
_FRONTIER_TEMPERATURES = flags.DEFINE_list("frontier_temperatures", ["0.7", "0.85", "1.0", "1.15", "1.3", "1.5"],
                                           "Temperatures of the frontier sweep (at nucleus 1).")
_FRONTIER_TOP_P = flags.DEFINE_list("frontier_top_p", ["0.8", "0.9", "0.95"],
                                    "Nucleus p values of the frontier sweep (at temperature 1).")
_FRONTIER_STEPS = flags.DEFINE_integer("frontier_steps", 64, "Sampling steps of the frontier's diffusion samples.")
_SPLIT = flags.DEFINE_string("split", "validation", "The held-out split to evaluate on: validation, or a prepared "
                             "data set's other splits (text8: test, where its published figures are).")


def eval_kwargs() -> dict:
  """The flags' values as ``evaluate_workdir`` keyword arguments (``--quick`` caps the work), with a progress
  line on stderr."""
  quick = _QUICK.value
  try:
    steps = [int(k) for k in _SAMPLE_STEPS.value]
  except ValueError as e:
    raise ValueError(f"--sample_steps must be integers; got {_SAMPLE_STEPS.value}") from e
  try:
    temperatures = [float(x) for x in _FRONTIER_TEMPERATURES.value]
    top_ps = [float(x) for x in _FRONTIER_TOP_P.value]
  except ValueError as e:
    raise ValueError(f"--frontier_temperatures and --frontier_top_p must be numbers; got "
                     f"{_FRONTIER_TEMPERATURES.value}, {_FRONTIER_TOP_P.value}") from e
  return {"frontier": _FRONTIER.value, "frontier_temperatures": temperatures, "frontier_top_p": top_ps,
          "frontier_steps": 8 if quick else _FRONTIER_STEPS.value,
          "time_samples": 4 if quick else _TIME_SAMPLES.value, "batch": _BATCH.value,
          "max_windows": 64 if quick else _MAX_WINDOWS.value, "exact_windows": 16 if quick else _EXACT_WINDOWS.value,
          "use_ema": _EMA.value, "seed": _SEED.value, "num_bins": _BINS.value, "sample_steps": steps,
          "num_samples": 4 if quick else _NUM_SAMPLES.value, "infill_windows": 8 if quick else _INFILL_WINDOWS.value,
          "infill_start": _INFILL_START.value, "infill_length": _INFILL_LENGTH.value,
          "infill_steps": 8 if quick else _INFILL_STEPS.value, "split": _SPLIT.value, "progress": progress,
          "sampler": sampler_flags.sampler_kwargs(only_set=True)}


_last_shown = [0.0]


def progress(label: str, done: int, total: int, seconds: float) -> None:
  """A progress line on stderr, redrawn at most every 2 s (and at the end), so logs stay short."""
  now = time.monotonic()
  if done < total and now - _last_shown[0] < 2.0:
    return
  _last_shown[0] = now
  print(f"\r{label}: {done}/{total} windows, {seconds:.0f} s", end="\n" if done == total else "",
        file=sys.stderr, flush=True)
