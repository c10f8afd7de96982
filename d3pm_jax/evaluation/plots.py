"""PNG plots of evaluations (matplotlib, no display needed): validation loss vs tokens seen, generative perplexity
vs sampling steps, the loss by diffusion time, and generative frontiers (gen-ppl vs unigram entropy). Each takes
``{run name: data}`` and writes one file; ``colors`` (``{run name: colour}``, e.g. from ``run_colors``) keeps a
run's colour the same across plots."""
from __future__ import annotations

import contextlib


def run_colors(names) -> dict:
  """One colour of matplotlib's default cycle per run, in order."""
  cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
  return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


@contextlib.contextmanager
def _figure(path: str, title: str, xlabel: str, ylabel: str):
  import matplotlib  # imported here: only reports need it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  try:
    yield ax
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
    else:
      ax.text(0.5, 0.5, "nothing to plot", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


def validation_curves(path: str, curves: dict, colors: dict | None = None) -> None:
  """``curves``: ``{name: {"tokens": [...], "bits_per_token": [...]}}``."""
  colors = colors or run_colors(curves)
  with _figure(path, "Validation loss vs tokens seen", "training tokens seen",
               "validation bits per token (train-time estimate)") as ax:
    for name, curve in curves.items():
      ax.plot(curve["tokens"], curve["bits_per_token"], marker="o", label=name, color=colors[name])


def generation_by_steps(path: str, by_run: dict, colors: dict | None = None) -> None:
  """``by_run``: ``{name: {steps: {"gen_ppl": p, "gen_ppl_95": [lo, hi]}}}``, steps on a log axis, with the
  intervals."""
  import matplotlib.ticker

  colors = colors or run_colors(by_run)
  with _figure(path, "Generative perplexity vs sampling steps", "sampling steps (the AR baseline: one per token)",
               "generative perplexity under the AR evaluator") as ax:
    for name, by_steps in by_run.items():
      steps = sorted(int(k) for k in by_steps)
      ppl = [by_steps[str(k)]["gen_ppl"] for k in steps]
      low = [p - by_steps[str(k)]["gen_ppl_95"][0] for p, k in zip(ppl, steps)]
      high = [by_steps[str(k)]["gen_ppl_95"][1] - p for p, k in zip(ppl, steps)]
      ax.errorbar(steps, ppl, yerr=[low, high], marker="o", capsize=3, label=name, color=colors[name])
    ax.set(xscale="log")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({int(k) for b in by_run.values() for k in b})))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def loss_by_time(path: str, by_run: dict, colors: dict | None = None) -> None:
  """``by_run``: ``{name: evaluate.loss_by_time(...)}``: the ELBO integrand by bin of t."""
  colors = colors or run_colors(by_run)
  with _figure(path, "Where in t each process spends its bits", "diffusion time t",
               "ELBO integrand, bits per token") as ax:
    for name, bins in by_run.items():
      centres = [(a + b) / 2 for a, b in zip(bins["edges"], bins["edges"][1:])]
      ax.plot(centres, bins["bits_per_token"], marker="o", label=name, color=colors[name])


def frontier(path: str, by_run: dict, colors: dict | None = None) -> None:
  """``by_run``: ``{name: eval_workdir.generation_frontier(...)}``: gen-ppl against unigram entropy, one line per
  run through its temperature sweep (dashed: its nucleus sweep), the validation text's entropy as a vertical line
  and the AR evaluator's own samples as a star."""
  colors = colors or run_colors(by_run)
  with _figure(path, "Generative frontier: gen-ppl vs unigram entropy of the samples",
               "unigram entropy of the samples (bits)", "generative perplexity under the AR evaluator") as ax:
    marks = None
    for name, fr in by_run.items():
      tempered = sorted((p["unigram_entropy"], p["gen_ppl"]) for p in fr["points"] if p["top_p"] == 1.0)
      nucleus = sorted((p["unigram_entropy"], p["gen_ppl"]) for p in fr["points"] if p["temperature"] == 1.0)
      if tempered:
        ax.plot(*zip(*tempered), "-o", color=colors[name], label=name)
      if len(nucleus) > 1:
        ax.plot(*zip(*nucleus), "--.", color=colors[name])
      marks = marks or fr
    if marks is not None and marks.get("data_entropy") is not None:
      ax.axvline(marks["data_entropy"], color="k", ls=":",
                 label="data's entropy at the samples' size" if "data_entropy_std" in marks
                 else "validation text's entropy")
    if marks is not None and "evaluator_own_samples" in marks:
      own = marks["evaluator_own_samples"]
      ax.plot([own["unigram_entropy"]], [own["gen_ppl"]], "k*", markersize=12, label="AR evaluator's own samples")
    ax.set(yscale="log")
