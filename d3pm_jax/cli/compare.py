"""``d3pm-compare --configs=a.py,b.py[:arg],... --workdir=DIR [--override=train.steps=300,...] [d3pm-eval flags]``.

Trains each config into ``DIR/<config name>`` at its own budget (a finished run is reused, an unfinished one
resumed from its checkpoint), evaluates every run with the same ``d3pm-eval`` settings (the flags below; an
evaluation of the same checkpoint with the same settings is reused), and writes ``DIR/report.md`` with the tables
and the PNG plots beside it (validation loss vs tokens seen, generative perplexity vs sampling steps, loss vs t,
and with ``--frontier`` every run's generative frontier on one plot, read at the data's entropy), plus
``DIR/compare.json`` and each run's ``DIR/<name>.eval.json``, from which the report renders. Samples are scored by the autoregressive run among the configs (else ``--evaluator``).
Running it again trains and evaluates nothing. Every config must read the same data; what else differs between
them is listed in the report. Runs on one process.
"""
from __future__ import annotations

from absl import app, flags, logging

from d3pm_jax.cli import common, eval_flags
from d3pm_jax.evaluation import compare

flags.adopt_module_key_flags(eval_flags)  # --help lists the shared evaluation flags too

_CONFIGS = flags.DEFINE_list("configs", None, "Config files, 'path.py' or 'path.py:arg', comma-separated.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The comparison's directory: one sub-workdir per config, the report.")
_OVERRIDES = flags.DEFINE_list("override", [], "section.key=value settings applied to every config (e.g. an "
                               "equal budget: train.steps=300).")
_EVALUATOR = flags.DEFINE_string("evaluator", None, "An AR baseline's workdir to score samples when no config is "
                                 "autoregressive.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the train loop's progress lines.")
flags.mark_flags_as_required(["configs", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.ERROR)  # orbax warns at every read-only checkpoint look-up
  try:
    summary = compare.compare(_CONFIGS.value, _WORKDIR.value, overrides=_OVERRIDES.value,
                              evaluator=_EVALUATOR.value, eval_settings=eval_flags.eval_kwargs(),
                              quiet=not _VERBOSE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  except compare.Preempted as e:  # SIGTERM or Ctrl-C: the run in training saved its step; nothing else starts
    print(f"stopped: {e}")
    return
  for name, run in summary["runs"].items():
    print(f"{name}: {run['status']}, {'evaluated' if run['evaluated'] else 'evaluation reused'}")
  print(f"report: {_WORKDIR.value}/report.md")


def run():
  common.run(main, "d3pm-compare")


if __name__ == "__main__":
  run()
