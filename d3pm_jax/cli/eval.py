"""``d3pm-eval --workdir=DIR [--evaluator=AR_WORKDIR] [--time_samples K] [--batch B] [--max_windows N | --quick]``.

The likelihood of a trained run on its validation split (or ``--split=test`` of prepared text8; all of it unless
capped), with a 95% interval over documents (``evaluate.summarize``), and where in t the bits go; prints a table
and writes ``workdir/eval.json``.
  continuous-time models   the Monte-Carlo NELBO with K stratified times per sequence, reconstruction and prior
                           included (``evaluate.continuous_nelbo``);
  D3PM (discrete time)     the exact full-T bound (``losses.d3pm_vlb_exact``: T network calls per window, so
                           ``--exact_windows`` caps it), and the continuous-time (CTMC) bound of the same network
                           beside it on every evaluated window;
  autoregressive           the exact NLL.
Bits per byte come from each window's decoded bytes, so byte-level and subword models compare on the same text.
Where the data set defines words (LM1B, both setups), perplexity per word is printed too: total nats over the
held-out sentences' whitespace-separated words plus one end per sentence, D3PM's unit on LM1B.
With ``--evaluator=AR_WORKDIR`` (this project's AR baseline on the same data), samples at each of
``--sample_steps`` are scored: generative perplexity with the samples' unigram entropy beside it, and samples per
second. Infilling: a held-out span of validation windows (``--infill_start``, ``--infill_length``; default the
middle eighth) is filled by every sampling strategy the process supports, reporting token accuracy and, with an
evaluator, its perplexity of the filled windows. Runs on one process.
"""
from __future__ import annotations

from absl import app, flags, logging

from d3pm_jax.cli import common, eval_flags
from d3pm_jax.evaluation.eval_workdir import evaluate_workdir, format_table

flags.adopt_module_key_flags(eval_flags)  # --help lists the shared evaluation flags too

_WORKDIR = flags.DEFINE_string("workdir", None, "A d3pm-train workdir.")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "An autoregressive baseline's workdir trained on the same data: "
                                 "scores samples for generative perplexity (skipped when not given).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)

  try:
    result = evaluate_workdir(_WORKDIR.value, evaluator=_EVALUATOR.value, **eval_flags.eval_kwargs())
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(format_table(result))


def run():
  common.run(main, "d3pm-eval")


if __name__ == "__main__":
  run()
