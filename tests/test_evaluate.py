"""Evaluation: the interval is the standard error it claims to be and covers at its level; with the exact
denoiser of a Markov source the likelihood equals the exact NLL within its interval and a wrong denoiser falls
outside; generative perplexity under the source's own likelihood recovers its entropy rate."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from d3pm_jax import get_schedule, losses, make_process, sampling
from d3pm_jax.data import pipeline
from d3pm_jax.data.synthetic import MarkovSource
from d3pm_jax.evaluation import evaluate


def test_equal_weights_give_the_standard_error_of_the_mean():
  """Equal weights: the t interval of a mean (t with N - 1 degrees of freedom), per sequence and, with equal
  documents, over the documents' means. The ratio and its standard error are exact; the critical value is the
  t quantile to the accuracy of its draws (0.3%; measured 0.1% and 0.2%). Mutations: a normal quantile (2.5% low
  over 50 documents); ignoring the documents."""
  rng = np.random.default_rng(0)
  values = rng.normal(10.0, 3.0, 500)
  ratio, half = evaluate.ratio_mean_interval(values, np.full(500, 4.0))
  assert ratio == pytest.approx(values.mean() / 4.0, rel=1e-12)
  assert half == pytest.approx(scipy.stats.t.ppf(0.975, 499) * values.std(ddof=1) / math.sqrt(500) / 4.0, rel=3e-3)
  means = values.reshape(50, 10).mean(axis=1)  # 50 documents of 10 sequences each
  _, half = evaluate.ratio_mean_interval(values, np.full(500, 4.0), np.repeat(np.arange(50), 10))
  assert half == pytest.approx(scipy.stats.t.ppf(0.975, 49) * means.std(ddof=1) / math.sqrt(50) / 4.0, rel=3e-3)


def stdlib_like_documents(rng):
  """34 documents of log-normal sizes, the three largest holding 49% of 2,397 windows (the stdlib split's shape)."""
  sizes = np.maximum(1, np.round(np.exp(rng.normal(3.5, 1.3, 34)))).astype(int)
  assert sizes.sum() == 2397 and np.sort(sizes)[-3:].sum() / sizes.sum() > 0.48
  return sizes


@pytest.mark.parametrize("effects", [True, False])
def test_the_critical_value_is_the_quantile_of_the_studentised_error_under_the_working_model(effects):
  """Residual sums z_g independent normal with variances s_g (documents with effects of their own: s = W_g^2;
  windows' noise alone: s = W_g), shares of the stdlib-like split: ``_critical_value`` equals the 95% quantile of
  |N| / se_CR2 over 100,000 plain draws of z (N = sum z, se from the residuals z - h N), within 2% (the
  quantile's own sd ~0.3%, the draws' inside the critical value ~0.4%). With effects it is 2.48, above Student's
  t over Kish's effective number of documents (2.28). Mutations: treating se as independent of N (3.2 with
  effects); a t quantile over n_eff - 1."""
  share = stdlib_like_documents(np.random.default_rng(1)).astype(float)
  share /= share.sum()
  s = share ** 2 if effects else share
  z = np.random.default_rng(7).standard_normal((100_000, share.size)) * np.sqrt(s)
  n = z.sum(axis=1)
  se = np.sqrt(np.sum((z - n[:, None] * share) ** 2 / (1.0 - share), axis=1))
  want = np.quantile(np.abs(n) / se, 0.95)
  got = evaluate._critical_value(share, s, 0.95)
  assert got == pytest.approx(want, rel=0.02)
  kish = scipy.stats.t.ppf(0.975, 1.0 / np.sum(share ** 2) - 1.0)
  assert (got > 1.05 * kish) if effects else (got < kish), (got, kish)


def test_intervals_clustered_by_document_cover_where_per_window_ones_do_not():
  """4,000 simulated validation splits shaped like the stdlib one (``stdlib_like_documents``; window lengths
  60-128 tokens): each document has its own difficulty (sd 0.15 nats per token) on top of per-window noise. The
  interval clustered by document covers the true rate in 94-96% of them (measured 95.0%). The binomial sd of the
  estimate is 0.34% at 95% coverage (0.40% at 93%), so a correct interval falls below 94% with probability 0.2%
  and one that covers 93% passes with probability 0.7%. The per-window interval, over the first 500 splits, covers
  in under a fifth. Mutations: Student's t with Kish's n_eff - 1 degrees of freedom (the interval this one
  replaced: 93.3% here) or Bell-McCaffrey's (93.2%); ignoring the documents; dropping the leverage correction."""
  rng = np.random.default_rng(1)
  documents = np.repeat(np.arange(34), stdlib_like_documents(rng))
  rate, clustered, per_window, sims = 1.5, 0, 0, 4000
  for i in range(sims):
    effect = rng.normal(0.0, 0.15, 34)
    tokens = rng.integers(60, 129, documents.size).astype(float)
    nats = tokens * (rate + effect[documents]) + rng.normal(0.0, 8.0, documents.size)
    ratio, half = evaluate.ratio_mean_interval(nats, tokens, documents)
    clustered += abs(ratio - rate) <= half
    if i < 500:
      ratio, half = evaluate.ratio_mean_interval(nats, tokens)
      per_window += abs(ratio - rate) <= half
  assert 0.94 <= clustered / sims <= 0.96, clustered / sims
  assert per_window / 500 < 0.2, per_window / 500


def test_summarize_counts_documents_and_falls_back_to_windows_for_one_stream():
  """Two documents of two windows each: the interval is over the documents (wider here) and says so; one
  document for the whole split (text8's single stream) falls back to windows rather than failing. Mutations:
  ignoring ``documents_N``; refusing a single-document split."""
  nats, tokens = np.array([10.0, 14.0, 9.0, 13.0]), np.array([5, 7, 4, 6])
  by_document = evaluate.summarize(nats, tokens, documents_N=[0, 0, 1, 1])
  assert (by_document["documents"], by_document["interval_over"], by_document["sequences"]) == (2, "documents", 4)
  # Two documents, so a critical value for two units (t with 1 degree of freedom for equal ones): wider than
  # over four windows.
  per_window = evaluate.summarize(nats, tokens)
  assert by_document["bits_per_token_95"] > per_window["bits_per_token_95"]
  one_stream = evaluate.summarize(nats, tokens, documents_N=[3, 3, 3, 3])  # text8: one document per split
  assert (one_stream["documents"], one_stream["interval_over"]) == (None, "sequences")
  assert one_stream["bits_per_token_95"] == per_window["bits_per_token_95"]


def test_a_report_says_its_interval_is_per_window_and_why_where_the_split_is_one_stream():
  """``interval_statement`` (the ± sentence of d3pm-compare's report): over documents, naming the critical value
  the summaries record, where the split has documents; over windows, saying that the split has none (one stream,
  as text8's) and that the interval is narrower for it, where it has one; both where runs differ. A summary from
  before the method was recorded keeps Student's t. Mutation: a report that says 'over documents' regardless."""
  from d3pm_jax.evaluation import eval_workdir
  nats, tokens = np.array([10.0, 14.0, 9.0, 13.0]), np.array([5, 7, 4, 6])
  by_document = evaluate.summarize(nats, tokens, documents_N=[0, 0, 1, 1])
  one_stream = evaluate.summarize(nats, tokens, documents_N=[3, 3, 3, 3])
  statement = eval_workdir.interval_statement([by_document])
  assert statement.startswith("± is a 95% interval over documents: ") and "random-effects model" in statement
  statement = eval_workdir.interval_statement([one_stream])
  assert statement.startswith("± is a 95% interval over windows: the split records no documents")
  assert "text8" in statement and "narrower than one over documents" in statement
  statement = eval_workdir.interval_statement([by_document, one_stream])
  assert "over documents where a count of documents is given" in statement
  assert "Elsewhere it is over windows" in statement
  old = {k: v for k, v in by_document.items() if k != "interval_method"}
  assert "Student's t over the effective number of documents" in eval_workdir.interval_statement([old])


def test_ratio_interval_covers_the_true_ratio_95_percent_of_the_time():
  """2000 data sets of 200 sequences with random lengths and nats = rate * length + noise: the interval
  contains the true rate in 95% of them (binomial sd 0.5%, so 93.5% - 96.5%)."""
  rng = np.random.default_rng(1)
  rate, hits = 1.7, 0
  for _ in range(2000):
    lengths = rng.integers(5, 60, 200)
    nats = rate * lengths + rng.normal(0.0, 1.0, 200) * np.sqrt(lengths) * 2.0
    ratio, half = evaluate.ratio_mean_interval(nats, lengths)
    hits += abs(ratio - rate) <= half
  assert 0.935 <= hits / 2000 <= 0.965, hits / 2000


def test_summarize_bits_per_byte_is_bits_per_token_times_tokens_per_byte():
  nats = np.array([10.0, 14.0, 9.0])
  tokens, byte_counts = np.array([5, 7, 4]), np.array([20, 21, 15])
  out = evaluate.summarize(nats, tokens, byte_counts)
  assert out["bits_per_byte"] == pytest.approx(out["bits_per_token"] * tokens.sum() / byte_counts.sum(), rel=1e-12)
  assert out["perplexity"] == pytest.approx(math.exp(nats.sum() / tokens.sum()))
  lo, hi = out["perplexity_95"]
  assert lo < out["perplexity"] < hi
  with pytest.raises(ValueError, match="at least 2 sequences"):
    evaluate.ratio_mean_interval([1.0], [1.0])


SOURCE = MarkovSource.random(seed=0, num_states=4, concentration=2.0)
N, L = 2048, 8


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,kind", [("absorbing", "masked"), ("absorbing", "d3pm"), ("uniform", "ctmc")])
def test_oracle_likelihood_equals_exact_nll_within_its_interval(name, kind):
  """The exact denoiser's bound equals the NLL of the same 2048 sequences within the stated 95% interval
  (~0.02 bits per token here); the same denoiser at temperature 2 is worse by more than the interval. eps = 0.05
  makes the reconstruction and prior terms worth ~0.1 bits per token, so leaving either out fails too."""
  proc = make_process(name, 4 + (name == "absorbing"), get_schedule("linear", eps=0.05))
  x0 = SOURCE.sample(jax.random.PRNGKey(0), N, L)
  tokens = np.full(N, L)
  exact = evaluate.summarize(-np.asarray(SOURCE.log_prob(x0)), tokens)["bits_per_token"]
  oracle = SOURCE.oracle_logits_fn(proc)
  tempered = lambda x_t, t: 0.5 * oracle(x_t, t)

  def estimate(fn):
    if kind == "d3pm":  # the exact full-T bound, T = 200 (its gap over the NLL is ~1e-3 bits here)
      nats = jax.jit(lambda k: losses.d3pm_vlb_exact(proc, fn, k, x0, 200))(jax.random.PRNGKey(2))
    else:
      nats = jax.jit(lambda k: evaluate.continuous_nelbo(proc, fn, k, x0, num_time_samples=16, kind=kind)["nelbo"])(
          jax.random.PRNGKey(1))
    return evaluate.summarize(nats, tokens)

  good, bad = estimate(oracle), estimate(tempered)
  assert 0.005 < good["bits_per_token_95"] < 0.06
  assert abs(good["bits_per_token"] - exact) <= good["bits_per_token_95"], (good, exact)
  assert bad["bits_per_token"] - exact > bad["bits_per_token_95"], (bad, exact)


def test_loss_by_time_bins_integrate_to_the_diffusion_term():
  proc = make_process("absorbing", 5, get_schedule("linear"))
  x0 = SOURCE.sample(jax.random.PRNGKey(3), 64, L)
  out = evaluate.continuous_nelbo(proc, SOURCE.oracle_logits_fn(proc), jax.random.PRNGKey(4), x0,
                                  num_time_samples=10, kind="masked")
  bins = evaluate.loss_by_time(out["times_KxB"], out["integrand_KxB"], np.full(64, L), num_bins=10)
  assert bins["draws"] == [64] * 10  # stratified: one draw per sequence in every bin
  diffusion_bits = float(jnp.sum(out["diffusion"])) / (64 * L) / math.log(2.0)
  assert np.mean(bins["bits_per_token"]) == pytest.approx(diffusion_bits, rel=1e-5)
  assert bins["edges"][0] == 0.0 and bins["edges"][-1] == 1.0 and len(bins["bits_per_token"]) == 10


def sticky_source():
  """State 0 stays with probability 0.9, so repeating it scores well under the source."""
  trans = np.array([[0.9, 0.05, 0.03, 0.02], [0.3, 0.2, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
  return MarkovSource(initial_K=np.array([0.4, 0.2, 0.2, 0.2]), transition_KxK=trans)


def test_generative_perplexity_recovers_the_entropy_rate_and_exposes_degenerate_samples():
  src = sticky_source()
  nll = lambda tokens: -np.asarray(src.log_prob(jnp.asarray(tokens)), np.float64)
  length, num = 32, 4000
  from_source = evaluate.generative_perplexity(src.sample(jax.random.PRNGKey(0), num, length), nll, 4)
  entropy_bits = src.entropy(length) / length / math.log(2.0)
  assert abs(from_source["gen_bits_per_token"] - entropy_bits) <= from_source["gen_bits_per_token_95"]
  uniform = evaluate.generative_perplexity(jax.random.randint(jax.random.PRNGKey(1), (num, length), 0, 4), nll, 4)
  assert uniform["gen_bits_per_token"] > entropy_bits + 0.3
  assert uniform["unigram_entropy"] > 1.99
  repeated = evaluate.generative_perplexity(np.zeros((num, length), np.int32), nll, 4)
  assert repeated["gen_ppl"] < 0.6 * from_source["gen_ppl"]  # gen-ppl alone would rank it best...
  assert repeated["unigram_entropy"] == 0.0 < from_source["unigram_entropy"] - 1.0  # ...its entropy gives it away


def test_bits_per_byte_of_a_sentencepiece_model_counts_the_texts_bytes(tmp_path):
  """Windows of a sentencepiece-encoded text (the last one padded), each window's bytes the sum of its tokens'
  ``encode_with_bytes`` counts (what a prepared split records per row): bits per byte is the total nats over the
  text's own byte length, i.e. bits per token times tokens per byte of the same text."""
  from d3pm_jax.data import stdlib, tokenizers
  files = stdlib.list_files()
  tok = tokenizers.SentencePieceTokenizer.train(stdlib.read_files(files[:40]), str(tmp_path / "spm"), vocab_size=400)
  text = b"".join(stdlib.read_files(files[40:50])) + "caf\u00e9 \u2581 \u4e2d\u6587\n".encode() + b"\xff\xfe"
  ids, counts = tok.encode_with_bytes(text)
  windows, weights = pipeline.pack([ids], 64)
  byte_counts = pipeline.pack([counts], 64)[0].sum(axis=1)
  nats_per_position = np.random.default_rng(0).uniform(0.5, 3.0, windows.shape) * weights
  out = evaluate.summarize(nats_per_position.sum(1), weights.sum(1), byte_counts)
  assert out["bytes"] == len(text) and out["tokens"] == len(ids) < 0.7 * len(text)
  assert out["bits_per_byte"] == pytest.approx(nats_per_position.sum() / len(text) / math.log(2.0), rel=1e-12)
  assert out["bits_per_byte"] == pytest.approx(out["bits_per_token"] * len(ids) / len(text), rel=1e-12)


@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_infilling_accuracy_is_one_for_a_denoiser_that_knows_the_text_and_chance_for_noise(strategy):
  from d3pm_jax.sampling import SamplerConfig
  vocab = 9  # 8 data tokens and the mask
  proc = make_process("absorbing", vocab, get_schedule("linear"))
  windows = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (400, 12), 0, vocab - 1))
  cfg = SamplerConfig(num_steps=8, strategy=strategy)
  knowing = lambda x_t, t: 20.0 * jax.nn.one_hot(jnp.asarray(windows), vocab)  # sure of the true text
  out = evaluate.infill(proc, knowing, jax.random.PRNGKey(1), windows, 3, 5, cfg, time_conditioned=False)
  assert out["accuracy"] == 1.0 and out["span"] == [3, 8]
  np.testing.assert_array_equal(out["filled"], windows)
  noise = lambda x_t, t: jax.random.normal(jax.random.PRNGKey(2), x_t.shape + (vocab,))
  out = evaluate.infill(proc, noise, jax.random.PRNGKey(3), windows, 3, 5, cfg, time_conditioned=False)
  np.testing.assert_array_equal(np.delete(out["filled"], np.s_[3:8], axis=1), np.delete(windows, np.s_[3:8], axis=1))
  assert abs(out["accuracy"] - 1 / 8) < 0.05  # 2000 filled tokens: chance is 1/8 +- 0.007
  with pytest.raises(ValueError, match=r"span \[10, 15\) must lie inside"):
    evaluate.infill(proc, noise, jax.random.PRNGKey(3), windows, 10, 5, cfg)


def test_a_tempered_exact_sampler_traces_a_frontier_through_the_sources_own_point():
  """A Markov source sampled exactly with its conditionals tempered by the sampler's knob (``sampling.categorical``)
  at temperatures 0.6 - 1.5, temperature 1 left out: gen-ppl under the source rises with the samples' unigram
  entropy, and the frontier read at the entropy of the source's own text (a separate sample) gives that text's
  own gen-ppl to within 1.5% (measured 0.5%; the figures' sampling noise is ~0.5%). Mutations: a knob that does
  not temper (the points collapse onto one and no longer rise); reading the nearest sweep point instead of
  interpolating (6% off)."""
  from d3pm_jax import sampling
  source = MarkovSource.random(seed=2, num_states=6, concentration=0.5)
  log_init, log_trans = jnp.log(jnp.asarray(source.initial_K)), jnp.log(jnp.asarray(source.transition_KxK))
  num, length = 4000, 32

  def tempered_samples(key, temperature):
    cfg = sampling.SamplerConfig(temperature=temperature)
    first_key, key = jax.random.split(key)
    first = sampling.categorical(first_key, jnp.broadcast_to(log_init, (num, 6)), cfg)

    def step(prev, step_key):
      token = sampling.categorical(step_key, log_trans[prev], cfg)
      return token, token

    _, rest = jax.lax.scan(step, first, jax.random.split(key, length - 1))
    return np.concatenate([np.asarray(first)[:, None], np.asarray(rest).T], axis=1)

  score = lambda tokens: -np.asarray(source.log_prob(jnp.asarray(tokens)), np.float64)
  points = []
  for k, temperature in enumerate((0.6, 0.8, 0.9, 1.1, 1.25, 1.5)):
    out = evaluate.generative_perplexity(tempered_samples(jax.random.PRNGKey(k), temperature), score, 6)
    points.append((out["unigram_entropy"], out["gen_ppl"]))
  entropies, ppls = zip(*points)
  assert list(entropies) == sorted(entropies) and list(ppls) == sorted(ppls)  # the frontier rises
  data = evaluate.generative_perplexity(tempered_samples(jax.random.PRNGKey(99), 1.0), score, 6)
  at = evaluate.frontier_at_entropy(points, data["unigram_entropy"])
  assert at == pytest.approx(data["gen_ppl"], rel=0.015)
  assert evaluate.frontier_at_entropy(points, max(entropies) + 0.1) is None  # outside the sweep: no reading


def _zipf_markov_source(vocab: int, seed: int):
  """A Markov chain whose rows share a Zipfian part (0.7) beside their own Dirichlet(0.5) part, so that tempering
  its conditionals moves the samples' unigram entropy by bits, not hundredths."""
  from d3pm_jax.data.synthetic import MarkovSource
  rng = np.random.default_rng(seed)
  zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
  zipf /= zipf.sum()
  return MarkovSource(initial_K=zipf, transition_KxK=0.7 * zipf + 0.3 * rng.dirichlet(np.full(vocab, 0.5), vocab))


def _tempered_markov_samples(source, key, num: int, length: int, temperature: float) -> np.ndarray:
  return np.asarray(_tempered_markov_draw(jnp.log(jnp.asarray(source.initial_K)),
                                          jnp.log(jnp.asarray(source.transition_KxK)), key, temperature, num, length))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _tempered_markov_draw(log_init, log_trans, key, temperature, num: int, length: int):
  first_key, key = jax.random.split(key)
  first = jax.random.categorical(first_key, log_init / temperature, shape=(num,))

  def step(prev, step_key):
    token = jax.random.categorical(step_key, log_trans[prev] / temperature)
    return token, token

  _, rest = jax.lax.scan(step, first, jax.random.split(key, length - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def test_the_entropy_mark_is_the_datas_entropy_at_the_samples_size():
  """An exact sampler's batches of 32 windows read, on average, the mark ``entropy_mark`` measures at 32 windows
  (within 3 standard errors over 60 batches), and the mark's spread is theirs; the whole split's plug-in entropy
  (about 3,000 windows: what the mark was before) reads 0.4 bits higher at a vocabulary of 512, the bias of a
  plug-in entropy on fewer tokens. Mutation: a mark over the whole split (or over more windows than the samples)."""
  vocab, num, length = 512, 32, 32
  source = _zipf_markov_source(vocab, seed=3)
  val = np.asarray(source.sample(jax.random.PRNGKey(123), 3000, length))
  mark = evaluate.entropy_mark(val, np.ones_like(val), vocab, num, draws=200, seed=0)
  batches = [sampling.unigram_entropy(_tempered_markov_samples(source, jax.random.PRNGKey(k), num, length, 1.0),
                                      vocab) for k in range(60)]
  se = np.std(batches, ddof=1) / np.sqrt(len(batches))
  assert abs(np.mean(batches) - mark["mean"]) < 3 * math.hypot(se, mark["std"] / np.sqrt(200)), (np.mean(batches), mark)
  assert 0.6 < mark["std"] / np.std(batches, ddof=1) < 1.6
  assert mark["whole_split"] - mark["mean"] > 0.3 and mark["whole_split"] - np.mean(batches) > 20 * se
  assert mark["whole_split"] == pytest.approx(evaluate.validation_entropy(
      type("Data", (), {"val_windows": val, "val_weights": np.ones_like(val)})(), vocab))
  with pytest.raises(ValueError, match=r"num_windows=3001 validation windows of 3000; give 1 <= num_windows <= 3000"):
    evaluate.entropy_mark(val, np.ones_like(val), vocab, 3001)


def test_an_exact_sampler_reads_its_own_gen_ppl_at_the_mark_within_the_bootstrap_interval():
  """The Markov source sampled exactly with its conditionals tempered (0.8, 0.9, 1.1, 1.2; temperature 1 left out),
  32 samples a point, read at the mark of 32 windows: the interval ``frontier_reading`` gives holds the source's
  own gen-ppl, exp(H / L) from its exact entropy (in 12 of 12 seeded repeats while developing this; a wider check
  covered 30 of 30). Mutations: reading at the whole split's entropy (the reading rises about 30% and the interval
  misses it: 0 of 12); a bootstrap that compares repeated samples' entropies with an unrepeated mark (its
  interval missed the source's own value at a vocabulary of 256, 0 of 30). A sweep whose entropy falls where
  temperature rises is reported as not monotone, and only neighbouring temperatures are joined."""
  vocab, num, length = 512, 32, 32
  source = _zipf_markov_source(vocab, seed=3)
  val = np.asarray(source.sample(jax.random.PRNGKey(123), 3000, length))
  mark = evaluate.entropy_mark(val, np.ones_like(val), vocab, num, draws=200, seed=0)
  score = lambda tokens: -np.asarray(source.log_prob(jnp.asarray(tokens)), np.float64)
  sweep = [(tokens, score(tokens)) for k, temperature in enumerate((0.8, 0.9, 1.1, 1.2))
           for tokens in (_tempered_markov_samples(source, jax.random.PRNGKey(1000 + k), num, length, temperature),)]
  reading = evaluate.frontier_reading(sweep, vocab, mark, resamples=400, seed=0)
  exact = math.exp(source.entropy(length) / length)
  lo, hi = reading["gen_ppl_95"]
  assert reading["monotone"] and reading["bracketed"] > 0.95
  assert lo < exact < hi and lo < reading["gen_ppl"] < hi, (exact, reading)
  whole = evaluate.frontier_reading(sweep, vocab, {**mark, "mean": mark["whole_split"], "resampled_draws":
                                                   mark["resampled_draws"] + mark["whole_split"] - mark["mean"]},
                                    resamples=400, seed=0)
  assert whole["gen_ppl_95"][0] is None or whole["gen_ppl_95"][0] > exact  # the old mark's reading misses it
  # Entropies out of order: (1, 10) and (3, 30) bracket 2 only through a non-neighbour (0.5, 5) in between.
  points = [(1.0, 10.0), (0.5, 5.0), (3.0, 30.0)]
  assert not evaluate.frontier_is_monotone([h for h, _ in points])
  assert evaluate.frontier_at_entropy(points, 2.0) == pytest.approx(math.exp(
      0.4 * math.log(5.0) + 0.6 * math.log(30.0)))  # joined (0.5, 5) to (3, 30), its neighbours
  assert evaluate.frontier_at_entropy(points, 0.75) == pytest.approx(math.exp(0.5 * math.log(10) + 0.5 * math.log(5)))


def test_the_paired_ratio_is_the_ratio_of_gen_ppls_with_the_interval_of_paired_differences():
  """``paired_gen_ppl_ratio`` is exactly gen-ppl(A) / gen-ppl(B) as ``generative_perplexity`` computes each; where
  the samples share most of their nats (same keys), its interval is a fraction of either gen-ppl's own, so a 3%
  difference that the unpaired intervals overlap on is resolved; it covers the true ratio at its level (400
  seeded simulations, 95% +- 2.2%); and 'pairs_to_resolve' pairs narrow the interval to +-10% (its half-width on
  fresh draws of that many pairs is log 1.1 to within 10%). Mutations: an interval from the two unpaired ones; a
  ratio of per-sample ratios' mean; a normal quantile at 8 pairs (coverage 0.91)."""
  rng = np.random.default_rng(0)
  length, n = 64, 24
  shared = rng.gamma(20.0, 10.0, n)  # what two samplers with the same key share: the text's own difficulty
  nats_b = shared + rng.normal(0, 2.0, n)
  nats_a = shared + length * math.log(1.03) + rng.normal(0, 2.0, n)
  p = evaluate.paired_gen_ppl_ratio(nats_a, nats_b, length)
  single = lambda nats: evaluate.generative_perplexity(np.zeros((n, length), np.int32), lambda _: nats, 2)
  assert p["ratio"] == pytest.approx(single(nats_a)["gen_ppl"] / single(nats_b)["gen_ppl"], rel=1e-12)
  lo_a, hi_a = single(nats_a)["gen_ppl_95"]
  lo_b, hi_b = single(nats_b)["gen_ppl_95"]
  assert lo_a < hi_b and lo_b < hi_a  # unpaired, the two intervals overlap
  assert p["resolved"] and 1.0 < p["ratio_95"][0] < 1.03 < p["ratio_95"][1] < 1.06
  covered = 0
  for _ in range(400):
    small = 8
    base = rng.gamma(20.0, 10.0, small)
    a, b = base + length * math.log(1.05) + rng.normal(0, 3.0, small), base + rng.normal(0, 3.0, small)
    lo, hi = evaluate.paired_gen_ppl_ratio(a, b, length)["ratio_95"]
    covered += lo <= 1.05 <= hi
  assert 0.928 <= covered / 400 <= 0.972, covered / 400
  noisy = lambda m: (rng.normal(0, 40.0, m), np.zeros(m))
  needed = evaluate.paired_gen_ppl_ratio(*noisy(50), length)["pairs_to_resolve"]
  widths = [math.log(r["ratio_95"][1] / r["ratio_95"][0]) / 2
            for r in (evaluate.paired_gen_ppl_ratio(*noisy(needed), length) for _ in range(20))]
  assert abs(np.mean(widths) / math.log(1.1) - 1) < 0.1, (needed, np.mean(widths))
  with pytest.raises(ValueError, match=r"two \[N\] arrays of the same N >= 2; got shapes \(3,\) and \(2,\)"):
    evaluate.paired_gen_ppl_ratio(np.zeros(3), np.zeros(2), length)
