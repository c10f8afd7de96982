"""Evaluation that states its noise: likelihood with a 95% interval over documents, where in t the bits are
spent, and generative perplexity with the unigram entropy of the samples beside it.

Per-sequence values are nats ``[N]``; ``summarize`` turns them into bits per token, bits per byte and perplexity,
each a token- (or byte-) weighted ratio of sums with the half-width of its 95% interval (the delta method for a
ratio estimator). The unit of sampling is the document: windows cut from one file or article share its style
and difficulty, so they are not independent samples of text, and an interval that treated them as such would
be too narrow as a statement about unseen text (the stdlib validation split's 7,252 windows come from 34 files,
three of which hold half of them). Given each window's document, the interval is cluster-robust: the sums within
each document are the units (``ratio_mean_interval``: leverage-corrected, with Student's t over the effective
number of documents, since a few large ones carry the estimate). Every
Monte-Carlo estimate here (random times, random x_t) is independent across windows, so the interval covers that
noise as well as the spread of the data.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from d3pm_jax import _checks, losses, sampling
from d3pm_jax.processes import AbsorbingProcess, Process


def interval_units(num_sequences: int, documents_N=None) -> tuple[np.ndarray, bool]:
  """``(units [N], by_document)``: the unit of each sequence for an interval, its document where ``documents_N``
  names at least two, else the sequence itself (a single stream such as text8 knows no documents)."""
  if documents_N is not None:
    documents = np.asarray(documents_N).ravel()
    if documents.size != num_sequences:
      raise ValueError(f"documents_N has {documents.size} entries for {num_sequences} sequences")
    if np.unique(documents).size >= 2:
      return documents, True
  return np.arange(num_sequences), False


def ratio_mean_interval(values_N, weights_N, clusters_N=None, level: float = 0.95) -> tuple[float, float]:
  """``r = sum(values) / sum(weights)`` and the half-width of its ``level`` interval, in float64.

  The sequences are grouped by ``clusters_N`` (their documents; default: each its own) into G units with sums
  V_g, W_g and weight shares h_g = W_g / W. The delta method's variance of the ratio, with each unit's residual
  scaled by its leverage (CR2, Bell & McCaffrey 2002), is sum_g (V_g - r W_g)^2 / (1 - h_g) / W^2, and the
  quantile is Student's t with n_eff - 1 degrees of freedom, n_eff = 1 / sum_g h_g^2 the effective number of
  units (Kish): a few large documents carry the estimate, and a normal quantile over G would under-cover. With
  equal weights this is the familiar sqrt(G / (G - 1) * sum_g res_g^2) / W and t with G - 1. Needs G >= 2."""
  values = np.asarray(values_N, np.float64).ravel()
  weights = np.asarray(weights_N, np.float64).ravel()
  if values.shape != weights.shape:
    raise ValueError(f"values and weights differ in shape: {values.shape} vs {weights.shape}")
  if clusters_N is None:
    units = np.arange(values.size)
  else:
    units = np.asarray(clusters_N).ravel()
    if units.shape != values.shape:
      raise ValueError(f"clusters_N has {units.size} entries for {values.size} values")
  _, units = np.unique(units, return_inverse=True)
  g = int(units.max()) + 1 if units.size else 0
  if g < 2:
    raise ValueError(f"an interval needs at least 2 sequences (or documents); got {g}")
  total = weights.sum()
  if not total > 0:
    raise ValueError("the weights (token or byte counts) sum to zero")
  ratio = values.sum() / total
  residual_G = np.bincount(units, weights=values - ratio * weights, minlength=g)
  share_G = np.bincount(units, weights=weights, minlength=g) / total
  if share_G.max() >= 1.0:
    raise ValueError("one document holds all the weight: an interval needs at least 2 with weight")
  se = math.sqrt(np.sum(residual_G ** 2 / (1.0 - share_G))) / total
  effective = 1.0 / np.sum(share_G ** 2)
  return float(ratio), float(scipy.stats.t.ppf(0.5 + level / 2, max(effective - 1.0, 1.0)) * se)


def summarize(nats_N, tokens_N, bytes_N=None, documents_N=None, words_N=None) -> dict:
  """Bits per token (and per byte when ``bytes_N`` is given) with their 95% half-widths, and perplexity per
  token with its interval's ends, from per-sequence nats and token (byte) counts. With ``words_N`` (the words
  ending in each sequence, the data set's own unit: LM1B's words plus one end per sentence) also perplexity per
  word, exp(total nats / total words), with its interval. The intervals cluster the sequences by
  ``documents_N`` (``interval_units``); 'documents' counts the units (None: sequences)."""
  units, by_document = interval_units(np.size(tokens_N), documents_N)
  nats, half = ratio_mean_interval(nats_N, tokens_N, units)
  out = {"bits_per_token": nats / math.log(2.0), "bits_per_token_95": half / math.log(2.0),
         "perplexity": math.exp(nats), "perplexity_95": [math.exp(nats - half), math.exp(nats + half)],
         "nats_per_token": nats, "sequences": int(np.size(tokens_N)), "tokens": int(np.sum(tokens_N)),
         "documents": int(np.unique(units).size) if by_document else None,
         "interval_over": "documents" if by_document else "sequences"}
  if bytes_N is not None:
    per_byte, half_byte = ratio_mean_interval(nats_N, bytes_N, units)
    out.update(bits_per_byte=per_byte / math.log(2.0), bits_per_byte_95=half_byte / math.log(2.0),
               bytes=int(np.sum(bytes_N)))
  if words_N is not None:
    per_word, half_word = ratio_mean_interval(nats_N, words_N, units)
    out.update(perplexity_per_word=math.exp(per_word),
               perplexity_per_word_95=[math.exp(per_word - half_word), math.exp(per_word + half_word)],
               words=int(np.sum(words_N)))
  return out


def stratified_times(key, num_samples: int, batch: int, dtype=jnp.float32):
  """``t_KxB``: for each sequence a grid (k + u_b) / K, k < K, shifted by its own uniform u_b. Each t is uniform
  on [0, 1), so the mean over k is unbiased, and the K times cover [0, 1) evenly."""
  u_B = jax.random.uniform(key, (batch,), dtype=dtype)
  return (jnp.arange(num_samples, dtype=dtype)[:, None] + u_B[None, :]) / num_samples


def continuous_nelbo(process: Process, logits_fn, key, x0_BxL, *, num_time_samples: int, kind: str = "ctmc",
                     weights_BxL=None) -> dict:
  """The continuous-time NELBO per sequence with ``num_time_samples`` stratified times each, the
  reconstruction and prior terms included, nats ``[B]`` under 'nelbo', 'diffusion', 'recon', 'prior'.
  'times_KxB' and 'integrand_KxB' (the diffusion integrand at each time) feed ``loss_by_time``."""
  _checks.check_choice("continuous ELBO kind", kind, losses.CONTINUOUS_KINDS)
  if num_time_samples < 1:
    raise ValueError(f"num_time_samples must be >= 1; got {num_time_samples}")
  if kind == "masked" and not isinstance(process, AbsorbingProcess):
    raise ValueError(f"the masked ELBO needs the absorbing process; got {type(process).__name__}")
  term = losses.masked_diffusion if kind == "masked" else losses.ctmc_diffusion
  time_key, noise_key, recon_key = jax.random.split(key, 3)
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  times_KxB = stratified_times(time_key, num_time_samples, x0_BxL.shape[0], dtype)
  integrand_KxB = jax.lax.map(
      lambda args: term(process, logits_fn, args[0], x0_BxL, args[1], weights_BxL),
      (jax.random.split(noise_key, num_time_samples), times_KxB))
  out = {"diffusion": jnp.mean(integrand_KxB, axis=0),
         "recon": losses.reconstruction(process, logits_fn, recon_key, x0_BxL, weights_BxL),
         "prior": losses.prior(process, x0_BxL, weights_BxL)}
  out["nelbo"] = out["diffusion"] + out["recon"] + out["prior"]
  return {**out, "times_KxB": times_KxB, "integrand_KxB": integrand_KxB}


def loss_by_time(times_KxB, integrand_KxB, tokens_B, num_bins: int = 10) -> dict:
  """Where in t the bits are spent: the diffusion integrand in bits per token, averaged within ``num_bins``
  equal bins of t (its integral over t, the bins' mean, is the diffusion term). Returns bin edges, means and
  the draws per bin, as lists for JSON."""
  times = np.asarray(times_KxB, np.float64).ravel()
  per_token = (np.asarray(integrand_KxB, np.float64) / np.asarray(tokens_B, np.float64)[None, :]).ravel()
  which = np.minimum((times * num_bins).astype(int), num_bins - 1)
  counts = np.bincount(which, minlength=num_bins)
  sums = np.bincount(which, weights=per_token, minlength=num_bins)
  means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan) / math.log(2.0)
  return {"edges": np.linspace(0.0, 1.0, num_bins + 1).tolist(), "bits_per_token": means.tolist(),
          "draws": counts.tolist()}


def generative_perplexity(tokens_NxL, evaluator_nll_fn, vocab_size: int) -> dict:
  """Generative perplexity of samples under an evaluator model, with the unigram entropy of the samples.

  ``evaluator_nll_fn(tokens_NxL) -> nats [N]`` is the evaluator's exact negative log-likelihood of each sample
  (an AR model, or a source's own likelihood in tests). A low gen-ppl alone can mean degenerate samples: one
  token repeated scores well under most evaluators, and only its low unigram entropy gives it away.
  """
  tokens = np.asarray(tokens_NxL)
  nats_N = np.asarray(evaluator_nll_fn(tokens), np.float64)
  out = summarize(nats_N, np.full(tokens.shape[0], tokens.shape[1]))
  return {"gen_ppl": out["perplexity"], "gen_ppl_95": out["perplexity_95"],
          "gen_bits_per_token": out["bits_per_token"], "gen_bits_per_token_95": out["bits_per_token_95"],
          "unigram_entropy": sampling.unigram_entropy(tokens, vocab_size), "samples": int(tokens.shape[0])}


def validation_entropy(data, vocab_size: int) -> float:
  """The unigram entropy (bits) of ``data``'s validation text, padding excluded: the mark at which samplers'
  frontiers are read (``frontier_at_entropy``)."""
  return sampling.unigram_entropy(data.val_windows[data.val_weights > 0], vocab_size)


def frontier_at_entropy(points, entropy: float) -> float | None:
  """Generative perplexity at unigram ``entropy`` along a sampler's frontier: ``points`` are ``(entropy,
  gen_ppl)`` pairs from a sweep of temperature (or nucleus), sorted by entropy and interpolated linearly in
  log gen-ppl between the two that bracket ``entropy``; None when no two do. Comparing samplers at the data's own
  entropy removes the trade a lower temperature makes of diversity for gen-ppl."""
  pairs = sorted((float(h), float(p)) for h, p in points)
  for (h0, p0), (h1, p1) in zip(pairs, pairs[1:]):
    if h0 <= entropy <= h1:
      if h1 == h0:
        return math.exp((math.log(p0) + math.log(p1)) / 2)
      w = (entropy - h0) / (h1 - h0)
      return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
  return None


def infill(process: Process, logits_fn, key, windows_NxL, span_start: int, span_length: int,
           cfg: sampling.SamplerConfig, time_conditioned: bool = True) -> dict:
  """Holds out ``[span_start, span_start + span_length)`` of every window and fills it with the sampler, every
  other position given. Returns the filled windows ``[N, L]`` and the token accuracy of the filled span."""
  windows = np.asarray(windows_NxL)
  num, length = windows.shape
  if not (0 <= span_start and 1 <= span_length and span_start + span_length <= length):
    raise ValueError(f"the held-out span [{span_start}, {span_start + span_length}) must lie inside the windows' "
                     f"{length} positions and hold at least one token")
  held_out = np.zeros((num, length), bool)
  held_out[:, span_start:span_start + span_length] = True
  filled, _ = sampling.sample(process, logits_fn, key, num, length, cfg, jnp.asarray(~held_out),
                              jnp.asarray(windows, jnp.int32), time_conditioned=time_conditioned)
  filled = np.asarray(filled)
  return {"filled": filled, "accuracy": float(np.mean(filled[held_out] == windows[held_out])),
          "span": [span_start, span_start + span_length]}
