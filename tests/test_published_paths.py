"""Every path that produces a published figure, against a direct computation: diffusion bounds on packed rows
through the evaluator's own functions, bytes that are the original text's bytes (for every tokenizer, whatever it
normalises; separators 0, characters cut at a row edge counted once), per-byte paired differences and intervals
where bytes are not tokens, and the infilling evaluator's window filter and perplexity."""
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
# LM1B-style sentences whose text WordPiece ids cannot give back: punctuation attached to words ("u.s.", "3.5"),
# a contraction and a hyphen, accents, CJK characters and characters no vocabulary here holds (✓, 🙂); then
# blanks around a sentence, and GPT-2's separator written in a text.
HARD = ["The U.S. economy grew 3.5 percent in the third quarter .",
        "It isn't well-known that the café's owners said so .",
        "Prices in 東京 rose ✓ by 2% , naïve traders said 🙂 .",
        "  blanks before , between  and after  ",
        "a text that writes <|endoftext|> in it"]
UNSEEN = "✓🙂"  # left out of every tokenizer's training text


def _seen(text):
  return "".join(c for c in text if c not in UNSEEN)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  import tokenizers
  from d3pm_jax.data.tokenizers import Gpt2Tokenizer
  root = tmp_path_factory.mktemp("gpt2")
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(DOCS * 3, vocab_size=290, min_frequency=1, special_tokens=["<|endoftext|>"])
  bpe.save(str(root / "tokenizer.json"))
  return Gpt2Tokenizer(str(root / "tokenizer.json"))


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
  import tokenizers
  from d3pm_jax.data.tokenizers import WordPieceTokenizer
  from conftest import WORDPIECE_SPECIALS
  root = tmp_path_factory.mktemp("wordpiece")
  trainer = tokenizers.BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator([_seen(s) for s in HARD + DOCS] * 4, vocab_size=200, special_tokens=WORDPIECE_SPECIALS)
  trainer.save_model(str(root))
  return WordPieceTokenizer(str(root / "vocab.txt"))


def _tokenizer(kind, tmp_path, gpt2, wordpiece):
  """Each tokenizer, built here: sentencepiece trained here (lossless) and one like D3PM's shipped model
  (sentencepiece's defaults: NFKC, a dummy prefix, no byte pieces, so unseen characters are its unknown piece)."""
  import io
  import sentencepiece as spm
  from d3pm_jax.data import stdlib, tokenizers
  if kind in ("bytes", "text8"):
    return tokenizers.make_tokenizer(kind)
  if kind == "sentencepiece":
    texts = stdlib.read_files(stdlib.list_files()[:20]) + [_seen(s).encode() for s in HARD + DOCS]
    return tokenizers.SentencePieceTokenizer.train(texts, str(tmp_path / "spm"), vocab_size=400)
  if kind == "sentencepiece-no-bytes":
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([_seen(s) for s in HARD + DOCS] * 3), model_writer=model,
                                   vocab_size=80, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    tok = tokenizers.SentencePieceTokenizer(str(tmp_path / "plain.model"))
    assert not tok.lossless
    return tok
  return {"gpt2": gpt2, "wordpiece": wordpiece}[kind]


@pytest.mark.parametrize("kind", ["bytes", "text8", "sentencepiece", "sentencepiece-no-bytes", "gpt2", "wordpiece"])
def test_every_tokenizer_counts_each_documents_utf8_bytes(kind, tmp_path, gpt2, wordpiece):
  """``encode_with_bytes`` gives the same ids as ``encode`` and per-token counts that sum, for every document, to
  its UTF-8 length, for text each tokenizer normalises or cannot spell: WordPiece's lower case, stripped accents,
  split-off punctuation and ``[UNK]``; the no-byte-piece sentencepiece model's NFKC, dummy prefix and unknown
  piece (for both, the decoded text differs in length: counting it would be wrong); text8 sees its own alphabet.
  Mutations: WordPiece counted back from its ids (the former ``text_bytes``: each piece's normalised bytes and a
  space before each word; "u.s." counts 7, "3.5" 5); the lossy model counted by its decode; GPT-2 counted by the
  pieces alone (the written ``<|endoftext|>`` is its special token, 0 bytes); the last token not taking the
  blanks after it."""
  tok = _tokenizer(kind, tmp_path, gpt2, wordpiece)
  texts = HARD + DOCS
  if kind == "text8":
    texts = ["".join(c for c in t.lower() if "a" <= c <= "z" or c == " ") for t in texts]
  misspelt = 0
  for text in texts:
    ids, counts = tok.encode_with_bytes(text.encode())
    np.testing.assert_array_equal(ids, tok.encode(text.encode()))
    assert counts.shape == ids.shape and counts.min() >= 0
    assert counts.sum() == len(text.encode()), (text, counts)
    misspelt += len(tok.decode(ids).rstrip(b"\n")) != len(text.encode())  # WordPiece ends a sentence with "\n"
  if kind in ("wordpiece", "sentencepiece-no-bytes"):
    assert misspelt >= 3  # their ids lose the text: counting what they spell would be wrong
  else:
    assert misspelt == 0


def test_each_wordpiece_counts_its_own_span_of_the_original_text(wordpiece):
  """The counts cut the original bytes into consecutive spans, one per token: a piece's span is the blanks
  before it and the original text of that piece, which BERT's normalisation (lower case, accents stripped)
  turns into the piece (without its ``##``); an ``[UNK]``'s span is the word or character it replaced;
  ``[CLS]`` holds nothing and ``[SEP]`` only blanks after the last piece. Checked against
  ``unicodedata`` here, not the tokenizer's offsets. Mutations: all of a sentence's bytes on its first or last
  token (the sums still match); a piece's blanks counted after it."""
  tok = wordpiece
  unknown = 0
  for text in HARD:
    ids, counts = tok.encode_with_bytes(text)
    raw = text.encode()
    ends = np.cumsum(counts)
    spans = [raw[a:b].decode() for a, b in zip(np.append(0, ends[:-1]), ends)]
    pieces = [tok._tok.id_to_token(int(i)) for i in ids]
    assert (pieces[0], spans[0], pieces[-1]) == ("[CLS]", "", "[SEP]") and not spans[-1].strip()
    for piece, span in zip(pieces[1:-1], spans[1:-1]):
      if piece == "[UNK]":
        unknown += 1
        assert span.strip() and not any(c.isspace() for c in span.strip()), (text, span)
      else:
        word = span.lstrip()
        assert _normalised(word) == piece.removeprefix("##"), (text, piece, span)
        assert span == word or not piece.startswith("##")  # a continuation follows its piece directly
  assert unknown >= 2  # the characters left out of the vocabulary were met


def test_gpt2_rows_count_the_texts_bytes(gpt2):
  """Documents joined by ``<|endoftext|>`` and cut into 7-token rows (the OpenWebText layout), each token with
  its ``encode_with_bytes`` count: the rows' bytes sum to the documents' UTF-8 bytes exactly, though some row
  edges cut a character (its decoded text then holds U+FFFD) and every separator decodes to 13 bytes; a piece
  counts its own bytes (a row cut inside a character counts its side of it), and a document that writes
  ``<|endoftext|>`` counts those 13 bytes. Mutations: counting the rows' decoded text (U+FFFD's three, the
  separator's thirteen); the pieces' bytes alone for the document that writes the separator."""
  from d3pm_jax.data import prepared
  docs = DOCS + HARD
  packer = prepared.Packer(7, "stream", separator=gpt2.eos_id)
  counted = [gpt2.encode_with_bytes(d) for d in docs]
  rows = np.concatenate([packer.add([ids for ids, _ in counted], token_bytes=[c for _, c in counted]),
                         packer.finish()])
  assert packer.row_bytes().sum() == sum(len(d.encode()) for d in docs)
  decoded = [gpt2.decode(r[0][r[1] > 0]) for r in rows]
  assert any("\ufffd".encode() in d for d in decoded)  # an edge does cut a character here
  assert sum(map(len, decoded)) != packer.row_bytes().sum() and len(gpt2.decode([gpt2.eos_id])) == 13
  pieces = gpt2.token_bytes()
  for doc, (ids, counts) in zip(docs, counted):
    if "<|endoftext|>" in doc:  # matched as the special token, which spells no bytes of its own
      assert pieces[ids].sum() == len(doc.encode()) - 13 and gpt2.eos_id in ids
    else:
      np.testing.assert_array_equal(counts, pieces[ids])


def _normalised(text):
  """BERT's normalisation, independently: lower case, accents (combining marks after NFD) removed."""
  return "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")


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
