"""Evaluating a trained workdir (``d3pm-eval`` is the command line over it): the likelihood of its latest
checkpoint on the validation split with 95% intervals, the loss by t, and generation quality under an AR
evaluator, and infilling of a held-out span. The statistics themselves are in ``evaluate.py``.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import losses, sampling
from d3pm_jax.data import pipeline
from d3pm_jax.evaluation import evaluate, plots
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.processes import AbsorbingProcess
from d3pm_jax.training import checkpoints, state


def evaluate_workdir(workdir: str, *, time_samples: int = 16, batch: int = 32, max_windows: int = 0,
                     exact_windows: int = 0, use_ema: bool = False, seed: int = 0, num_bins: int = 10,
                     progress=None, evaluator: str | None = None, sample_steps=(16, 64, 256), num_samples: int = 32,
                     infill_windows: int = 64, infill_start: int = -1, infill_length: int = 0,
                     infill_steps: int = 64, split: str = "validation", frontier: bool = False,
                     frontier_temperatures=(0.7, 0.85, 1.0, 1.15, 1.3, 1.5), frontier_top_p=(0.8, 0.9, 0.95),
                     frontier_steps: int = 64, sampler: dict | None = None) -> dict:
  """Evaluates ``workdir``'s latest checkpoint on a held-out ``split`` of its data (``validation``; a prepared
  data set may also have ``test``), ``max_windows`` spread over it (0: all),
  its samples under ``evaluator`` (an AR baseline's workdir) when given, and infilling of a held-out span
  (default: the middle eighth of ``infill_windows`` windows; not for the AR baseline), and with ``frontier`` its
  generative frontier (``generation_frontier``, plotted to ``frontier.png``). A discrete-time D3PM run's
  exact bound costs T network calls per window, so it covers ``exact_windows`` of the evaluated windows (0: all)
  while its continuous-time bound covers them all. Returns (and writes to ``eval.json``, with the settings) the
  bounds' ``evaluate.summarize`` dicts, the loss by time, generation and infilling quality; the per-window nats
  go to ``eval_windows.npz`` (``rows``, ``tokens``, ``bytes``, ``words`` where the data set defines words,
  ``documents``: each window's document, ``nats``:
  NaN where the headline bound was not computed, ``continuous_nats``) so that runs can be compared window by
  window, and the loss by time is plotted to ``loss_vs_t.png``. Intervals are over documents
  (``evaluate.summarize``). ``sampler`` (``sampling.SamplerConfig`` fields: strategy, threshold, remasking, KV
  cache...) sets how the generation and frontier rows sample; it is recorded in the settings when given."""
  if time_samples < 1 or batch < 1 or max_windows < 0 or exact_windows < 0:
    raise ValueError(f"time_samples and batch must be >= 1 and max_windows, exact_windows >= 0; got "
                     f"{time_samples}, {batch}, {max_windows}, {exact_windows}")
  settings = {"time_samples": time_samples, "batch": batch, "max_windows": max_windows,
              "exact_windows": exact_windows, "use_ema": use_ema, "seed": seed, "num_bins": num_bins,
              "evaluator": os.path.abspath(evaluator) if evaluator else None,
              "sample_steps": [int(k) for k in sample_steps], "num_samples": num_samples,
              "infill_windows": infill_windows, "infill_start": infill_start, "infill_length": infill_length,
              "infill_steps": infill_steps, "split": split, "frontier": frontier,
              "frontier_temperatures": [float(x) for x in frontier_temperatures],
              "frontier_top_p": [float(x) for x in frontier_top_p], "frontier_steps": frontier_steps}
  if sampler:  # only when given, so that evaluations made before the option existed still match their settings
    settings["sampler"] = dict(sorted(sampler.items()))
    sampling.SamplerConfig(**sampler)  # refuses a bad value before any work
  if frontier and not evaluator:
    raise ValueError("--frontier scores samples: it needs --evaluator (an AR baseline's workdir on the same data)")
  config = checkpoints.load_experiment(workdir)
  params, step = checkpoints.restore_params(workdir, config, use_ema)
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed, workdir, eval_split=split)
  model = Transformer(config.model)
  process = state.process_for(config, workdir)
  first_bound, exact = window_bounds(config, model, process, time_samples)
  pcfg = config.process
  rows = pipeline.spread_rows(data.val_windows.shape[0], max_windows)
  windows, weights = data.val_windows[rows], data.val_weights[rows].astype(np.float32)
  segments = None if data.val_segments is None else data.val_segments[rows]
  tokens = weights.sum(axis=1)
  documents = None if data.val_documents is None else data.val_documents[rows]
  words = None if data.val_words is None else data.val_words[rows]
  byte_counts = window_bytes(data, rows)
  key = jax.random.PRNGKey(seed)
  first = _per_window(first_bound, params, key, windows, weights, segments,
                      batch, progress, "exact NLL" if pcfg.is_autoregressive else "continuous bound")
  nats = first["nelbo"]
  result = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step), "process": pcfg.name,
            "loss": pcfg.loss, "settings": settings, "windows": len(rows),
            "split_windows": int(data.val_windows.shape[0]), "seq_len": config.data.seq_len,
            "bound": {"ar": "exact NLL", "d3pm": f"exact discrete-time VLB (T = {pcfg.num_steps})"}.get(
                pcfg.loss, f"block NELBO (L' = {pcfg.block_size}, K = {time_samples})" if pcfg.block_size else
                f"continuous NELBO ({pcfg.loss}, K = {time_samples})")}
  if pcfg.loss == "d3pm":
    result["continuous_bound"] = evaluate.summarize(nats, tokens, byte_counts, documents, words)
    subset = pipeline.spread_rows(len(rows), exact_windows)
    exact_nats = _per_window(exact, params, jax.random.fold_in(key, 1), windows[subset], weights[subset],
                             None if segments is None else segments[subset], batch, progress,
                             f"exact VLB, T = {pcfg.num_steps} calls per window")["nelbo"]
    nats = np.full(len(rows), np.nan)
    nats[subset] = exact_nats
    result["exact_windows"] = len(subset)
  kept = ~np.isnan(nats)
  result["likelihood"] = evaluate.summarize(nats[kept], tokens[kept],
                                            None if byte_counts is None else byte_counts[kept],
                                            None if documents is None else documents[kept],
                                            None if words is None else words[kept])
  if "times_KxB" in first:
    result["loss_by_time"] = evaluate.loss_by_time(first["times_KxB"], first["integrand_KxB"], tokens, num_bins)
    # The reconstruction term's share of the continuous bound (what training must include to minimise it).
    denominator = tokens if byte_counts is None else byte_counts
    result["reconstruction_bits_per_byte"] = float(first["recon"].sum() / denominator.sum() / np.log(2.0))
    plots.loss_by_time(os.path.join(workdir, "loss_vs_t.png"), {os.path.basename(workdir.rstrip("/")) or workdir:
                                                                result["loss_by_time"]})
  np.savez(os.path.join(workdir, "eval_windows.npz"), rows=rows, tokens=tokens, nats=nats,
           bytes=tokens if byte_counts is None else byte_counts, continuous_nats=first["nelbo"],
           documents=np.arange(len(rows)) if documents is None else documents,
           **({} if words is None else {"words": words}))
  scorer = load_evaluator(config, evaluator) if evaluator else None
  if scorer is not None:
    result["generation"], _ = generation_quality(config, model, process, params, scorer,
                                                 [int(k) for k in sample_steps], num_samples, seed, sampler)
  if scorer is not None and frontier:
    result["frontier"] = generation_frontier(
        config, model, process, params, scorer, frontier_steps, frontier_temperatures, frontier_top_p,
        num_samples, seed, data=data, evaluator_workdir=evaluator, sampler=sampler)
    plots.frontier(os.path.join(workdir, "frontier.png"),
                   {os.path.basename(workdir.rstrip("/")) or workdir: result["frontier"]})
  if pcfg.block_size and infill_windows > 0:  # blocks condition on the left only: continue prefixes instead
    result["prefix_completion"] = prefix_completion(config, model, params, process, data, num_steps=infill_steps,
                                                    num_windows=infill_windows, evaluator=scorer, seed=seed)
  elif process is not None and infill_windows > 0:
    span_length = infill_length or max(1, config.data.seq_len // 8)
    span_start = (config.data.seq_len - span_length) // 2 if infill_start < 0 else infill_start
    result["infilling"] = infilling_quality(
        config, model, process, params, data, span_start=span_start, span_length=span_length,
        num_steps=infill_steps, num_windows=infill_windows, evaluator=scorer, seed=seed)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def window_bytes(data: pipeline.Data, rows) -> np.ndarray | None:
  """The bytes of original text each of ``data``'s validation ``rows`` stands for ``[N]`` (recorded when it was
  prepared: ``pipeline.row_bytes``), the denominator of bits per byte; None for data without text (the synthetic
  Markov source). Refuses shards that record none and whose ids cannot give them (WordPiece prepared before
  byte counts were recorded), rather than report bits per byte over the wrong bytes."""
  if data.tokenizer is None:
    return None
  if data.val_bytes is None:
    raise ValueError(f"{data.info.get('prepared_dir')} records no byte counts (it was prepared before d3pm-prepare "
                     f"recorded them) and {data.tokenizer.name} ids do not give the original text's bytes, so bits "
                     f"per byte cannot be computed; prepare it again with d3pm-prepare")
  return data.val_bytes[rows]


def window_bounds(config, model, process, time_samples: int):
  """The per-window bounds ``evaluate_workdir`` reports, as ``(first, exact)`` functions ``fn(params, key,
  x0_BxL, weights_BxL, segments_BxL or None) -> {'nelbo': nats [B], ...}``: ``first`` is the AR baseline's exact
  NLL or the continuous-time NELBO (``evaluate.continuous_nelbo``, K = ``time_samples``; the CTMC form for a
  D3PM run; block diffusion's, ``losses.block_elbo``, for a ``process.block_size`` run), ``exact`` the discrete-time D3PM bound at the config's T (None for other losses). Packed rows'
  segment ids reach the network, so a row scores as its documents apart."""
  pcfg = config.process
  logits_fn = lambda params, segments, x_t, t_B: model.apply({"params": params}, x_t, t_B, segments_BxL=segments)

  def ar_nll(params, key, x0_BxL, weights_BxL, segments_BxL):
    return {"nelbo": state.loss_terms(config, model, None, params, key, x0_BxL, True, weights_BxL,
                                      segments_BxL)["nelbo"]}

  def continuous(params, key, x0_BxL, weights_BxL, segments_BxL):
    out = evaluate.continuous_nelbo(process, functools.partial(logits_fn, params, segments_BxL), key, x0_BxL,
                                    num_time_samples=time_samples, kind="ctmc" if pcfg.loss == "d3pm" else pcfg.loss,
                                    weights_BxL=weights_BxL)
    return {"nelbo": out["nelbo"], "recon": out["recon"], "times_KxB": out["times_KxB"],
            "integrand_KxB": out["integrand_KxB"]}

  def block(params, key, x0_BxL, weights_BxL, segments_BxL):
    """Block diffusion's NELBO over the whole [0, 1] (K = ``time_samples`` draws of every block's t)."""
    fn = lambda x_t, clean, blocks: model.apply({"params": params}, x_t, segments_BxL=segments_BxL, clean_BxL=clean,
                                                blocks_BxL=blocks, block_size=pcfg.block_size)
    out = losses.block_elbo(process, fn, key, x0_BxL, pcfg.block_size, segments_BxL=segments_BxL,
                            num_time_samples=time_samples, weights_BxL=weights_BxL)
    return {"nelbo": out["nelbo"], "recon": out["recon"]}

  def exact(params, key, x0_BxL, weights_BxL, segments_BxL):
    return {"nelbo": losses.d3pm_vlb_exact(process, functools.partial(logits_fn, params, segments_BxL), key, x0_BxL,
                                           pcfg.num_steps, weights_BxL)}

  first = ar_nll if pcfg.is_autoregressive else block if pcfg.block_size else continuous
  return first, (exact if pcfg.loss == "d3pm" else None)


def _per_window(fn, params, key, windows_NxL, weights_NxL, segments_NxL, batch: int, progress, label: str) -> dict:
  """``fn(params, key, x0_BxL, weights_BxL, segments_BxL or None) -> {name: [..., B]}`` over all windows in whole
  batches of one compiled shape (the last padded with weight-0 rows, then dropped), the batch of windows
  ``[i, i + batch)`` with key ``fold_in(key, i)``; arrays concatenated on their last axis in float64."""
  step_fn = jax.jit(fn)
  n = len(windows_NxL)
  pad = lambda a: None if a is None else np.concatenate([a, np.zeros((-n % batch, a.shape[1]), a.dtype)])
  windows, weights, segments = pad(windows_NxL), pad(weights_NxL), pad(segments_NxL)
  collected: dict[str, list] = {}
  start = time.time()
  for i in range(0, len(windows), batch):
    out = jax.device_get(step_fn(params, jax.random.fold_in(key, i), jnp.asarray(windows[i:i + batch], jnp.int32),
                                 jnp.asarray(weights[i:i + batch]),
                                 None if segments is None else jnp.asarray(segments[i:i + batch], jnp.int32)))
    for name, value in out.items():
      collected.setdefault(name, []).append(np.asarray(value, np.float64))
    if progress is not None:
      progress(label, min(i + batch, n), n, time.time() - start)
  return {name: np.concatenate(parts, axis=-1)[..., :n] for name, parts in collected.items()}


def load_evaluator(config, evaluator_workdir: str):
  """The AR baseline in ``evaluator_workdir`` as ``(score, num_tokens, info)``: ``score(tokens_NxL) -> nats [N]``
  is its exact NLL of each sequence, ``num_tokens`` the data tokens. It must read the same data and tokenizer."""
  ev_config = checkpoints.load_experiment(evaluator_workdir)
  if not ev_config.process.is_autoregressive:
    raise ValueError(f"--evaluator must be an autoregressive baseline's workdir; {evaluator_workdir} trained "
                     f"process {ev_config.process.name!r}")
  mine = (config.data.name, config.data.tokenizer, config.data.tokenizer_path)
  theirs = (ev_config.data.name, ev_config.data.tokenizer, ev_config.data.tokenizer_path)
  if mine != theirs or ev_config.model.max_len < config.data.seq_len:
    raise ValueError(f"the evaluator must read the same data and tokenizer (data, tokenizer, path) {mine} and fit "
                     f"{config.data.seq_len} tokens; {evaluator_workdir} has {theirs} and max_len "
                     f"{ev_config.model.max_len}")
  ev_params, ev_step = checkpoints.restore_params(evaluator_workdir, ev_config)
  ev_model = Transformer(ev_config.model)
  nll = jax.jit(lambda p, x: state.loss_terms(ev_config, ev_model, None, p, jax.random.PRNGKey(0), x, True)["nelbo"])
  info = {"workdir": os.path.abspath(evaluator_workdir), "checkpoint_step": int(ev_step),
          "model": "this project's autoregressive baseline trained on the same data"}
  # Data tokens: the AR vocabulary less its start token.
  return (lambda tokens: nll(ev_params, jnp.asarray(tokens, jnp.int32))), ev_config.model.vocab_size - 1, info


def mark_text(fr: dict) -> str:
  """The mark a frontier is read at, as words: the data's entropy at the samples' size, its spread, and the whole
  split's (``generation_frontier``); a frontier from before the mark was measured so names only its value."""
  if fr.get("data_entropy") is None:
    return "no validation text to mark the data's entropy"
  if "data_entropy_std" not in fr:
    return f"validation text's unigram entropy {fr['data_entropy']:.3f} bits"
  return (f"the data's unigram entropy at {fr['data_entropy_windows']} windows, the samples' size: "
          f"{fr['data_entropy']:.3f} ± {fr['data_entropy_std']:.3f} bits over random draws; "
          f"{fr['data_entropy_whole_split']:.3f} over the whole split")


def reading_text(fr: dict) -> str:
  """The frontier's gen-ppl at the mark with its bootstrap interval, or why there is none; and a warning where the
  sweep's entropy does not rise with temperature."""
  at = fr.get("gen_ppl_at_data_entropy")
  if at is None:
    text = "outside the swept range"
  elif "gen_ppl_at_data_entropy_95" in fr:
    lo, hi = fr["gen_ppl_at_data_entropy_95"]
    text = f"{at:.3f} [{'below the sweep' if lo is None else f'{lo:.3f}'}, {'above it' if hi is None else f'{hi:.3f}'}]"
  else:
    text = f"{at:.3f}"
  if fr.get("frontier_monotone") is False:
    text += " (the sweep's entropy does not rise with temperature: read neighbouring temperatures only)"
  return text


def generation_quality(config, model, process, params, evaluator, step_counts, num_samples: int,
                       seed: int = 0, sampler: dict | None = None) -> tuple[dict, dict]:
  """Samples ``num_samples`` sequences at each step count and scores them with ``evaluator`` (``load_evaluator``'s
  triple): generative perplexity (interval over samples), unigram entropy, samples per second (compilation
  excluded). An AR model being evaluated decodes once, one step per token. Returns the figures and the samples
  ``{steps: tokens [N, L]}``. ``sampler``: more ``SamplerConfig`` fields (``state.make_sampler``)."""
  score, num_tokens, info = evaluator
  out = {"evaluator": info, "by_steps": {}}
  samples = {}
  for steps in ([config.data.seq_len] if process is None else step_counts):
    key = jax.random.PRNGKey(seed + steps)
    compiled = state.make_sampler(config, model, process, steps, num_samples, options=sampler).lower(
        params, key).compile()
    start = time.time()
    tokens = np.asarray(jax.block_until_ready(compiled(params, key)))
    seconds = time.time() - start
    quality = evaluate.generative_perplexity(tokens, score, num_tokens)
    out["by_steps"][str(steps)] = {**quality, "samples_per_second": num_samples / seconds}
    samples[steps] = tokens
  return out, samples


def generation_frontier(config, model, process, params, evaluator, steps: int, temperatures, top_ps,
                        num_samples: int, seed: int = 0, data=None, evaluator_workdir: str | None = None,
                        sampler: dict | None = None) -> dict:
  """Generative perplexity against the samples' unigram entropy as temperature sweeps (at nucleus 1) and as the
  nucleus sweeps (at temperature 1): a lower temperature buys gen-ppl with diversity, so one point ranks samplers
  unfairly, and a frontier compares them at equal entropy. ``steps`` sampling steps (an AR model decodes one
  token per step). Returns the points and, given ``data`` (its validation split), the mark they are read at: the
  data's entropy at the points' own size (``evaluate.entropy_mark``: ``num_samples`` windows, 'data_entropy' its
  mean, 'data_entropy_std' its spread over draws, 'data_entropy_whole_split' the whole split's, which reads
  higher), the gen-ppl along the temperature frontier at it with a bootstrap interval over samples
  (``evaluate.frontier_reading``; None outside the sweep) and whether the frontier's entropy rises with
  temperature ('frontier_monotone'). With ``evaluator_workdir``, the AR evaluator's own samples at temperature
  1, scored by itself. ``sampler``: more ``SamplerConfig`` fields."""
  score, num_tokens, info = evaluator
  length = config.data.seq_len
  sweeps = [(float(t), 1.0) for t in temperatures] + [(1.0, float(p)) for p in top_ps if p < 1.0]
  points, tempered = [], []
  for k, (temperature, top_p) in enumerate(sweeps):
    draw = state.make_sampler(config, model, process, length if process is None else steps, num_samples,
                              temperature=temperature, top_p=top_p, options=sampler)
    tokens = np.asarray(draw(params, jax.random.PRNGKey(seed + 1000 + k)))
    nats_N = np.asarray(score(tokens), np.float64)
    points.append({"temperature": temperature, "top_p": top_p,
                   **evaluate.generative_perplexity(tokens, lambda _, nats_N=nats_N: nats_N, num_tokens)})
    if top_p == 1.0:
      tempered.append((temperature, tokens, nats_N))
  out = {"steps": length if process is None else steps, "samples": num_samples, "points": points,
         "evaluator": info, "data_entropy": None, "gen_ppl_at_data_entropy": None}
  if data is not None and tempered:
    windows = min(num_samples, data.val_windows.shape[0])
    mark = evaluate.entropy_mark(data.val_windows, data.val_weights, config.model.vocab_size, windows, seed=seed)
    tempered.sort(key=lambda entry: entry[0])
    reading = evaluate.frontier_reading([(t, n) for _, t, n in tempered], config.model.vocab_size, mark,
                                        seed=seed)
    out.update(data_entropy=mark["mean"], data_entropy_std=mark["std"], data_entropy_windows=mark["windows"],
               data_entropy_whole_split=mark["whole_split"], gen_ppl_at_data_entropy=reading["gen_ppl"],
               gen_ppl_at_data_entropy_95=list(reading["gen_ppl_95"]), frontier_monotone=reading["monotone"])
  if evaluator_workdir:
    ev_config = checkpoints.load_experiment(evaluator_workdir)
    ev_params, _ = checkpoints.restore_params(evaluator_workdir, ev_config)
    ev_sampler = state.make_sampler(ev_config, Transformer(ev_config.model), None, length, num_samples)
    own = np.asarray(ev_sampler(ev_params, jax.random.PRNGKey(seed + 999)))
    out["evaluator_own_samples"] = evaluate.generative_perplexity(own, score, num_tokens)
  return out


def infilling_quality(config, model, process, params, data, *, span_start: int, span_length: int, num_steps: int,
                      num_windows: int, evaluator=None, seed: int = 0) -> dict:
  """Fills a held-out span of ``num_windows`` unpadded one-document validation windows (spread over the split)
  with every sampling strategy the process supports; token accuracy of the span, and with ``evaluator``
  (``load_evaluator``'s triple) the evaluator's perplexity of the filled windows."""
  whole = data.val_weights.min(axis=1) > 0  # unpadded windows, of one document where rows are packed
  if data.val_segments is not None:
    whole &= (data.val_segments == 1).all(axis=1)
  full = np.flatnonzero(whole)
  rows = full[pipeline.spread_rows(len(full), num_windows)]
  windows = data.val_windows[rows]
  strategies = ["ancestral", "confidence"] if isinstance(process, AbsorbingProcess) else ["ancestral"]
  logits_fn = lambda x_t, t_B: model.apply({"params": params}, x_t, t_B)
  out = {"windows": int(len(rows)), "steps": num_steps, "by_strategy": {}}
  for strategy in strategies:
    cfg = sampling.SamplerConfig(num_steps=num_steps, strategy=strategy)
    filled = evaluate.infill(process, logits_fn, jax.random.PRNGKey(seed), windows, span_start, span_length, cfg,
                             time_conditioned=config.model.time_conditioning)
    entry = {"accuracy": filled["accuracy"], "span": filled["span"]}
    if evaluator is not None:
      quality = evaluate.generative_perplexity(filled["filled"], evaluator[0], evaluator[1])
      entry.update(evaluator_ppl=quality["gen_ppl"], evaluator_ppl_95=quality["gen_ppl_95"])
    out["by_strategy"][strategy] = entry
  return out


def prefix_completion(config, model, params, process, data, *, num_steps: int, num_windows: int, evaluator=None,
                      seed: int = 0) -> dict:
  """Block diffusion's conditional generation: the first half of ``num_windows`` unpadded validation windows as
  the prompt (in whole blocks where half a window holds one, else a partial block: one block of the whole window,
  L' = L, is prompted with its first half), the rest sampled block by block (``state.block_sample``) with each
  strategy; the token accuracy of the continuation against the text, its unigram entropy, and with ``evaluator``
  the evaluator's perplexity of the completed windows."""
  whole = data.val_weights.min(axis=1) > 0
  if data.val_segments is not None:
    whole &= (data.val_segments == 1).all(axis=1)
  full = np.flatnonzero(whole)
  windows = data.val_windows[full[pipeline.spread_rows(len(full), num_windows)]]
  num, length = windows.shape
  block_size = config.process.block_size
  # Rounding half a window up to a whole block left nothing to complete when L' = L (NaN accuracy, an empty
  # continuation's entropy): a prompt that ends inside a block is the sampler's own case.
  prompt_length = length // 2 // block_size * block_size or length // 2
  given = np.zeros((num, length), bool)
  given[:, :prompt_length] = True
  out = {"windows": int(num), "steps": num_steps, "prompt_tokens": int(prompt_length), "by_strategy": {}}
  for strategy in ("ancestral", "confidence"):
    cfg = sampling.SamplerConfig(num_steps=num_steps, strategy=strategy)
    tokens = np.asarray(jax.jit(lambda key: state.block_sample(config, model, params, process, key, num, length, cfg,
                                                               jnp.asarray(given), jnp.asarray(windows, jnp.int32)))(
        jax.random.PRNGKey(seed)))
    entry = {"accuracy": float(np.mean(tokens[:, prompt_length:] == windows[:, prompt_length:])),
             "unigram_entropy": sampling.unigram_entropy(tokens[:, prompt_length:], config.model.vocab_size)}
    if evaluator is not None:
      quality = evaluate.generative_perplexity(tokens, evaluator[0], evaluator[1])
      entry.update(evaluator_ppl=quality["gen_ppl"], evaluator_ppl_95=quality["gen_ppl_95"])
    out["by_strategy"][strategy] = entry
  return out


# The critical value of each recorded ``interval_method`` (None: evaluations made before it was recorded).
CRITICAL_VALUES = {
    evaluate.INTERVAL_METHOD: "a critical value exact under a random-effects model fitted to the units, where "
                              "Student's t would under-cover as a few large documents carry the estimate",
    None: "Student's t over the effective number of documents",
}
PER_WINDOW = ("the split records no documents to cluster by (it is one stream of text, as text8's splits are), so "
              "the windows are the units; neighbouring windows of one stream are not independent, so this interval "
              "is narrower than one over documents would be")


def interval_statement(likelihoods) -> str:
  """What ± means in a report of ``likelihoods`` (``evaluate.summarize`` dicts): a 95% interval over documents
  where the split has them, else over windows and why, and how its critical value was found."""
  over = {like.get("interval_over", "sequences") for like in likelihoods}
  methods = [m for m in CRITICAL_VALUES if m in {like.get("interval_method") for like in likelihoods}]
  critical = CRITICAL_VALUES[methods[0]] + "".join(f"; for runs evaluated before, {CRITICAL_VALUES[m]}"
                                                   for m in methods[1:])
  by_document = (f"windows cut from one document are not independent samples of text, so the interval is "
                 f"cluster-robust (each document's sums are the units, leverage-corrected, with {critical}: "
                 f"`evaluate.ratio_mean_interval`).")
  if over == {"documents"}:
    return "± is a 95% interval over documents: " + by_document
  per_window = f"over windows: {PER_WINDOW} (leverage-corrected, with {critical}: `evaluate.ratio_mean_interval`)."
  if over == {"sequences"}:
    return "± is a 95% interval " + per_window
  return ("± is a 95% interval over documents where a count of documents is given: " + by_document
          + " Elsewhere it is " + per_window)


def format_table(result: dict) -> str:
  def row(name, s):
    per_byte = f"{s['bits_per_byte']:.4f} ± {s['bits_per_byte_95']:.4f}" if "bits_per_byte" in s else "-"
    lo, hi = s["perplexity_95"]
    return (f"{name:<34s} {s['bits_per_token']:.4f} ± {s['bits_per_token_95']:.4f}  {per_byte:>17s}  "
            f"{s['perplexity']:9.3f} [{lo:.3f}, {hi:.3f}]")

  like_all = result["likelihood" if "continuous_bound" not in result else "continuous_bound"]
  lines = [f"d3pm-eval {result['workdir']}: step {result['checkpoint_step']}, {result['process']} "
           f"({result['loss']}), {result['windows']} of {result['split_windows']} "
           f"{result['settings'].get('split', 'validation')} windows, "
           f"{like_all['tokens']} tokens"
           + (f", {like_all['documents']} documents" if like_all.get("documents") is not None else "")
           + ("; ± is a 95% interval over documents" if like_all.get("interval_over") == "documents" else
              f"; ± is a 95% interval over windows: {PER_WINDOW}"),
           f"{'bound':<34s} {'bits/token':>17s}  {'bits/byte':>17s}  {'perplexity (per token)':>26s}",
           row(result["bound"][:34], result["likelihood"])]
  for name, s in (("bound", result["likelihood"]), ("continuous-time bound", result.get("continuous_bound"))):
    if s and "perplexity_per_word" in s:
      lo, hi = s["perplexity_per_word_95"]
      lines.append(f"  {name}, per word ({s['words']} words, each sentence's end counted as one): perplexity "
                   f"{s['perplexity_per_word']:.3f} [{lo:.3f}, {hi:.3f}]")
  if "exact_windows" in result and result["exact_windows"] < result["windows"]:
    lines.append(f"  (the exact bound on {result['exact_windows']} of the {result['windows']} windows, "
                 f"{result['likelihood']['tokens']} tokens; the continuous bound on all of them)")
  if "continuous_bound" in result:
    lines.append(row("continuous-time bound (ctmc)", result["continuous_bound"]))
  if "generation" in result:
    ev = result["generation"]["evaluator"]
    lines.append(f"generation, scored by {ev['model']} ({ev['workdir']}, step {ev['checkpoint_step']}):")
    for steps, g in result["generation"]["by_steps"].items():
      lo, hi = g["gen_ppl_95"]
      lines.append(f"  {steps:>5s} steps: gen-ppl {g['gen_ppl']:9.3f} [{lo:.3f}, {hi:.3f}], unigram entropy "
                   f"{g['unigram_entropy']:.3f} bits, {g['samples_per_second']:.2f} samples/s")
  if "frontier" in result:
    fr = result["frontier"]
    lines.append(f"frontier at {fr['steps']} steps, {fr['samples']} samples each ({mark_text(fr)}):")
    for p in fr["points"]:
      lines.append(f"  temperature {p['temperature']:.2f}, top_p {p['top_p']:.2f}: gen-ppl {p['gen_ppl']:9.3f}, "
                   f"unigram entropy {p['unigram_entropy']:.3f} bits")
    lines.append(f"  gen-ppl at the data's entropy: {reading_text(fr)}")
    if "evaluator_own_samples" in fr:
      own = fr["evaluator_own_samples"]
      lines.append(f"  the evaluator's own samples: gen-ppl {own['gen_ppl']:.3f}, unigram entropy "
                   f"{own['unigram_entropy']:.3f} bits")
  if "infilling" in result:
    inf = result["infilling"]
    for strategy, entry in inf["by_strategy"].items():
      ppl = f", evaluator perplexity {entry['evaluator_ppl']:.3f}" if "evaluator_ppl" in entry else ""
      lines.append(f"infilling span {entry['span']} of {inf['windows']} windows, {inf['steps']} steps, {strategy}: "
                   f"token accuracy {entry['accuracy']:.4f}{ppl}")
  if "prefix_completion" in result:
    pc = result["prefix_completion"]
    for strategy, entry in pc["by_strategy"].items():
      ppl = f", evaluator perplexity {entry['evaluator_ppl']:.3f}" if "evaluator_ppl" in entry else ""
      lines.append(f"prefix completion of {pc['windows']} windows after {pc['prompt_tokens']} prompt tokens, "
                   f"{pc['steps']} steps a block, {strategy}: token accuracy {entry['accuracy']:.4f}, unigram "
                   f"entropy {entry['unigram_entropy']:.3f} bits{ppl}")
  if "loss_by_time" in result:
    bins = result["loss_by_time"]
    lines.append("bits per token by t: " + " ".join(
        f"[{lo:.1f},{hi:.1f}) {v:.3f}" for lo, hi, v in zip(bins["edges"], bins["edges"][1:], bins["bits_per_token"])))
  return "\n".join(lines)
