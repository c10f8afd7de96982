"""``d3pm-eval --workdir=DIR [--evaluator=AR_WORKDIR] [--time_samples K] [--batch B] [--max_windows N | --quick]``.

The likelihood of a trained run on its validation split (all of it unless capped), with a 95% interval over
sequences, and where in t the bits go; prints a table and writes ``workdir/eval.json``.
  continuous-time models   the Monte-Carlo NELBO with K stratified times per sequence, reconstruction and prior
                           included (``evaluate.continuous_nelbo``);
  D3PM (discrete time)     the exact full-T bound (``losses.d3pm_vlb_exact``: T network calls per window, so
                           ``--exact_windows`` caps it), and the continuous-time (CTMC) bound of the same network
                           beside it on every evaluated window;
  autoregressive           the exact NLL.
Bits per byte come from each window's decoded bytes, so byte-level and subword models compare on the same text.
With ``--evaluator=AR_WORKDIR`` (this project's AR baseline on the same data), samples at each of
``--sample_steps`` are scored: generative perplexity with the samples' unigram entropy beside it, and samples per
second. Infilling: a held-out span of validation windows (``--infill_start``, ``--infill_length``; default the
middle eighth) is filled by every sampling strategy the process supports, reporting token accuracy and, with an
evaluator, its perplexity of the filled windows. Runs on one process.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from d3pm_jax.eval_workdir import evaluate_workdir, format_table

_WORKDIR = flags.DEFINE_string("workdir", None, "A d3pm-train workdir.")
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
_EVALUATOR = flags.DEFINE_string("evaluator", None, "An autoregressive baseline's workdir trained on the same data: "
                                 "scores samples for generative perplexity (skipped when not given).")
_SAMPLE_STEPS = flags.DEFINE_list("sample_steps", ["16", "64", "256"], "Sampling step counts for generation.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 32, "Samples per step count.")
_INFILL_WINDOWS = flags.DEFINE_integer("infill_windows", 64, "Windows for infilling (0: skip).")
_INFILL_START = flags.DEFINE_integer("infill_start", -1, "First held-out position (-1: centre the span).")
_INFILL_LENGTH = flags.DEFINE_integer("infill_length", 0, "Held-out span length (0: an eighth of the window).")
_INFILL_STEPS = flags.DEFINE_integer("infill_steps", 64, "Sampling steps for infilling.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)

  def progress(label, done, total, seconds):
    print(f"\r{label}: {done}/{total} windows, {seconds:.0f} s", end="\n" if done == total else "",
          file=sys.stderr, flush=True)

  try:
    result = evaluate_workdir(_WORKDIR.value, time_samples=4 if _QUICK.value else _TIME_SAMPLES.value,
                              batch=_BATCH.value, max_windows=64 if _QUICK.value else _MAX_WINDOWS.value,
                              exact_windows=16 if _QUICK.value else _EXACT_WINDOWS.value,
                              use_ema=_EMA.value, seed=_SEED.value, num_bins=_BINS.value, progress=progress,
                              evaluator=_EVALUATOR.value, sample_steps=[int(k) for k in _SAMPLE_STEPS.value],
                              num_samples=4 if _QUICK.value else _NUM_SAMPLES.value,
                              infill_windows=8 if _QUICK.value else _INFILL_WINDOWS.value,
                              infill_start=_INFILL_START.value, infill_length=_INFILL_LENGTH.value,
                              infill_steps=8 if _QUICK.value else _INFILL_STEPS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(format_table(result))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
