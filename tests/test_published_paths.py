"""Every path that produces a published figure, against a direct computation: diffusion bounds on packed rows
through the evaluator's own functions, bytes that are the text's bytes (separators 0, characters cut at a window
edge counted once), per-byte paired differences and intervals where bytes are not tokens, and the infilling
evaluator's window filter and perplexity."""
import math
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.data import pipeline
from d3pm_jax.evaluation import evaluate
from d3pm_jax.evaluation.eval_workdir import infilling_quality, window_bounds

from test_packed_loss import A, B, row, setup


# ---------------------------------------------------------------- packed rows through the evaluator's bounds

def _alone(tokens, segments, keep):
  """The row with only the document ``keep`` in place: every other position padding (token 0, segment 0)."""
  mine = segments == keep
  return jnp.where(mine, tokens, 0), jnp.where(mine, segments, 0)


@pytest.mark.parametrize("arg,which", [(None, "first"), ("absorbing_d3pm", "first"), ("absorbing_d3pm", "exact")])
def test_diffusion_bounds_score_a_packed_row_as_its_documents_apart(arg, which):
  """The bounds ``evaluate_workdir`` reports (masked NELBO; D3PM's continuous-time and exact T-step bounds), on a
  row packing two documents, equal the sum of each document scored alone in its place, at the same key (the
  same t and the same x_t draws at every position). Mutation: ``segments_BxL=None`` in the evaluator's logits
  function (the documents then see each other: the sum is broken by 0.06 nats or more, 60x the tolerance)."""
  config, model, process, params = setup(arg)
  first, exact = window_bounds(config, model, process, time_samples=3)
  fn = jax.jit(first if which == "first" else exact)
  key = jax.random.PRNGKey(7)
  tokens, segments = row(A, B)

  def nats(tokens, segments, segment_ids=True):
    weights = (segments > 0).astype(jnp.float32)
    return float(fn(params, key, tokens, weights, segments if segment_ids else None)["nelbo"][0])

  apart = nats(*_alone(tokens, segments, 1)) + nats(*_alone(tokens, segments, 2))
  assert nats(tokens, segments) == pytest.approx(apart, rel=2e-6)
  assert abs(nats(tokens, segments, segment_ids=False) - apart) > 0.01  # 60x the tolerance above


# ---------------------------------------------------------------- bytes that are the text's bytes

DOCS = ["héllo wörld, 中文 ✓ café", "plain ascii text here", "more ünïcode and an emoji 🙂 at the end",
        "x = 'ß' * 3  # straße"]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  import tokenizers
  from d3pm_jax.data.tokenizers import Gpt2Tokenizer
  root = tmp_path_factory.mktemp("gpt2")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(DOCS * 3, vocab_size=290, min_frequency=1, special_tokens=["<|endoftext|>"])
  bpe.save(str(root / "tokenizer.json"))
  return Gpt2Tokenizer(str(root / "tokenizer.json"))


def test_gpt2_windows_count_the_texts_bytes(gpt2):
  """Documents joined by ``<|endoftext|>`` and cut into 7-token windows (the OpenWebText layout): the windows'
  bytes sum to the documents' UTF-8 bytes exactly, though some window edges cut a character (its decoded text
  then holds U+FFFD) and every separator decodes to 13 bytes. Mutations: counting the decoded text's bytes
  (U+FFFD's three, the separator's thirteen)."""
  stream = np.concatenate([np.append(gpt2.encode(d.encode()), gpt2.eos_id) for d in DOCS])
  windows, weights = pipeline.pack([stream], 7)
  counted = evaluate.window_bytes(gpt2, windows, weights)
  assert counted.sum() == sum(len(d.encode()) for d in DOCS)
  decoded = [gpt2.decode(w[m > 0]) for w, m in zip(windows, weights)]
  assert any("\ufffd".encode() in d for d in decoded)  # an edge does cut a character here
  assert gpt2.text_bytes([gpt2.eos_id]) == 0 and len(gpt2.decode([gpt2.eos_id])) == 13
  # Each window counts the bytes of its own tokens: the pieces' bytes, concatenated, are the text.
  assert all(c == gpt2.text_bytes(w[m > 0]) for c, w, m in zip(counted, windows, weights))


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
  import tokenizers
  from d3pm_jax.data.tokenizers import WordPieceTokenizer
  from conftest import WORDPIECE_SPECIALS
  root = tmp_path_factory.mktemp("wordpiece")
  sentences = ["the naïve cat sat on the straße", "prices rose by 3 percent , more than expected",
               "Über café owners said so"]
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(sentences * 4, vocab_size=200, special_tokens=WORDPIECE_SPECIALS)
  trainer.save_model(str(root))
  return WordPieceTokenizer(str(root / "vocab.txt")), sentences


def _normalised(text):
  """BERT's normalisation, independently: lower case, accents (combining marks after NFD) removed."""
  return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


def test_wordpiece_rows_count_their_sentences_bytes_and_no_separator(wordpiece):
  """Packed LM1B rows ``[CLS] pieces [SEP] [CLS] ...``: a row's bytes are its sentences' normalised UTF-8 bytes
  (multi-byte ``ß`` kept, accents stripped), ``[CLS]`` and ``[SEP]`` counting 0 and no space between sentences.
  Mutations: counting the decoded text (a newline per ``[SEP]``); counting ``##`` marks or a space before a
  continuation piece."""
  tok, sentences = wordpiece
  sentences = sentences + ["catsat on expectedprices"]  # words the vocabulary splits into continuations
  ids = np.concatenate([tok.encode(s.encode()) for s in sentences])
  assert tok.text_bytes(ids) == sum(len(_normalised(s).encode()) for s in sentences)
  assert any(tok._tok.id_to_token(int(i)).startswith("##") for i in ids)  # continuations do occur
  assert len(tok.decode(ids)) == tok.text_bytes(ids) + len(sentences)  # decode writes a newline per [SEP]


def test_paired_difference_and_byte_intervals_are_per_byte(tmp_path):
  """Windows whose bytes are not proportional to their tokens (subword data): bits per byte is the nats over the
  bytes, its interval the interval of the same nats per byte (the token interval rescaled would differ), and the
  paired difference divides by the windows' bytes. Mutations: dividing by tokens; reporting the token interval
  as the byte interval."""
  rng = np.random.default_rng(0)
  n = 40
  tokens = rng.integers(20, 40, n)
  byte_counts = tokens * rng.uniform(2.0, 6.0, n)  # 2-6 bytes per token, varying by window
  byte_counts = byte_counts.round().astype(int)
  documents = np.repeat(np.arange(10), 4)
  nats_a = tokens * rng.normal(3.0, 0.5, n)
  nats_b = nats_a - tokens * rng.normal(0.4, 0.2, n)
  out = evaluate.summarize(nats_a, tokens, byte_counts, documents)
  assert out["bits_per_byte"] == pytest.approx(nats_a.sum() / byte_counts.sum() / math.log(2), rel=1e-12)
  as_bytes = evaluate.summarize(nats_a, byte_counts, None, documents)  # the same nats, bytes as the unit
  assert out["bits_per_byte_95"] == pytest.approx(as_bytes["bits_per_token_95"], rel=1e-12)
  rescaled_token_interval = out["bits_per_token_95"] * tokens.sum() / byte_counts.sum()
  assert abs(out["bits_per_byte_95"] - rescaled_token_interval) > 0.05 * out["bits_per_byte_95"]
  for name, nats in (("a", nats_a), ("b", nats_b)):
    (tmp_path / name).mkdir()
    np.savez(tmp_path / name / "eval_windows.npz", rows=np.arange(n), tokens=tokens, bytes=byte_counts, nats=nats,
             continuous_nats=nats, documents=documents)
  from d3pm_jax.evaluation import compare
  paired = compare.paired_difference(str(tmp_path / "a"), str(tmp_path / "b"))
  assert paired["bits_per_byte"] == pytest.approx((nats_a - nats_b).sum() / byte_counts.sum() / math.log(2))
  assert paired["bits_per_byte_95"] == pytest.approx(
      evaluate.summarize(nats_a - nats_b, byte_counts, None, documents)["bits_per_token_95"], rel=1e-12)
  assert (paired["windows"], paired["documents"]) == (n, 10)


# ---------------------------------------------------------------- infilling

def test_infilling_uses_whole_one_document_windows_and_scores_the_filled_ones():
  """Validation rows of which some are padded and some pack two documents: infilling fills only unpadded
  one-document rows, spread over them, and the evaluator's perplexity is exp(nats / tokens) of exactly the filled
  windows (checked with an evaluator that records what it scored). Mutations: dropping the segment filter;
  scoring the original windows."""
  from d3pm_jax import get_schedule, make_process
  rng = np.random.default_rng(3)
  n, length, vocab = 12, 8, 5
  windows = rng.integers(0, vocab, (n, length)).astype(np.int32)
  segments = np.ones((n, length), np.int32)
  segments[[1, 4, 7], 5:] = 2            # two documents
  segments[[2, 9], 6:] = 0               # padded
  weights = (segments > 0).astype(np.float32)
  data = pipeline.Data(tokenizer=None, train_batches=None, val_windows=windows, val_weights=weights, info={},
                       val_segments=segments)
  process = make_process("absorbing", vocab + 1, get_schedule("linear"))

  class Model:
    def apply(self, variables, x_t, t_B):
      return jnp.zeros(x_t.shape + (vocab + 1,)) + jnp.arange(vocab + 1.0) * 0.3  # a fixed preference

  scored = []

  def score(tokens):
    scored.append(np.asarray(tokens))
    return np.asarray(tokens).sum(axis=1) * 0.5 + 1.0  # any per-window nats

  class Config:
    class model:
      time_conditioning = False

  out = infilling_quality(Config, Model(), process, None, data, span_start=2, span_length=3, num_steps=4,
                          num_windows=4, evaluator=(score, vocab, {}), seed=5)
  whole = np.array([0, 3, 5, 6, 8, 10, 11])
  chosen = whole[np.linspace(0, len(whole) - 1, 4).round().astype(int)]
  assert out["windows"] == 4
  filled = scored[0]
  assert filled.shape == (4, length)
  np.testing.assert_array_equal(np.delete(filled, np.s_[2:5], axis=1), np.delete(windows[chosen], np.s_[2:5], axis=1))
  entry = out["by_strategy"]["ancestral"]
  assert entry["accuracy"] == pytest.approx(np.mean(filled[:, 2:5] == windows[chosen][:, 2:5]))
  assert entry["evaluator_ppl"] == pytest.approx(math.exp((filled.sum(axis=1) * 0.5 + 1.0).sum() / filled.size))
