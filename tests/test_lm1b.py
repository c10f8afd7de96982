"""LM1B in both published setups, on a fake LM1B (``fake_lm1b`` in tests/conftest.py: a tiny copy of the
benchmark's directory layout and its .tar.gz with LM1B-style sentences, and a WordPiece vocabulary trained on
them), and tfds's own ``mock_data`` for the tensorflow-datasets path. Nothing here reaches the network
(tests/conftest.py's guard)."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from d3pm_jax.config import DataConfig
from d3pm_jax.data import lm1b, pipeline, prepare, prepared, tokenizers
from d3pm_jax.evaluation.eval_workdir import evaluate_workdir, format_table

from conftest import WORDPIECE_SPECIALS, guarded_command, lm1b_sentences
from test_train import ROOT

def _real_tokens(out, split):
  rows = prepared.PreparedSplit(out, split).read_all()
  return rows, rows[:, 0][rows[:, 1] > 0]


def test_the_directory_and_the_archive_give_tfds_lines(fake_lm1b):
  """Both forms of the manual dir yield every line of tfds's files, stripped, the held-out files as validation,
  the decoy skipped; the extracted directory in sorted file order, the archive in its own (here the same)."""
  root, expected, _ = fake_lm1b
  for manual_dir in (root / "extracted", root / "extracted" / lm1b.TOP, root / "archive"):
    splits, source = lm1b.open_splits(str(manual_dir))
    for split in ("train", "validation"):
      assert list(splits[split]()) == expected[split]
      assert list(splits[split]()) == expected[split]  # each call reads afresh
    assert not any("README" in f for f in source["files"]["validation"])


def test_d3pm_setup_wraps_sentences_and_streams_them_across_rows(tmp_path, fake_lm1b):
  """D3PM's own setup: each sentence <s> pieces </s>, the stream cut into rows with no segment ids (every real
  token segment 1, attention across sentences), and each row's words the words plus one of the sentences whose
  </s> it holds, counted here from the raw text."""
  root, expected, _ = fake_lm1b
  out = str(tmp_path / "d3pm")
  metadata = prepare.prepare_lm1b(out, "d3pm", manual_dir=str(root / "archive"), vocab_size=320, seq_len=32)
  assert metadata["packing"] == "stream"
  tok = pipeline.tokenizer_of(DataConfig(name="lm1b", tokenizer="sentencepiece", seq_len=32, prepared_dir=out))
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.decode([tok.bos_id, tok.eos_id]) == b""
  for split in ("train", "validation"):
    rows, real = _real_tokens(out, split)
    np.testing.assert_array_equal(real, np.concatenate([[1, *tok.encode(s.encode()), 2] for s in expected[split]]))
    assert (rows[:-1, 1] == 1).all()
    ends = np.flatnonzero(real == 2)  # every </s>: each sentence's last token
    want = np.bincount(ends // 32, weights=[len(s.split()) + 1 for s in expected[split]], minlength=len(rows))
    np.testing.assert_array_equal(prepared.PreparedSplit(out, split).words(), want)
    assert metadata["splits"][split]["words"] == sum(len(s.split()) + 1 for s in expected[split])


def test_d3pm_setup_refuses_a_sentencepiece_model_without_delimiters(tmp_path, fake_lm1b):
  root, expected, _ = fake_lm1b
  plain = tokenizers.SentencePieceTokenizer.train((s.encode() for s in expected["train"]), str(tmp_path / "plain"),
                                                  320)
  with pytest.raises(ValueError, match=r"wraps each sentence in <s> \.\.\. </s>, but the sentencepiece model .*"
                                       r"plain.model defines no sentence-start or -end piece"):
    prepare.prepare_lm1b(str(tmp_path / "o"), "d3pm", manual_dir=str(root / "extracted"),
                         tokenizer_path=plain.model_path)
  with pytest.raises(ValueError, match=r"packing must be 'stream' .* or 'packed' .*; got 'padded'"):
    prepare.prepare_lm1b(str(tmp_path / "o"), "d3pm", manual_dir=str(root / "extracted"), packing="padded")


def test_d3pm_setup_accepts_a_sentencepiece_model_made_elsewhere_without_byte_pieces(tmp_path, fake_lm1b):
  """A model like D3PM's shipped one (sentencepiece's defaults: NFKC, a dummy prefix, <s> and </s>, no byte
  fallback) is accepted through --tokenizer_path: each held-out sentence is <s>, sentencepiece's own encoding,
  </s>; a character it never saw becomes its unknown piece; bytes that are not UTF-8 are refused."""
  import io
  import sentencepiece as spm
  root, expected, _ = fake_lm1b
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(expected["train"]), model_writer=model, vocab_size=60,
                                 minloglevel=2)
  path = tmp_path / "d3pm-like.model"
  path.write_bytes(model.getvalue())
  out = str(tmp_path / "d3pm")
  prepare.prepare_lm1b(out, "d3pm", manual_dir=str(root / "extracted"), tokenizer_path=str(path), seq_len=32)
  reference = spm.SentencePieceProcessor(model_file=str(path))
  _, real = _real_tokens(out, "validation")
  np.testing.assert_array_equal(real, np.concatenate([[reference.bos_id(), *reference.encode(s), reference.eos_id()]
                                                      for s in expected["validation"]]))
  tok = pipeline.tokenizer_of(DataConfig(name="lm1b", tokenizer="sentencepiece", seq_len=32, prepared_dir=out))
  assert not tok.lossless and tok.decode(tok.encode(expected["validation"][0].encode())).decode() == \
      reference.decode(reference.encode(expected["validation"][0]))
  assert reference.unk_id() in tok.encode("prices rose by 3 \u0416".encode()).tolist()
  with pytest.raises(ValueError, match="has no byte pieces, so it cannot encode bytes that are not UTF-8"):
    tok.encode(b"bad \xff byte")


def test_d3pm_setup_packs_sentencepiece_sentences_with_segment_ids(tmp_path, fake_lm1b):
  root, expected, _ = fake_lm1b
  out = str(tmp_path / "d3pm")
  metadata = prepare.prepare_lm1b(out, "d3pm", manual_dir=str(root / "archive"), vocab_size=320, seq_len=32,
                                  packing="packed")
  assert metadata["packing"] == "packed" and metadata["tokenizer"]["kind"] == "sentencepiece"
  tok = pipeline.tokenizer_of(DataConfig(name="lm1b", tokenizer="sentencepiece", seq_len=32, prepared_dir=out))
  assert tok.vocab_size == 320 and metadata["tokenizer"]["path"].startswith("tokenizer/")
  for split in ("train", "validation"):
    encoded = [np.array([tok.bos_id, *tok.encode(s.encode()), tok.eos_id]) for s in expected[split]]
    assert [tok.decode(e).decode() for e in encoded] == expected[split]  # cased, lossless
    rows, real = _real_tokens(out, split)
    np.testing.assert_array_equal(real, np.concatenate(encoded))  # no token lost, duplicated or reordered
    assert metadata["splits"][split]["documents"] == len(expected[split])
    # Segment ids: a new id exactly where a sentence starts inside a row, 1 at every row start (a sentence cut by
    # the row end continues as segment 1 of the next), 0 only as the last row's tail.
    starts = np.zeros(real.size, bool)
    starts[np.cumsum([0] + [e.size for e in encoded[:-1]])] = True
    segments = rows[:, 1].ravel()[:real.size].reshape(-1)
    flat_position = np.arange(real.size) % 32
    steps = np.diff(segments) if real.size else segments
    np.testing.assert_array_equal(steps == 1, (starts[1:] & (flat_position[1:] != 0)))
    assert (segments[flat_position == 0] == 1).all() and (rows[:-1, 1] > 0).all()


def test_preparing_twice_anywhere_gives_the_same_rows_and_tokenizer(tmp_path, fake_lm1b):
  """Determinism: the d3pm setup trains its own sentencepiece model, so two preparations (into different
  directories, from the archive and from the extracted files) must agree on the model's fingerprint and every
  row."""
  root, _, _ = fake_lm1b
  a = prepare.prepare_lm1b(str(tmp_path / "a"), "d3pm", manual_dir=str(root / "archive"), vocab_size=320, seq_len=32)
  b = prepare.prepare_lm1b(str(tmp_path / "b"), "d3pm", manual_dir=str(root / "extracted"), vocab_size=320,
                           seq_len=32)
  assert a["tokenizer"] == b["tokenizer"] and a["splits"].keys() == b["splits"].keys()
  for split in a["splits"]:
    np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path / "a"), split).read_all(),
                                  prepared.PreparedSplit(str(tmp_path / "b"), split).read_all())


def test_mdlm_setup_pads_each_lowercased_sentence_into_its_own_rows(tmp_path, fake_lm1b):
  root, expected, vocab = fake_lm1b
  out = str(tmp_path / "mdlm")
  metadata = prepare.prepare_lm1b(out, "mdlm", manual_dir=str(root / "extracted"), tokenizer_path=vocab,
                                  seq_len=16, packing="padded")
  tok = pipeline.tokenizer_of(DataConfig(name="lm1b", tokenizer="wordpiece", seq_len=16, prepared_dir=out))
  cls, sep = tok.encode("")[[0, -1]]
  for split in ("train", "validation"):
    rows, _ = _real_tokens(out, split)
    expected_rows = sum(-(-tok.encode(s).size // 16) for s in expected[split])
    assert rows.shape[0] == expected_rows == metadata["splits"][split]["rows"]
    firsts = rows[:, 0, 0]
    assert (firsts == cls).sum() == len(expected[split])  # a [CLS] starts each sentence's first row
    # Padding is segment 0 with token 0 at the end of a sentence's last row, and nowhere else.
    real = rows[:, 1] > 0
    assert (rows[:, 1] <= 1).all() and (rows[:, 0][~real] == 0).all()
    assert (np.diff(real.astype(int), axis=1) <= 0).all()
    ends = np.flatnonzero(rows[:, 0][real] == sep)
    assert ends.size == len(expected[split])
    text = tok.decode(rows[:, 0][real]).decode()
    assert text == "".join(s.lower() + "\n" for s in expected[split])


def test_mdlm_setup_truncates_each_sentence_to_one_row_by_default(tmp_path, fake_lm1b):
  """MDLM's wrap=False: a row per sentence, ``[CLS]`` and its first 14 pieces and ``[SEP]`` when it is longer
  than 16, computed here from the tokenizer's own encoding of each sentence."""
  root, expected, vocab = fake_lm1b
  out = str(tmp_path / "mdlm")
  metadata = prepare.prepare_lm1b(out, "mdlm", manual_dir=str(root / "extracted"), tokenizer_path=vocab, seq_len=16)
  assert metadata["packing"] == "truncated"
  tok = tokenizers.WordPieceTokenizer(vocab)
  rows = prepared.PreparedSplit(out, "validation").read_all()
  encoded = [tok.encode(s.encode()) for s in expected["validation"]]
  assert len(rows) == len(encoded) and any(e.size > 16 for e in encoded)
  for row, ids in zip(rows, encoded):
    want = ids if ids.size <= 16 else np.append(ids[:15], ids[-1])
    np.testing.assert_array_equal(row[0][row[1] > 0], want)


def test_mdlm_wrapped_variant_streams_sentences(tmp_path, fake_lm1b):
  root, expected, vocab = fake_lm1b
  out = str(tmp_path / "wrap")
  prepare.prepare_lm1b(out, "mdlm", manual_dir=str(root / "extracted"), tokenizer_path=vocab, seq_len=16,
                       packing="stream")
  tok = tokenizers.WordPieceTokenizer(vocab)
  rows, real = _real_tokens(out, "validation")
  np.testing.assert_array_equal(real, np.concatenate(tok.encode_batch(expected["validation"])))
  assert (rows[:-1, 1] == 1).all()


def test_bd3lm_wrapped_rows_are_cls_then_the_stream_of_sentences_then_sep(tmp_path, fake_lm1b):
  """BD3-LM's LM1B rows (``--packing=wrapped``): every row is [CLS], the next 14 tokens of the stream of each
  sentence's "pieces [SEP]", then [SEP] (right after the real tokens in the last, partial row; padding after it),
  so the rows' inner tokens, joined, are that stream exactly. With ``data.ignore_bos`` the pipeline weighs each
  validation row's first token 0; the row's bytes are its sentences' own. Mutations: rows cut at 16 with no
  [CLS] (BD3-LM's [BOS]) or with [SEP] after the padding; [CLS] kept per sentence; ignore_bos not reaching the
  validation weights."""
  from d3pm_jax.evaluation import eval_workdir
  root, expected, vocab = fake_lm1b
  out = str(tmp_path / "wrapped")
  metadata = prepare.prepare_lm1b(out, "mdlm", manual_dir=str(root / "extracted"), tokenizer_path=vocab,
                                  seq_len=16, packing="wrapped")
  assert metadata["packing"] == "wrapped"
  tok = tokenizers.WordPieceTokenizer(vocab)
  rows = prepared.PreparedSplit(out, "validation").read_all()
  real_N = (rows[:, 1] > 0).sum(axis=1)
  assert (rows[:, 0, 0] == tok.cls_id).all() and (rows[np.arange(len(rows)), 0, real_N - 1] == tok.sep_id).all()
  assert (real_N[:-1] == 16).all() and ((rows[:, 1] > 0) == (np.arange(16) < real_N[:, None])).all()
  stream = np.concatenate([tok.encode(s.encode())[1:] for s in expected["validation"]])  # pieces [SEP], no [CLS]
  np.testing.assert_array_equal(np.concatenate([r[0, 1:n - 1] for r, n in zip(rows, real_N)]), stream)
  for ignore_bos in (False, True):
    data = pipeline.build_data(DataConfig(name="lm1b", tokenizer="wordpiece", seq_len=16, prepared_dir=out,
                                          ignore_bos=ignore_bos), batch_size=2, seed=0)
    assert data.val_segments is None and (data.val_weights[:, 0] == (0.0 if ignore_bos else 1.0)).all()
    assert data.val_weights.sum() == real_N.sum() - (len(rows) if ignore_bos else 0)
    counted = eval_workdir.window_bytes(data, np.arange(len(data.val_windows)))
    assert counted.sum() == sum(len(s.encode()) for s in expected["validation"])


def test_wordpiece_round_trips_and_refuses_bad_ids(fake_lm1b):
  _, expected, vocab = fake_lm1b
  tok = tokenizers.make_tokenizer("wordpiece", vocab)
  for sentence in expected["validation"][:5]:
    ids = tok.encode(sentence.encode())
    assert tok.decode(ids) == sentence.lower().encode() + b"\n"
    assert tok.decode(np.concatenate([ids, ids])) == 2 * (sentence.lower().encode() + b"\n")
  with pytest.raises(ValueError, match=r"WordPiece ids must lie in \[0, 120\); got min 0, max 120"):
    tok.decode([0, 120])
  with pytest.raises(ValueError, match="needs data.tokenizer_path"):
    tokenizers.make_tokenizer("wordpiece")


def test_the_tfds_path_reads_what_tfds_serves(tmp_path, monkeypatch, fake_lm1b):
  """Through tensorflow-datasets (its own ``mock_data`` stands in for a prepared lm1b): the train and test
  examples, in tfds's order, become the train and validation splits."""
  import tensorflow_datasets as tfds
  _, _, vocab = fake_lm1b
  tok = tokenizers.WordPieceTokenizer(vocab)
  monkeypatch.setattr(lm1b.fetch, "reachable", lambda url: True)  # mock_data's download_and_prepare is a no-op
  with tfds.testing.mock_data(num_examples=37, policy=tfds.testing.MockPolicy.USE_CODE):
    metadata = prepare.prepare_lm1b(str(tmp_path), "mdlm", tfds_data_dir=str(tmp_path / "tfds"),
                                    tokenizer_path=vocab, seq_len=16, packing="stream")
    served = {split: [ex["text"] for ex in tfds.data_source("lm1b", split=tfds_split)]
              for split, tfds_split in lm1b.TFDS_SPLITS.items()}
  assert metadata["source"]["tfds_examples"] == {"train": 37, "validation": 37}
  for split, texts in served.items():
    _, real = _real_tokens(str(tmp_path), split)
    np.testing.assert_array_equal(real, np.concatenate(tok.encode_batch(texts)))


# LM1B-style held-out sentences whose bytes WordPiece ids cannot give back: punctuation attached to words, a
# contraction, a hyphen, accents, CJK characters, characters the vocabulary lacks (✓, 🙂), and sentences long
# enough to be truncated or wrapped at 16 tokens.
HARD = ["The U.S. economy grew 3.5 percent in the third quarter , the Commerce Department said .",
        "It isn't well-known that the café's owners said so .",
        "Prices in 東京 rose ✓ by 2% , naïve traders said 🙂 .",
        "Über-cautious investors sold shares on Tuesday ."]


@pytest.fixture(scope="module")
def hard_lm1b(tmp_path_factory):
  """A manual dir in LM1B's layout whose held-out file holds ``HARD`` among plain sentences, and a WordPiece
  vocabulary trained on the training file (which lacks ✓ and 🙂)."""
  import tokenizers as hf
  root = tmp_path_factory.mktemp("hard_lm1b")
  rng = np.random.default_rng(1)
  lines = {"train": lm1b_sentences(rng, 60) + [h.replace("✓", "").replace("🙂", "") for h in HARD] * 3,
           "validation": HARD[:2] + lm1b_sentences(rng, 4) + HARD[2:]}
  for split, name in (("train", "news.en-00001-of-00100"), ("validation", "news.en.heldout-00000-of-00050")):
    path = root / lm1b.TOP / os.path.dirname(lm1b.PATTERNS[split]) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines[split]))
  trainer = hf.BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(lines["train"], vocab_size=150, special_tokens=WORDPIECE_SPECIALS)
  trainer.save_model(str(root))
  return root, lines["validation"], str(root / "vocab.txt")


def _kept_bytes(tokenizer, sentence, seq_len, packing):
  """The UTF-8 bytes of the part of ``sentence`` a row keeps: all of it, or for a WordPiece sentence truncated to
  its first L - 2 pieces (and [SEP]) the text up to the end of its last kept piece, from the Hugging Face
  tokenizer's own character offsets."""
  if packing != "truncated" or len(tokenizer.encode(sentence.encode())) <= seq_len:
    return len(sentence.encode())
  return len(sentence[:tokenizer._tok.encode(sentence).offsets[seq_len - 2][1]].encode())


@pytest.mark.parametrize("setup,packing", [("mdlm", "truncated"), ("mdlm", "padded"), ("mdlm", "stream"),
                                           ("mdlm", "wrapped"), ("d3pm", "stream"), ("d3pm", "packed")])
def test_validation_windows_count_the_original_sentences_bytes(tmp_path, hard_lm1b, setup, packing):
  """Through the real pipeline (d3pm-prepare's LM1B setups, ``build_data``, and the evaluator's
  ``window_bytes``), the validation windows' bytes are the held-out sentences' own UTF-8 bytes (less what a
  truncated row cuts: the text after its last kept piece), in every layout; padded rows, a sentence each, sum to
  their sentence's bytes. Mutation: WordPiece bytes counted back from the ids (the former ``text_bytes``:
  normalised pieces and a space before each word, which counts "u.s." as "u . s ." and an unknown character as
  ``[UNK]``'s five), which the decoded text here shows differs."""
  from d3pm_jax.evaluation import eval_workdir
  root, sentences, vocab = hard_lm1b
  out = str(tmp_path / "out")
  prepare.prepare_lm1b(out, setup, manual_dir=str(root), seq_len=16, packing=packing,
                       **({"tokenizer_path": vocab} if setup == "mdlm" else {"vocab_size": 320}))
  config = DataConfig(name="lm1b", tokenizer={"mdlm": "wordpiece", "d3pm": "sentencepiece"}[setup], seq_len=16,
                      prepared_dir=out)
  data = pipeline.build_data(config, batch_size=2, seed=0)
  counted = eval_workdir.window_bytes(data, np.arange(len(data.val_windows)))
  want = [_kept_bytes(data.tokenizer, s, 16, packing) for s in sentences]
  assert counted.sum() == sum(want) and counted.shape == (len(data.val_windows),)
  if packing == "truncated":
    assert sum(want) < sum(len(s.encode()) for s in sentences)  # some sentence is cut here
  if packing in ("padded", "truncated"):
    np.testing.assert_array_equal(np.bincount(data.val_documents, weights=counted), want)
  if setup == "mdlm":  # what the ids spell (one line a sentence) is not the text: counting it would be wrong
    spelt = data.tokenizer.decode(data.val_windows[data.val_weights > 0])
    assert len(spelt) - len(sentences) != counted.sum() and "u . s ." in spelt.decode()


def test_shards_prepared_before_byte_counts_count_from_lossless_ids_or_ask_to_prepare_again(tmp_path, hard_lm1b):
  """A directory prepared before the byte counts were recorded (its metadata without ``row_bytes``): a lossless
  tokenizer's (sentencepiece trained here) ids give the same counts; WordPiece's cannot, and evaluation refuses
  it, saying to prepare it again, rather than report bits per byte over the wrong bytes. Mutation: counting
  WordPiece from its ids anyway."""
  import json
  from d3pm_jax.evaluation import eval_workdir
  root, _, vocab = hard_lm1b
  for setup, kind in (("d3pm", "sentencepiece"), ("mdlm", "wordpiece")):
    out = str(tmp_path / setup)
    prepare.prepare_lm1b(out, setup, manual_dir=str(root), seq_len=16,
                         **({"tokenizer_path": vocab} if setup == "mdlm" else {"vocab_size": 320}))
    config = DataConfig(name="lm1b", tokenizer=kind, seq_len=16, prepared_dir=out)
    recorded = pipeline.build_data(config, batch_size=2, seed=0).val_bytes
    metadata = json.loads(open(os.path.join(out, prepared.METADATA)).read())
    for info in metadata["splits"].values():
      del info["row_bytes"]
    prepared.write_metadata(out, {k: v for k, v in metadata.items() if k != "format_version"})
    old = pipeline.build_data(config, batch_size=2, seed=0)
    if kind == "sentencepiece":
      np.testing.assert_array_equal(old.val_bytes, recorded)
    else:
      assert old.val_bytes is None
      with pytest.raises(ValueError, match=r"records no byte counts .* wordpiece ids do not give the original "
                                           r"text's bytes.*prepare it again"):
        eval_workdir.window_bytes(old, np.arange(3))


def test_offline_without_the_data_fails_within_seconds_saying_what_to_fetch(tmp_path):
  """With the network blocked (this process's guard) and LM1B nowhere on disk, both with tfds installed and
  from the command line (a subprocess behind the same guard)."""
  start = time.time()
  with pytest.raises(ValueError, match=r"cannot be reached.*download http://www.statmt.org/lm-benchmark/"
                                       r"1-billion-word-language-modeling-benchmark-r13output.tar.gz"):
    prepare.prepare_lm1b(str(tmp_path / "out"), "d3pm", manual_dir=str(tmp_path), tfds_data_dir=str(tmp_path))
  assert time.time() - start < 10
  start = time.time()
  out = subprocess.run(guarded_command("d3pm_jax.cli.prepare", "--dataset=lm1b", "--setup=d3pm",
                                       f"--out={tmp_path / 'o'}", f"--tfds_data_dir={tmp_path / 'tfds'}"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert out.returncode != 0 and time.time() - start < 10, out.stderr[-2000:]
  assert f"copy it to DIR/{lm1b.ARCHIVE}" in out.stderr and "--manual_dir=DIR" in out.stderr
  assert not os.path.exists(tmp_path / "o" / prepared.METADATA)


@pytest.mark.parametrize("setup", ["d3pm", "mdlm"])
def test_d3pm_train_trains_on_prepared_fake_lm1b(tmp_path, fake_lm1b, setup):
  root, expected, vocab = fake_lm1b
  out = str(tmp_path / setup)
  tokenizer = {"d3pm": "sentencepiece", "mdlm": "wordpiece"}[setup]
  prepare.prepare_lm1b(out, setup, manual_dir=str(root / "extracted"), seq_len=16,
                       **({"vocab_size": 320} if setup == "d3pm" else {"tokenizer_path": vocab}))
  run = subprocess.run(
      [sys.executable, "-m", "d3pm_jax.cli.train", f"--config={ROOT / 'configs' / 'test.py'}",
       f"--workdir={tmp_path / 'run'}", "--config.data.name=lm1b", f"--config.data.tokenizer={tokenizer}",
       f"--config.data.prepared_dir={out}", "--config.train.steps=2"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "validation:" in run.stdout and "samples" in run.stdout.lower()
  # The samples went back through the prepared directory's own tokenizer: text, not lists of token ids.
  samples = [s.strip("\n") for s in run.stdout.split("-" * 40 + "\n")[1:]]
  assert len(samples) == 2 and not any(re.fullmatch(r"[\d ]+", s) for s in samples), samples
  # d3pm-eval in LM1B's own unit: per-word perplexity = exp(total nats / (words + sentences)), the words counted
  # here from the raw held-out text. Mutation: words without the sentence ends (or per-token nats) misses it.
  result = evaluate_workdir(str(tmp_path / "run"), time_samples=2, sample_steps=(), infill_windows=0)
  nats = np.load(tmp_path / "run" / "eval_windows.npz")["nats"]
  words = sum(len(s.split()) for s in expected["validation"]) + len(expected["validation"])
  assert result["likelihood"]["words"] == words and result["windows"] == result["split_windows"]
  # Bits per byte over the held-out text's own bytes (MDLM's rows truncated at 16 keep their first 14 pieces).
  wordpiece = tokenizers.WordPieceTokenizer(vocab)
  kept = (sum(len(s.encode()) for s in expected["validation"]) if setup == "d3pm" else
          sum(_kept_bytes(wordpiece, s, 16, "truncated") for s in expected["validation"]))
  assert result["likelihood"]["bytes"] == kept
  np.testing.assert_allclose(result["likelihood"]["perplexity_per_word"], np.exp(nats.sum() / words), rtol=1e-9)
  assert "per word" in format_table(result)
