"""``d3pm-eval --workdir=DIR [--time_samples K] [--batch B] [--max_windows N | --quick]``.

The likelihood of a trained run on its validation split (all of it unless capped), with a 95% interval over
sequences, and where in t the bits go; prints a table and writes ``workdir/eval.json``.
  continuous-time models   the Monte-Carlo NELBO with K stratified times per sequence, reconstruction and prior
                           included (``evaluate.continuous_nelbo``);
  D3PM (discrete time)     the exact full-T bound (``losses.d3pm_vlb_exact``: T network calls per batch), and the
                           continuous-time (CTMC) bound of the same network beside it;
  autoregressive           the exact NLL.
Bits per byte come from each window's decoded bytes, so byte-level and subword models compare on the same text.
Generation quality and infilling are not evaluated yet. Runs on one process.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from d3pm_jax import checkpoints, evaluate, losses, state
from d3pm_jax.data import pipeline
from d3pm_jax.models.transformer import Transformer

_WORKDIR = flags.DEFINE_string("workdir", None, "A d3pm-train workdir.")
_TIME_SAMPLES = flags.DEFINE_integer("time_samples", 16, "Stratified times per sequence (continuous bounds).")
_BATCH = flags.DEFINE_integer("batch", 32, "Windows per evaluation batch.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 0, "Evaluate this many windows spread over the split (0: all).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 64 windows and 4 time samples.")
_EMA = flags.DEFINE_bool("ema", False, "Evaluate the EMA parameters.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the Monte-Carlo draws.")
_BINS = flags.DEFINE_integer("bins", 10, "Bins of t for the loss-by-time curve.")
flags.mark_flag_as_required("workdir")


def _chosen_windows(total: int, max_windows: int) -> np.ndarray:
  if max_windows <= 0 or max_windows >= total:
    return np.arange(total)
  return np.linspace(0, total - 1, max_windows).round().astype(int)


def evaluate_workdir(workdir: str, *, time_samples: int = 16, batch: int = 32, max_windows: int = 0,
                     use_ema: bool = False, seed: int = 0, num_bins: int = 10, progress=None) -> dict:
  """Evaluates ``workdir``'s latest checkpoint on its validation split; returns (and writes to eval.json) the
  bounds' ``evaluate.summarize`` dicts, the loss by time and what was evaluated."""
  if time_samples < 1 or batch < 1:
    raise ValueError(f"time_samples and batch must be >= 1; got {time_samples} and {batch}")
  config = checkpoints.load_experiment(workdir)
  params, step = checkpoints.restore_params(workdir, config, use_ema)
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, workdir)
  model = Transformer(config.model)
  process = state.build_process(config.process, config.model)
  pcfg = config.process

  def per_batch(params, key, x0_BxL, weights_BxL):
    if pcfg.is_autoregressive:
      return {"nelbo": state.loss_terms(config, model, None, params, key, x0_BxL, True, weights_BxL)["nelbo"]}
    logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B)
    exact_key, key = jax.random.split(key)
    kind = "ctmc" if pcfg.loss == "d3pm" else pcfg.loss
    out = evaluate.continuous_nelbo(process, logits_fn, key, x0_BxL, num_time_samples=time_samples, kind=kind,
                                    weights_BxL=weights_BxL)
    terms = {"continuous": out["nelbo"], "times_KxB": out["times_KxB"], "integrand_KxB": out["integrand_KxB"]}
    if pcfg.loss == "d3pm":
      terms["nelbo"] = losses.d3pm_vlb_exact(process, logits_fn, exact_key, x0_BxL, pcfg.num_steps, weights_BxL)
    else:
      terms["nelbo"] = out["nelbo"]
    return terms

  step_fn = jax.jit(per_batch)
  rows = _chosen_windows(data.val_windows.shape[0], max_windows)
  windows, weights = data.val_windows[rows], data.val_weights[rows].astype(np.float32)
  pad = -len(rows) % batch  # whole batches, one compiled shape: padded rows have weight 0 and are dropped
  windows = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
  weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), weights.dtype)])
  collected: dict[str, list] = {}
  key = jax.random.PRNGKey(seed)
  start = time.time()
  for i in range(0, len(windows), batch):
    out = jax.device_get(step_fn(params, jax.random.fold_in(key, i), jnp.asarray(windows[i:i + batch], jnp.int32),
                                 jnp.asarray(weights[i:i + batch])))
    for name, value in out.items():
      collected.setdefault(name, []).append(np.asarray(value, np.float64))
    if progress is not None:
      progress(min(i + batch, len(rows)), len(rows), time.time() - start)
  real = len(rows)
  tokens = weights[:real].sum(axis=1)
  byte_counts = (evaluate.window_bytes(data.tokenizer, windows[:real], weights[:real])
                 if data.tokenizer is not None else None)
  result = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step), "process": pcfg.name,
            "loss": pcfg.loss, "ema": use_ema, "seed": seed,
            "windows": real, "split_windows": int(data.val_windows.shape[0]), "seq_len": config.data.seq_len,
            "bound": {"ar": "exact NLL", "d3pm": f"exact discrete-time VLB (T = {pcfg.num_steps})"}.get(
                pcfg.loss, f"continuous NELBO ({pcfg.loss}, K = {time_samples})"),
            "likelihood": evaluate.summarize(np.concatenate(collected["nelbo"])[:real], tokens, byte_counts)}
  if "continuous" in collected:
    if pcfg.loss == "d3pm":
      result["continuous_bound"] = evaluate.summarize(np.concatenate(collected["continuous"])[:real], tokens,
                                                      byte_counts)
    result["loss_by_time"] = evaluate.loss_by_time(
        np.concatenate(collected["times_KxB"], axis=1)[:, :real],
        np.concatenate(collected["integrand_KxB"], axis=1)[:, :real], tokens, num_bins)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def format_table(result: dict) -> str:
  def row(name, s):
    per_byte = f"{s['bits_per_byte']:.4f} ± {s['bits_per_byte_95']:.4f}" if "bits_per_byte" in s else "-"
    lo, hi = s["perplexity_95"]
    return (f"{name:<34s} {s['bits_per_token']:.4f} ± {s['bits_per_token_95']:.4f}  {per_byte:>17s}  "
            f"{s['perplexity']:9.3f} [{lo:.3f}, {hi:.3f}]")

  lines = [f"d3pm-eval {result['workdir']}: step {result['checkpoint_step']}, {result['process']} "
           f"({result['loss']}), {result['windows']} of {result['split_windows']} validation windows, "
           f"{result['likelihood']['tokens']} tokens; ± is a 95% interval over sequences",
           f"{'bound':<34s} {'bits/token':>17s}  {'bits/byte':>17s}  {'perplexity (per token)':>26s}",
           row(result["bound"][:34], result["likelihood"])]
  if "continuous_bound" in result:
    lines.append(row("continuous-time bound (ctmc)", result["continuous_bound"]))
  if "loss_by_time" in result:
    bins = result["loss_by_time"]
    lines.append("bits per token by t: " + " ".join(
        f"[{lo:.1f},{hi:.1f}) {v:.3f}" for lo, hi, v in zip(bins["edges"], bins["edges"][1:], bins["bits_per_token"])))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)

  def progress(done, total, seconds):
    print(f"\revaluating: {done}/{total} windows, {seconds:.0f} s", end="\n" if done == total else "",
          file=sys.stderr, flush=True)

  try:
    result = evaluate_workdir(_WORKDIR.value, time_samples=4 if _QUICK.value else _TIME_SAMPLES.value,
                              batch=_BATCH.value, max_windows=64 if _QUICK.value else _MAX_WINDOWS.value,
                              use_ema=_EMA.value, seed=_SEED.value, num_bins=_BINS.value, progress=progress)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(format_table(result))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
