"""Evaluation that states its noise: likelihood with a 95% interval over documents, where in t the bits are
spent, and generative perplexity with the unigram entropy of the samples beside it.

Per-sequence values are nats ``[N]``; ``summarize`` turns them into bits per token, bits per byte and perplexity,
each a token- (or byte-) weighted ratio of sums with the half-width of its 95% interval (the delta method for a
ratio estimator). The unit of sampling is the document: windows cut from one file or article share its style
and difficulty, so they are not independent samples of text, and an interval that treated them as such would
be too narrow as a statement about unseen text (the stdlib validation split's 7,252 windows come from 34 files,
three of which hold half of them). Given each window's document, the interval is cluster-robust: the sums within
each document are the units (``ratio_mean_interval``: leverage-corrected, with a critical value exact under a
random-effects model fitted to the documents, since a few large ones carry the estimate). A split that is one
document (text8's single stream) has nothing to cluster by, so its interval is over windows (``interval_units``),
which treats neighbouring windows of one text as independent: it is narrower than one over documents would be.
Every Monte-Carlo estimate here (random times, random x_t) is independent across windows, so the interval covers
that noise as well as the spread of the data.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from d3pm_jax import _checks, losses, sampling
from d3pm_jax.processes import AbsorbingProcess, Process


# How ``ratio_mean_interval`` finds its critical value, recorded by ``summarize`` so that a report can say which
# method made the intervals it prints (evaluations written before it used Student's t over Kish's n_eff - 1).
INTERVAL_METHOD = "cr2_working_model"


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
  V_g, W_g and weight shares h_g = W_g / W. The standard error is the delta method's for the ratio with each
  unit's residual scaled by its leverage (CR2, Bell & McCaffrey 2002): se^2 = sum_g (V_g - r W_g)^2 / (1 - h_g)
  / W^2. The half-width is se times the ``level`` quantile of |r - rate| / se under a working model fitted to the
  data (``_working_variances``: each unit's rate off the true one by a document effect plus its windows' own
  noise), computed by ``_critical_value``. With equal units this is Student's t with G - 1 degrees of freedom (to
  the draws' accuracy). Student's t with Bell-McCaffrey's or Kish's degrees of freedom covers only ~93% when a few
  large documents with effects of their own carry the estimate (tests/test_evaluate.py): se is then biased low
  and grows with the error it scales, which no choice of degrees of freedom describes. Needs G >= 2."""
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
  variance_G = _working_variances(values, weights, units, share_G * total, residual_G)
  return float(ratio), float(_critical_value(share_G, variance_G, level) * se)


def _working_variances(values_N, weights_N, units_N, weight_G, residual_G) -> np.ndarray:
  """The variance of each unit's residual sum V_g - rate W_g ``[G]`` (up to a common factor) under a random-effects
  working model fitted by moments: sequence i of unit g has rate y_i = V_i / W_i = rate + u_g + e_i, with a unit
  effect u_g of variance tau^2 and noise e_i of variance sigma^2 / W_i, so the variance is
  sigma^2 W_g + tau^2 W_g^2. sigma^2 is the weighted spread of the rates within units, tau^2 what the spread
  between units holds beyond it (one-way ANOVA, weighted; 0 when negative). Units of one sequence each cannot
  tell the two apart: then W_g (tau = 0), the model under which CR2 is unbiased."""
  positive = weights_N > 0
  rate_G = np.divide(np.bincount(units_N, weights=values_N, minlength=weight_G.size), weight_G,
                     out=np.zeros_like(weight_G), where=weight_G > 0)
  within_dof = positive.sum() - np.count_nonzero(weight_G)
  if within_dof == 0:
    return weight_G
  spread = values_N[positive] - weights_N[positive] * rate_G[units_N[positive]]
  sigma2 = np.sum(spread ** 2 / weights_N[positive]) / within_dof
  total = weight_G.sum()
  between = np.sum(np.divide(residual_G ** 2, weight_G, out=np.zeros_like(weight_G), where=weight_G > 0))
  tau2 = max(0.0, (between - sigma2 * (np.count_nonzero(weight_G) - 1)) / (total - np.sum(weight_G ** 2) / total))
  variance_G = sigma2 * weight_G + tau2 * weight_G ** 2
  return variance_G if variance_G.sum() > 0 else weight_G


def _critical_value(share_G, variance_G, level: float) -> float:
  """The ``level`` quantile of |T|, T = (r - rate) / se, when each unit's residual sum z_g = V_g - rate W_g is
  independent normal with variance ``variance_G`` (any common scale): the critical value that makes the interval
  exact under that working model.

  With N = sum_g z_g = W (r - rate) ~ N(0, S) and R_g = z_g - (s_g / S) N, which is independent of N, the CR2
  variance is sum_g (R_g + b_g N)^2 / (1 - h_g) / W^2 with b_g = s_g / S - h_g, a quadratic in N. So given R the
  event |T| <= c is an interval of N (or its complement) whose probability is exact (normal CDF); its mean over
  R is taken over seeded draws (``_standard_normals``: 2^17 numbers, so 65,536 draws for 2 units and 3,855 for
  34; never under 256, as many units vary less): within ~0.5% of the exact critical value from 5 units on (1.5%
  at 2), ~0.1% of coverage. Where b = 0 (equal units, or no unit effect: s_g proportional to W_g) N and se are
  independent, as Student's t assumes."""
  s_G = np.asarray(variance_G, np.float64) / np.sum(variance_G)  # S = 1
  d_G = 1.0 / (1.0 - share_G)
  b_G = s_G - share_G
  g = s_G.size
  draws = int(np.clip(2 ** 17 // g, 256, 2 ** 16))
  # Per draw: N, sum_g d_g z_g^2, sum_g d_g s_g z_g and sum_g d_g b_g z_g, with z_g = sqrt(s_g) x_g.
  linear_Gx3 = np.sqrt(s_G)[:, None] * np.stack([np.ones(g), d_G * s_G, d_G * b_G], axis=1)
  sums_Dx4 = np.zeros((draws, 4))
  for start in range(0, g, 4096):  # in slices of units, so memory stays bounded however many there are
    x_DxU = _standard_normals(draws, g, start, 4096)
    part = slice(start, start + x_DxU.shape[1])
    sums_Dx4[:, :3] += x_DxU @ linear_Gx3[part]
    sums_Dx4[:, 3] += x_DxU ** 2 @ (d_G * s_G)[part]
  n_D, along_s_D, along_b_D, square_D = sums_Dx4.T
  # sum_g d_g (R_g + b_g N)^2 = a0 + 2 a1 N + a2 N^2, with R_g = z_g - s_g N expanded.
  a0_D = square_D - 2.0 * n_D * along_s_D + n_D ** 2 * np.sum(d_G * s_G ** 2)
  a1_D = along_b_D - n_D * np.sum(d_G * b_G * s_G)
  a1_squared_D = a1_D ** 2
  a2 = np.sum(d_G * b_G ** 2)

  def coverage(c):
    # |N| <= c se  <=>  k N^2 - 2 a1 N - a0 <= 0 with k = 1 / c^2 - a2, N ~ N(0, 1): between the roots
    # (a1 -+ root) / k where k > 0, outside them where k < 0.
    k = 1.0 / (c * c) - a2
    if abs(k) < 1e-12:  # linear: 2 a1 N >= -a0
      return float(np.mean(scipy.special.ndtr(a0_D / np.maximum(2.0 * np.abs(a1_D), 1e-300))))
    root_D = np.sqrt(np.maximum(a1_squared_D + k * a0_D, 0.0))
    between = np.mean(scipy.special.ndtr((a1_D + root_D) / k) - scipy.special.ndtr((a1_D - root_D) / k))
    return float(between if k > 0 else 1.0 + between)

  high = 4.0  # coverage(c) ~ c for small c
  while coverage(high) < level:
    high *= 2.0
  return scipy.optimize.brentq(lambda c: coverage(c) - level, 1e-6, high, xtol=1e-8)


@functools.lru_cache(maxsize=1)
def _normal_pool() -> np.ndarray:
  """2^20 seeded standard normals, drawn once per process (read-only)."""
  pool = np.random.default_rng(0).standard_normal(2 ** 20)
  pool.flags.writeable = False
  return pool


def _standard_normals(draws: int, units: int, start: int, width: int) -> np.ndarray:
  """Columns ``[start, start + width)`` (clipped to ``units``) of a fixed ``[draws, units]`` array of standard
  normals: a view of ``_normal_pool`` where the array fits in it, else drawn from a generator seeded by the
  slice, so the same arguments always give the same numbers."""
  stop = min(start + width, units)
  if draws * units <= _normal_pool().size:
    return _normal_pool()[:draws * units].reshape(draws, units)[:, start:stop]
  return np.random.default_rng([units, start]).standard_normal((draws, stop - start))


def summarize(nats_N, tokens_N, bytes_N=None, documents_N=None, words_N=None) -> dict:
  """Bits per token (and per byte when ``bytes_N`` is given) with their 95% half-widths, and perplexity per
  token with its interval's ends, from per-sequence nats and token (byte) counts. With ``words_N`` (the words
  ending in each sequence, the data set's own unit: LM1B's words plus one end per sentence) also perplexity per
  word, exp(total nats / total words), with its interval. The intervals cluster the sequences by
  ``documents_N`` (``interval_units``); 'documents' counts the units (None: sequences), 'interval_over' names them
  and 'interval_method' is ``INTERVAL_METHOD``."""
  units, by_document = interval_units(np.size(tokens_N), documents_N)
  nats, half = ratio_mean_interval(nats_N, tokens_N, units)
  out = {"bits_per_token": nats / math.log(2.0), "bits_per_token_95": half / math.log(2.0),
         "perplexity": math.exp(nats), "perplexity_95": [math.exp(nats - half), math.exp(nats + half)],
         "nats_per_token": nats, "sequences": int(np.size(tokens_N)), "tokens": int(np.sum(tokens_N)),
         "documents": int(np.unique(units).size) if by_document else None,
         "interval_over": "documents" if by_document else "sequences", "interval_method": INTERVAL_METHOD}
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


def paired_gen_ppl_ratio(nats_a_N, nats_b_N, tokens_per_sample: int, level: float = 0.95,
                         resolve: float = 0.10) -> dict:
  """Sampler A's generative perplexity over sampler B's from paired samples (sample i of each drawn with the same
  key, or from the same prompt), where the pairing cancels what the two share: the ratio exp(mean(d) / L) of the
  per-sample nats' differences d, exactly the ratio of the two gen-ppls, with a Student-t interval on mean(d)
  (N - 1 degrees of freedom), whether it excludes 1 ('resolved'), and how many pairs would narrow the interval's
  half-width to a ``resolve`` (10%) difference at this spread: t^2 sd^2 / log(1 + resolve)^2, d in nats a token."""
  a, b = np.asarray(nats_a_N, np.float64), np.asarray(nats_b_N, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"paired samples need two [N] arrays of the same N >= 2; got shapes {a.shape} and {b.shape}")
  d = (a - b) / tokens_per_sample
  t = scipy.stats.t.ppf(0.5 + level / 2, d.size - 1)
  half = t * d.std(ddof=1) / math.sqrt(d.size)
  lo, hi = math.exp(d.mean() - half), math.exp(d.mean() + half)
  needed = math.ceil((t * d.std(ddof=1) / math.log1p(resolve)) ** 2)
  return {"ratio": math.exp(d.mean()), "ratio_95": (lo, hi), "resolved": not lo <= 1.0 <= hi,
          "pairs": int(d.size), "pairs_to_resolve": needed}


def validation_entropy(data, vocab_size: int) -> float:
  """The unigram entropy (bits) of ``data``'s whole validation text, padding excluded. A frontier is read at
  ``entropy_mark`` instead: the plug-in entropy of a sample is biased low by about (V - 1) / (2 n ln 2) bits for
  n tokens, so the whole split reads higher than any batch of samples the size of a frontier's points."""
  return sampling.unigram_entropy(data.val_windows[data.val_weights > 0], vocab_size)


def entropy_mark(windows_NxL, weights_NxL, vocab_size: int, num_windows: int, draws: int = 200,
                 seed: int = 0) -> dict:
  """The data's unigram entropy (bits) measured as a frontier's points measure theirs: the plug-in entropy of
  ``num_windows`` validation windows (the samples a point holds, of the same length) drawn at random without
  replacement, over ``draws`` draws, padding excluded. Returns its 'mean' and 'std' over the draws, the 'draws'
  themselves, 'resampled_draws' (each draw's windows redrawn with replacement, as ``frontier_reading``'s bootstrap
  redraws a point's samples: the repeats lower a plug-in entropy, so its replicates compare like with like),
  'windows' and the 'whole_split' plug-in entropy."""
  windows, weights = np.asarray(windows_NxL), np.asarray(weights_NxL) > 0
  available = windows.shape[0]
  if not 1 <= num_windows <= available:
    raise ValueError(f"the entropy mark draws num_windows={num_windows} validation windows of {available}; "
                     f"give 1 <= num_windows <= {available}")
  rng = np.random.default_rng(seed)
  entropy = lambda rows: sampling.unigram_entropy(windows[rows][weights[rows]], vocab_size)
  values, resampled = [], []
  for _ in range(draws):
    rows = rng.choice(available, num_windows, replace=False)
    values.append(entropy(rows))
    resampled.append(entropy(rng.choice(rows, num_windows, replace=True)))
  values = np.array(values)
  return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if draws > 1 else 0.0,
          "draws": values, "resampled_draws": np.array(resampled), "windows": int(num_windows),
          "whole_split": sampling.unigram_entropy(windows[weights], vocab_size)}


def frontier_is_monotone(entropies) -> bool:
  """Whether a sweep's unigram entropies, in the order of rising temperature, rise (non-strictly)."""
  values = [float(h) for h in entropies]
  return all(b >= a for a, b in zip(values, values[1:]))


def frontier_at_entropy(points, entropy: float) -> float | None:
  """Generative perplexity at unigram ``entropy`` along a sampler's frontier: ``points`` are ``(entropy,
  gen_ppl)`` pairs in the order of the sweep (rising temperature, or nucleus), interpolated linearly in log
  gen-ppl between two neighbouring points that bracket ``entropy`` (the first such pair); None when none do.
  Only neighbours are paired: where sampling noise breaks the entropy's rise (``frontier_is_monotone``), points
  from non-adjacent temperatures are never joined. Comparing samplers at the data's own entropy removes the trade
  a lower temperature makes of diversity for gen-ppl."""
  pairs = [(float(h), float(p)) for h, p in points]
  for (h0, p0), (h1, p1) in zip(pairs, pairs[1:]):
    if min(h0, h1) <= entropy <= max(h0, h1):
      if h1 == h0:
        return math.exp((math.log(p0) + math.log(p1)) / 2)
      w = (entropy - h0) / (h1 - h0)
      return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
  return None


def frontier_reading(sweep, vocab_size: int, mark: dict, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
  """A temperature frontier read at the data's entropy ``mark`` (``entropy_mark``), with a bootstrap interval.

  ``sweep``: ``(tokens_NxL, nats_N)`` per point, in the order of rising temperature (each point's samples and the
  evaluator's nats of each). The reading is ``frontier_at_entropy`` of the points at the mark's mean. Each of
  ``resamples`` bootstrap replicates redraws every point's samples with replacement (their entropy and gen-ppl
  both move) and the mark from its draws redrawn the same way (``entropy_mark``'s 'resampled_draws': a bootstrap
  replicate repeats samples, which lowers the points' plug-in entropies as much), then reads again; the interval
  is the replicates' central ``level``,
  an end None (unbounded) where more than its tail of the replicates fall outside the sweep. Returns 'gen_ppl',
  'gen_ppl_95', 'bracketed' (the share of replicates the sweep brackets) and 'monotone'."""
  rng = np.random.default_rng(seed)
  tokens = [np.asarray(t) for t, _ in sweep]
  nats = [np.asarray(n, np.float64) for _, n in sweep]

  def point(t_NxL, n_N):
    return sampling.unigram_entropy(t_NxL, vocab_size), math.exp(n_N.sum() / t_NxL.size)

  points = [point(t, n) for t, n in zip(tokens, nats)]
  reading = frontier_at_entropy(points, mark["mean"])
  logs = []  # log gen-ppl of each replicate; -inf / +inf where its mark lies below / above its whole sweep
  for _ in range(resamples):
    drawn = [point(t[rows], n[rows]) for t, n in zip(tokens, nats)
             for rows in (rng.integers(0, t.shape[0], t.shape[0]),)]
    at = float(rng.choice(mark["resampled_draws"]))
    value = frontier_at_entropy(drawn, at)
    logs.append(math.log(value) if value is not None else
                (-math.inf if at < min(h for h, _ in drawn) else math.inf))
  logs = np.array(logs)
  tail = (1.0 - level) / 2
  # Order statistics, not interpolated between them (an end may be infinite), each taken outward.
  lo = np.quantile(logs, tail, method="lower") if resamples else math.nan
  hi = np.quantile(logs, 1.0 - tail, method="higher") if resamples else math.nan
  return {"gen_ppl": reading,
          "gen_ppl_95": (math.exp(lo) if np.isfinite(lo) else None, math.exp(hi) if np.isfinite(hi) else None),
          "monotone": frontier_is_monotone([h for h, _ in points]),
          "bracketed": float(np.mean(np.isfinite(logs))) if resamples else math.nan,
          "entropies": [h for h, _ in points], "gen_ppls": [p for _, p in points]}


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
