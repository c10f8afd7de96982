"""Comparing corruption processes (``d3pm-compare`` is the command line over it): each config trained at its own
budget into ``DIR/<name>`` (a finished run is reused, an unfinished one resumed), every run evaluated with the
same ``evaluate_workdir`` settings (an evaluation with the same settings of the same checkpoint is reused), and
``DIR/report.md`` written with its tables and PNG plots. Running it again trains and evaluates nothing.

Fairness is checked, not assumed: every config must read the same data (corpus, tokenizer, window length), and
whatever else differs between the configs (network, budget) is listed in the report. Likelihoods are also
compared window by window against a reference run (the AR baseline when there is one): the difference of two
runs on the same windows has a much narrower interval than either run's own, because the windows' difficulty
cancels.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform

import jax
import numpy as np

from d3pm_jax.evaluation import evaluate, plots
from d3pm_jax.evaluation.eval_workdir import evaluate_workdir, interval_statement
from d3pm_jax.models.transformer import Transformer, count_params
from d3pm_jax.training import checkpoints, metrics, state, train

PLOTS = ("val_loss_vs_tokens.png", "gen_ppl_vs_steps.png", "loss_vs_t.png")
FRONTIER_PLOT = "frontier.png"  # when the runs were evaluated with frontier=True


# ---------------------------------------------------------------- configs

def load_config_file(spec: str):
  """``"path/to/config.py[:arg]"`` -> ``(name, ConfigDict)``: the file's ``get_config(arg)``; the run's name is the
  file's stem, with ``_arg`` appended when an argument is given."""
  path, _, arg = spec.partition(":")
  if not path.endswith(".py") or not os.path.isfile(path):
    raise ValueError(f"--configs entries must be config files 'path.py[:arg]'; {spec!r} is not (no file {path!r})")
  module_spec = importlib.util.spec_from_file_location(f"d3pm_compare_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config(arg) function")
  stem = os.path.splitext(os.path.basename(path))[0]
  return (f"{stem}_{arg}" if arg else stem), module.get_config(arg or None)


def apply_overrides(cfg, overrides) -> None:
  """``["train.steps=100", ...]`` set on ``cfg`` (a ConfigDict) in place; values are Python literals or strings."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"an override must read section.key=value; got {item!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node, *path = key.split(".")
    target = cfg
    for part in [node] + path[:-1]:
      if part not in target:
        raise ValueError(f"override {item!r}: no section {part!r}; valid: {sorted(target.keys())}")
      target = target[part]
    if not path or path[-1] not in target:
      raise ValueError(f"override {item!r}: no key {key!r}; valid keys there: {sorted(target.keys())}")
    try:
      target[path[-1]] = value
    except TypeError as e:
      raise ValueError(f"override {item!r}: {e}") from e


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(configs: dict) -> dict:
  """``{key: {run: value}}`` for every config field (process fields excluded) on which the runs differ."""
  flat = {name: {k: v for k, v in _flatten(dataclasses.asdict(c)).items() if not k.startswith("process.")}
          for name, c in configs.items()}
  keys = sorted(set().union(*flat.values()))
  return {k: {name: f.get(k) for name, f in flat.items()} for k in keys
          if len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1}


# ---------------------------------------------------------------- training

class Preempted(Exception):
  """A run's training stopped on request (SIGTERM or Ctrl-C) with its checkpoint saved: the comparison stops
  too, and running it again resumes there."""


def ensure_trained(name: str, raw_config, workdir: str, quiet: bool = True, log=print):
  """Trains ``raw_config`` into ``workdir`` to its ``train.steps``: nothing when a checkpoint is already there,
  resumed from the latest checkpoint otherwise. Returns ``(config, status, data)`` with status 'reused', 'resumed'
  or 'trained'. A workdir holding another experiment is refused; a training stopped on request raises
  ``Preempted`` (the next run does not start)."""
  config, data = train.build_experiment(raw_config, workdir)
  progress = checkpoints.read_progress(workdir)
  if progress is not None:
    checkpoints.check_compatible(checkpoints.fingerprint(checkpoints.load_experiment(workdir)),
                                 checkpoints.fingerprint(config))
    if progress["step"] >= config.train.steps:
      return config, "reused", data
  log(f"{name}: {'resuming from step ' + str(progress['step']) if progress else 'training'} to step "
      f"{config.train.steps} in {workdir}")
  result = train.train_and_evaluate(config, workdir, data, quiet=quiet)
  if result["preempted"] is not None:
    raise Preempted(f"{name} stopped at step {result['preempted']} of {config.train.steps} on request; its "
                    f"checkpoint is saved in {workdir}: run the same command to resume")
  return config, ("resumed" if progress else "trained"), data


# ---------------------------------------------------------------- evaluation

def eval_settings_with_defaults(given: dict) -> dict:
  """``evaluate_workdir``'s keyword arguments: ``given`` over its defaults (so that two invocations that spell the
  same settings differently reuse one evaluation)."""
  params = inspect.signature(evaluate_workdir).parameters
  unknown = sorted(set(given) - set(params) - {"progress"})
  if unknown or "evaluator" in given:
    raise ValueError(f"unknown evaluation settings {unknown or ['evaluator']}; valid: "
                     f"{sorted(set(params) - {'workdir', 'evaluator'})}")
  out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty and k != "evaluator"}
  out.update(given)
  out["sample_steps"] = [int(k) for k in out["sample_steps"]]
  for key in ("frontier_temperatures", "frontier_top_p"):  # as evaluate_workdir records them
    out[key] = [float(x) for x in out[key]]
  return out


def ensure_evaluated(workdir: str, step: int, settings: dict, evaluator: str | None, evaluator_step: int | None,
                     log=print) -> tuple[dict, bool]:
  """``(result, evaluated)``: ``workdir``'s ``eval.json`` and False when it evaluated checkpoint ``step`` with
  these settings (and the evaluator's checkpoint ``evaluator_step``); otherwise a fresh ``evaluate_workdir`` and
  True."""
  path = os.path.join(workdir, "eval.json")
  wanted = {**_recorded(settings), "evaluator": os.path.abspath(evaluator) if evaluator else None}
  windows = os.path.join(workdir, "eval_windows.npz")
  if os.path.exists(path) and os.path.exists(windows) and "documents" in np.load(windows).files:
    with open(path) as f:  # (an evaluation from before windows recorded their documents is done again)
      old = json.load(f)
    same_evaluator = (evaluator is None or
                      old.get("generation", {}).get("evaluator", {}).get("checkpoint_step") == evaluator_step)
    if old.get("checkpoint_step") == step and old.get("settings") == wanted and same_evaluator:
      return old, False
  log(f"evaluating {workdir} (step {step})")
  return evaluate_workdir(workdir, evaluator=evaluator, **settings), True


def _recorded(settings: dict) -> dict:
  """The settings as ``eval.json`` records them: all but the progress callback, and the sampler's options only
  when some are given (``evaluate_workdir``)."""
  out = {k: v for k, v in settings.items() if k != "progress" and not (k == "sampler" and not v)}
  if out.get("sampler"):
    out["sampler"] = dict(sorted(out["sampler"].items()))
  return out


def paired_difference(workdir: str, reference: str, bound: str = "nats", reference_bound: str = "nats") -> dict | None:
  """The run's bound minus the reference's, in bits per byte (per token where bytes are tokens), over the
  windows both evaluated, with the 95% interval of the paired difference (paired per window, clustered by the
  windows' documents as ``evaluate.summarize`` is); None without two common windows.
  ``bound`` picks the per-window nats of ``eval_windows.npz``: ``nats`` (the headline bound) or
  ``continuous_nats``."""
  a = np.load(os.path.join(workdir, "eval_windows.npz"))
  b = np.load(os.path.join(reference, "eval_windows.npz"))
  _, ia, ib = np.intersect1d(a["rows"], b["rows"], return_indices=True)
  nats_a, nats_b = a[bound][ia], b[reference_bound][ib]
  keep = ~np.isnan(nats_a) & ~np.isnan(nats_b)
  if keep.sum() < 2:
    return None
  units, by_document = evaluate.interval_units(int(keep.sum()), a["documents"][ia][keep])
  value, half = evaluate.ratio_mean_interval(nats_a[keep] - nats_b[keep], a["bytes"][ia][keep], units)
  return {"bits_per_byte": value / math.log(2.0), "bits_per_byte_95": half / math.log(2.0),
          "windows": int(keep.sum()), "documents": int(np.unique(units).size) if by_document else None}


# ---------------------------------------------------------------- the comparison

def compare(config_specs, workdir: str, *, overrides=(), evaluator: str | None = None, eval_settings=None,
            quiet: bool = True, log=print) -> dict:
  """Trains (or reuses) every config in ``config_specs`` under ``workdir``, evaluates each with
  ``eval_settings`` (``evaluate_workdir`` keyword arguments), writes ``report.md``, ``compare.json`` and the
  plots. The evaluator of samples is the AR run among the configs, else ``evaluator``. Returns the summary
  written to ``compare.json``, with each run's 'status' ('trained', 'resumed' or 'reused') and 'evaluated'."""
  if not config_specs:
    raise ValueError("--configs needs at least one config file")
  os.makedirs(workdir, exist_ok=True)
  raw = {}
  for spec in config_specs:
    name, cfg = load_config_file(spec)
    if name in raw:
      raise ValueError(f"two configs are named {name!r}; each run needs its own sub-workdir")
    apply_overrides(cfg, overrides)
    raw[name] = (spec, cfg)
  data_specs = {name: json.dumps(cfg.data.to_dict(), sort_keys=True) for name, (_, cfg) in raw.items()}
  if len(set(data_specs.values())) > 1:
    raise ValueError("the configs must read the same data (every data.* field) to be compared; got "
                     + "; ".join(f"{name}: {d}" for name, d in data_specs.items()))

  summary_path = os.path.join(workdir, "compare.json")
  previous = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      previous = json.load(f)
  configs, runs = {}, {}
  for name, (spec, cfg) in raw.items():
    sub = os.path.join(workdir, name)
    configs[name], status, data = ensure_trained(name, cfg, sub, quiet=quiet, log=log)
    runs[name] = {"config": spec, "workdir": sub, "status": status}
  progress = {name: checkpoints.read_progress(run["workdir"]) for name, run in runs.items()}
  # The mark for the samples' unigram entropy: the validation text's own (the same data for every run).
  val_entropy = evaluate.validation_entropy(data, configs[name].model.vocab_size)
  machine = previous.get("machine")
  if machine is None or any(r["status"] != "reused" for r in runs.values()):
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
               "device": jax.devices()[0].device_kind, "matmul_gflops": round(metrics.matmul_peak(), 1)}

  ar_runs = [n for n, c in configs.items() if c.process.is_autoregressive]
  scorer = os.path.join(workdir, ar_runs[0]) if ar_runs else evaluator
  settings = eval_settings_with_defaults(eval_settings or {})
  scorer_step = (progress[ar_runs[0]]["step"] if ar_runs else
                 checkpoints.read_progress(evaluator)["step"] if evaluator else None)
  results = {}
  for name, run in runs.items():
    results[name], run["evaluated"] = ensure_evaluated(run["workdir"], progress[name]["step"], settings, scorer,
                                                       scorer_step, log=log)
  reference = ar_runs[0] if ar_runs else next(iter(runs))
  for name, run in runs.items():
    cfg, step = configs[name], progress[name]["step"]
    shapes = jax.eval_shape(lambda: state.init_state(cfg, Transformer(cfg.model), state.make_optimizer(cfg.train)))
    run.update(process=cfg.process.name, loss=cfg.process.loss, params=count_params(shapes.params), steps=step,
               tokens_seen=step * cfg.train.batch_size * cfg.data.seq_len,
               train_seconds=progress[name].get("train_seconds"),
               versus_reference=paired_difference(run["workdir"], os.path.join(workdir, reference)))
    if "continuous_bound" in results[name]:  # D3PM: how much looser the exact T-step bound is, window by window
      run["exact_minus_continuous"] = paired_difference(run["workdir"], run["workdir"], "nats", "continuous_nats")
      run["continuous_versus_reference"] = paired_difference(run["workdir"], os.path.join(workdir, reference),
                                                             "continuous_nats", "nats")
  summary = {"runs": runs, "run_order": list(runs), "reference": reference, "machine": machine,
             "evaluator": scorer, "validation_unigram_entropy": val_entropy,
             "differences": differences(configs), "eval_settings": _recorded(settings)}
  curves = {name: _validation_curve(run["workdir"], configs[name]) for name, run in runs.items()}
  write_plots(workdir, results, curves)
  for name, result in results.items():  # the figures behind the report, beside it
    with open(os.path.join(workdir, f"{name}.eval.json"), "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(render_report(workdir))
  return summary


def render_report(directory: str) -> str:
  """``report.md`` rendered from the files ``compare`` writes beside it: ``compare.json`` and each run's
  ``<name>.eval.json``, the runs in their order. The published report is this function of the published JSON,
  so a test can check that no cell of it has drifted from the code."""
  with open(os.path.join(directory, "compare.json")) as f:
    summary = json.load(f)
  order = summary.get("run_order") or sorted(summary["runs"])
  summary["runs"] = {name: summary["runs"][name] for name in order}
  results = {}
  for name in order:
    with open(os.path.join(directory, f"{name}.eval.json")) as f:
      results[name] = json.load(f)
  return format_report(summary, results)


def _validation_curve(workdir: str, config) -> dict:
  """(tokens seen, validation bits per token) at each evaluation the train loop logged, the last log of a step
  winning (a resumed run may repeat steps)."""
  points = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "val_bits_per_token" in record:
        points[record["step"]] = record["val_bits_per_token"]
  steps = sorted(points)
  per_step = config.train.batch_size * config.data.seq_len
  return {"tokens": [s * per_step for s in steps], "bits_per_token": [points[s] for s in steps]}


# ---------------------------------------------------------------- plots and report

def write_plots(workdir: str, results: dict, curves: dict) -> None:
  """The three PNGs of ``PLOTS`` under ``workdir``, each run in the same colour in all three."""
  colors = plots.run_colors(results)
  plots.validation_curves(os.path.join(workdir, PLOTS[0]), curves, colors)
  plots.generation_by_steps(os.path.join(workdir, PLOTS[1]), {name: r["generation"]["by_steps"]
                                                              for name, r in results.items() if "generation" in r},
                            colors)
  plots.loss_by_time(os.path.join(workdir, PLOTS[2]),
                     {name: r["loss_by_time"] for name, r in results.items() if "loss_by_time" in r}, colors)
  frontiers = {name: r["frontier"] for name, r in results.items() if "frontier" in r}
  if frontiers:
    plots.frontier(os.path.join(workdir, FRONTIER_PLOT), frontiers, colors)


def _interval(value, half, digits=4):
  return f"{value:.{digits}f} ± {half:.{digits}f}"


def _counts(windows: int, documents: int | None) -> str:
  return f"{windows} windows" + (f", {documents} documents" if documents is not None else "")


def _versus(paired: dict | None) -> str:
  if not paired:
    return "-"
  return (_interval(paired["bits_per_byte"], paired["bits_per_byte_95"])
          + f" ({_counts(paired['windows'], paired.get('documents'))})")


def _evaluator_ppl(entry) -> str:
  return f"{entry['evaluator_ppl']:.2f}" if "evaluator_ppl" in entry else "-"


def _strategy_rows(by_run: dict, cells) -> list[str]:
  """A table row per run and strategy of ``by_run[run]["by_strategy"]``: the two names, then ``cells(entry)``."""
  return [f"| {name} | {strategy} | " + " | ".join(cells(entry)) + " |"
          for name, section in by_run.items() for strategy, entry in section["by_strategy"].items()]


def format_report(summary: dict, results: dict) -> str:
  """``report.md``: what was compared on what machine, the likelihood and generation tables, the plots."""
  runs, machine = summary["runs"], summary["machine"]
  settings = summary["eval_settings"]
  listing = ", ".join(f"`{name}` ({run['config']})" for name, run in runs.items())
  likelihoods = [r[key] for r in results.values() for key in ("likelihood", "continuous_bound") if key in r]
  lines = ["# Comparison of corruption processes", "",
           f"Runs {listing}, trained and evaluated by `d3pm-compare` on {machine['device']} ({machine['cpus']} CPUs, "
           f"{machine['platform']}, JAX {machine['jax']}, float32 matmul {machine['matmul_gflops']} GFLOP/s, measured "
           f"by d3pm-compare when it last trained a run or first found them all trained). Evaluation settings, the "
           f"same for every run: "
           + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) + ".", "",
           f"## Likelihood on the {settings.get('split', 'validation')} split", "",
           interval_statement(likelihoods) + " The last column is the run's bound minus the reference run's "
           f"(`{summary['reference']}`), paired window by window, with the interval of that difference over "
           + ("documents." if {like.get("interval_over") for like in likelihoods} == {"documents"} else
              "the same units."), "",
           "| run | process (loss) | bound | windows (documents) | bits/byte | perplexity / token | "
           "vs reference, bits/byte |",
           "|---|---|---|---|---|---|---|"]
  def likelihood_row(name, run, bound, like, vs):
    per_byte = like.get("bits_per_byte", like["bits_per_token"])
    half = like.get("bits_per_byte_95", like["bits_per_token_95"])
    lo, hi = like["perplexity_95"]
    documents = f" ({like['documents']})" if like.get("documents") is not None else ""
    return (f"| {name} | {run['process']} ({run['loss']}) | {bound} | {like['sequences']}{documents} | "
            f"{_interval(per_byte, half)} | {like['perplexity']:.3f} [{lo:.3f}, {hi:.3f}] | {vs} |")

  for name, run in runs.items():
    r = results[name]
    vs = "(reference)" if name == summary["reference"] else _versus(run["versus_reference"])
    lines.append(likelihood_row(name, run, r["bound"], r["likelihood"], vs))
    if "continuous_bound" in r:
      lines.append(likelihood_row(name, run, f"continuous-time bound (ctmc, K = {r['settings']['time_samples']})",
                                  r["continuous_bound"], _versus(run.get("continuous_versus_reference"))))
  recon = {name: r["reconstruction_bits_per_byte"] for name, r in results.items()
           if "reconstruction_bits_per_byte" in r}
  if recon:
    lines += ["", "Every run trains on the bound it is scored on: the continuous-time runs minimise their NELBO "
              "with its reconstruction term at t = 0 (left out of training only for absorbing, where x_t at t = 0 "
              "is x_0 but for eps = 1e-4 of positions), D3PM runs their hybrid loss, whose VLB holds its own "
              "reconstruction step. The reconstruction term of each continuous-time bound above, in bits/byte: "
              + ", ".join(f"`{name}` {value:.4f}" for name, value in recon.items()) + "."]
  for name, run in runs.items():
    gap = run.get("exact_minus_continuous")
    if gap:
      lines += ["", f"`{name}`: its exact discrete-time bound minus its continuous-time bound on the same "
                f"{_counts(gap['windows'], gap.get('documents'))}: "
                f"{_interval(gap['bits_per_byte'], gap['bits_per_byte_95'])} bits/byte."]
  lines += ["", "## Budget", "", "| run | parameters | steps | tokens seen | train wall time |", "|---|---|---|---|---|"]
  for name, run in runs.items():
    wall = f"{run['train_seconds'] / 60:.1f} min" if run.get("train_seconds") else "not recorded"
    lines.append(f"| {name} | {run['params']:,} | {run['steps']} | {run['tokens_seen']:,} | {wall} |")
  diffs = summary["differences"]
  lines += ["", "Config fields that differ between the runs (besides the process): "
            + ("; ".join(f"`{k}`: " + ", ".join(f"{n}={v}" for n, v in by_run.items()) for k, by_run in diffs.items())
               if diffs else "none.")]
  lines += ["", "## Generation", ""]
  ev = next((r["generation"]["evaluator"] for r in results.values() if "generation" in r), None)
  if ev is None:
    lines.append("Not scored: no autoregressive run among the configs and no --evaluator.")
  else:
    lines += [f"Samples scored by {ev['model']} (`{os.path.basename(ev['workdir'])}`, step {ev['checkpoint_step']}). "
              "Generative perplexity (gen-ppl, with its 95% interval over samples) rewards repetitive text, so the "
              f"unigram entropy of the samples (bits) stands beside it; the validation text's own is "
              f"{summary['validation_unigram_entropy']:.3f} bits. Samples/s exclude compilation. A block-diffusion "
              "run's steps are per block.", "",
              "| run | steps | gen-ppl | unigram entropy | samples/s |", "|---|---|---|---|---|"]
    for name, r in results.items():
      for steps, g in sorted(r.get("generation", {}).get("by_steps", {}).items(), key=lambda kv: int(kv[0])):
        lo, hi = g["gen_ppl_95"]
        lines.append(f"| {name} | {steps} | {g['gen_ppl']:.2f} [{lo:.2f}, {hi:.2f}] | {g['unigram_entropy']:.3f} | "
                     f"{g['samples_per_second']:.2f} |")
  frontiers = {n: r["frontier"] for n, r in results.items() if "frontier" in r}
  if frontiers:
    first = next(iter(frontiers.values()))
    lines += ["", "## Generative frontiers", "",
              f"One gen-ppl at one temperature ranks samplers unfairly: a lower temperature buys gen-ppl with "
              f"diversity. Each run sampled {first['samples']} sequences at every temperature of "
              f"{sorted({p['temperature'] for p in first['points']})} (nucleus 1) and every nucleus p of "
              f"{sorted({p['top_p'] for p in first['points'] if p['top_p'] < 1})} (temperature 1), "
              f"{summary['eval_settings']['frontier_steps']} steps for diffusion runs (a block, for block diffusion); "
              "the table reads each run's temperature frontier at the "
              + (f"validation text's own unigram entropy ({first['data_entropy']:.3f} bits)"
                 if "data_entropy_std" not in first else
                 f"data's unigram entropy at the samples' size ({first['data_entropy']:.3f} ± "
                 f"{first['data_entropy_std']:.3f} bits over random draws of {first['data_entropy_windows']} "
                 f"validation windows; the whole split reads {first['data_entropy_whole_split']:.3f}, as a plug-in "
                 "entropy's bias falls with the tokens counted)")
              + (", interpolating log gen-ppl between the two sweep points that bracket it (`frontier.png`)."
                 if "data_entropy_std" not in first else  # a report from before the mark: as it was written
                 ", interpolating log gen-ppl between two neighbouring sweep points that bracket it (`frontier.png`); "
                 "the interval is a bootstrap over each point's samples and the mark's draws.")]
    if "evaluator_own_samples" in first:
      own = first["evaluator_own_samples"]
      lines.append(f"The AR evaluator's own samples at temperature 1 score gen-ppl {own['gen_ppl']:.2f} at entropy "
                   f"{own['unigram_entropy']:.3f} bits.")
    lines += ["", "| run | gen-ppl at the data's entropy | entropy swept (bits) | gen-ppl at temperature 1 |",
              "|---|---|---|---|"]
    for name, fr in frontiers.items():
      at = fr["gen_ppl_at_data_entropy"]
      tempered = [p for p in fr["points"] if p["top_p"] == 1.0]
      low, high = min(p["unigram_entropy"] for p in tempered), max(p["unigram_entropy"] for p in tempered)
      plain = next((p["gen_ppl"] for p in tempered if p["temperature"] == 1.0), None)
      reading = f"{at:.2f}" if at is not None else "outside the sweep"
      if at is not None and "gen_ppl_at_data_entropy_95" in fr:
        lo, hi = fr["gen_ppl_at_data_entropy_95"]
        reading += f" [{'below the sweep' if lo is None else f'{lo:.2f}'}, {'above it' if hi is None else f'{hi:.2f}'}]"
      if fr.get("frontier_monotone") is False:
        reading += " (entropy not monotone in temperature)"
      lines.append(f"| {name} | {reading} | "
                   f"{low:.3f} - {high:.3f} | {f'{plain:.2f}' if plain is not None else '-'} |")
  infill = {n: r["infilling"] for n, r in results.items() if "infilling" in r}
  if infill:
    first = next(iter(infill.values()))
    span = next(iter(first["by_strategy"].values()))["span"]
    lines += ["", "## Infilling", "",
              f"A held-out span {span} of {first['windows']} validation windows, filled in {first['steps']} steps; "
              "token accuracy of the span and the evaluator's perplexity of the filled windows.", "",
              "| run | strategy | token accuracy | evaluator perplexity |", "|---|---|---|---|"]
    lines += _strategy_rows(infill, lambda e: [f"{e['accuracy']:.4f}", _evaluator_ppl(e)])
  prefix = {n: r["prefix_completion"] for n, r in results.items() if "prefix_completion" in r}
  if prefix:
    first = next(iter(prefix.values()))
    lines += ["", "## Prefix completion (block diffusion)", "",
              f"Block diffusion conditions on the left only, so it continues prompts instead of infilling: the first "
              f"{first['prompt_tokens']} tokens (whole blocks where half a window holds one) of {first['windows']} "
              f"validation windows are the prompt and the rest is sampled in {first['steps']} steps a block; token "
              "accuracy and unigram entropy of the continuation, and the evaluator's perplexity of the completed "
              "windows.", "",
              "| run | strategy | token accuracy | unigram entropy | evaluator perplexity |", "|---|---|---|---|---|"]
    lines += _strategy_rows(prefix, lambda e: [f"{e['accuracy']:.4f}", f"{e['unigram_entropy']:.3f}",
                                               _evaluator_ppl(e)])
  shown = PLOTS + ((FRONTIER_PLOT,) if frontiers else ())
  lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in shown] + [""]
  return "\n".join(lines)
