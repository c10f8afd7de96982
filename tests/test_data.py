"""Data: the stdlib corpus split, tokenizers that round-trip bytes exactly, packing, the grain pipeline."""
import numpy as np
import pytest

from d3pm_jax.config import DataConfig
from d3pm_jax.data import pipeline, prepared, stdlib, tokenizers


def test_stdlib_file_list_is_deterministic_and_excludes_site_packages():
  files = stdlib.list_files()
  assert files == stdlib.list_files() == sorted(files)
  assert len(files) > 500
  assert not any(part in f.split("/") for f in files for part in stdlib.EXCLUDED_DIRS)
  assert "os.py" in files and all(f.endswith(".py") for f in files)


def test_split_is_disjoint_by_file_and_covers_the_corpus():
  files = stdlib.list_files()
  train = stdlib.split_files(files, "train")
  val = stdlib.split_files(files, "validation")
  assert set(train).isdisjoint(val) and sorted(train + val) == files
  assert 0.005 < len(val) / len(files) < 0.05
  # The split depends only on each path, not on which other files exist.
  assert stdlib.split_files(files[::2], "validation") == [f for f in val if f in set(files[::2])]
  with pytest.raises(ValueError, match="unknown split 'test'; valid"):
    stdlib.split_files(files, "test")


def test_fingerprint_identifies_contents():
  files = stdlib.list_files()[:20]
  contents = stdlib.read_files(files)
  fp = stdlib.fingerprint(files, contents)
  assert fp["files"] == 20 and fp["bytes"] == sum(map(len, contents))
  changed = list(contents)
  changed[3] = changed[3] + b" "
  assert stdlib.fingerprint(files, changed)["sha256"] != fp["sha256"]


def test_byte_tokenizer_round_trips_every_stdlib_file():
  tok = tokenizers.ByteTokenizer()
  files = stdlib.list_files()
  for data in stdlib.read_files(files):
    ids = tok.encode(data)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == data


def test_sentencepiece_trained_locally_round_trips_exactly(tmp_path):
  files = stdlib.list_files()
  train = stdlib.read_files(files[:60])
  tok = tokenizers.SentencePieceTokenizer.train(train, str(tmp_path / "spm"), vocab_size=600)
  assert tok.vocab_size == 600
  held_out = stdlib.read_files(files[60:90]) + ["tabs\tand  spaces\n\n  unicode: é ✓ 中文\r\n".encode(),
                                                # invalid UTF-8, the model's own whitespace mark, a lone surrogate
                                                b"latin-1 caf\xe9 \xff\xfe end", "a\u2581b \u2581".encode(),
                                                b"x\xed\xb2\x80y"]
  total_bytes = total_ids = 0
  for data in held_out:
    ids = tok.encode(data)
    assert tok.decode(ids) == data
    total_bytes, total_ids = total_bytes + len(data), total_ids + len(ids)
  assert total_ids < 0.6 * total_bytes  # it really merges bytes into pieces
  # A given .model path loads the same tokenizer.
  again = tokenizers.make_tokenizer("sentencepiece", str(tmp_path / "spm.model"))
  np.testing.assert_array_equal(again.encode(held_out[0]), tok.encode(held_out[0]))


def test_tokenizer_bad_input():
  with pytest.raises(ValueError, match="unknown tokenizer 'chars'; valid"):
    tokenizers.make_tokenizer("chars")
  with pytest.raises(ValueError, match="needs data.tokenizer_path"):
    tokenizers.make_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers.make_tokenizer("sentencepiece", "/nonexistent.model")
  with pytest.raises(ValueError, match=r"byte ids must lie in \[0, 256\)"):
    tokenizers.ByteTokenizer().decode([1, 300])


@pytest.mark.parametrize("lengths,seq_len", [([5, 7, 3], 4), ([8], 4), ([1, 1, 1], 5), ([], 3)])
def test_packing_loses_no_tokens(lengths, seq_len):
  rng = np.random.default_rng(0)
  arrays = [rng.integers(1, 100, size=n) for n in lengths]
  windows, weights = pipeline.pack(arrays, seq_len)
  stream = np.concatenate(arrays) if arrays else np.zeros(0)
  assert windows.shape[1] == seq_len and windows.shape == weights.shape
  np.testing.assert_array_equal(windows[weights > 0], stream)
  assert weights.sum() == stream.size and windows.shape[0] == -(-stream.size // seq_len)


def test_grain_batches_are_deterministic_and_indexable():
  windows = np.arange(200).reshape(50, 4)
  a = pipeline.train_batches(windows, 8, seed=3)
  b = pipeline.train_batches(windows, 8, seed=3)
  for i in (0, 1, 7, 1000):
    np.testing.assert_array_equal(a[i], b[i])
  first_epoch = np.concatenate([a[i] for i in range(6)])
  assert len({tuple(r) for r in first_epoch.tolist()}) == 48  # a permutation: no window twice within an epoch
  assert not np.array_equal(a[0], pipeline.train_batches(windows, 8, seed=4)[0])


def test_markov_data_set_reports_its_entropy_in_bits():
  """The reported entropy equals the sampled windows' mean -log2 p under the source (computed here from its
  tables) within 4 standard errors (about 0.04 bits); the same figure in nats would be 30% off."""
  from d3pm_jax.data.synthetic import MarkovSource
  data = pipeline.build_data(DataConfig(name="markov", seq_len=16, markov_states=5, markov_windows=512), 8, 0)
  assert data.train_batches[0].shape == (8, 16) and data.train_batches[0].max() < 5
  windows = np.concatenate([np.asarray(data.train_batches[i]) for i in range(512 // 8)])
  source = MarkovSource.random(0, 5, concentration=1.0)
  init, trans = np.asarray(source.initial_K, np.float64), np.asarray(source.transition_KxK, np.float64)
  bits = -(np.log2(init[windows[:, 0]]) + np.log2(trans[windows[:, :-1], windows[:, 1:]]).sum(axis=1)) / 16
  reported = data.info["entropy_bits_per_token"]
  assert abs(bits.mean() - reported) < 4 * bits.std() / np.sqrt(len(bits))
  assert abs(bits.mean() - reported * np.log(2)) > 8 * bits.std() / np.sqrt(len(bits))


def _prepared_stream(tmp_path, tokens, seq_len, packing="stream"):
  out = str(tmp_path / packing)
  info = {split: prepared.prepare_split(out, split, [tokens], seq_len, packing) for split in ("train", "validation")}
  byte_tokenizer = {"kind": "bytes", "vocab_size": 256, "sha256": tokenizers.ByteTokenizer().fingerprint(),
                    "path": None}
  prepared.write_metadata(out, {"dataset": "stdlib", "seq_len": seq_len, "packing": packing, "separator": None,
                                "tokenizer": byte_tokenizer,
                                "splits": info, "source": {"validation_permille": 20}})
  return out


def test_random_crops_reach_every_offset_uniformly_and_resume_exactly(tmp_path):
  """A 61-token stream (token i at position i, so a crop's first token is its offset) in rows of 8, the last row
  padded: every crop is the stream's 8 tokens from its offset (read across row boundaries, never into padding);
  2,400 crops reach all 54 offsets with frequencies a chi-square test accepts; the same seed gives the same batches
  at any index (a resumed run reads what it would have), another seed others; and two processes' shares make the
  one-process batch. Mutations: offsets drawn from [0, tokens - L) (never the last), crops by element index within
  an epoch (the same crops every epoch), reading the padded row."""
  import scipy.stats
  stream, seq_len = np.arange(1, 62, dtype=np.int32) % 250, 8
  cfg = DataConfig(name="stdlib", seq_len=seq_len, prepared_dir=_prepared_stream(tmp_path, stream, seq_len),
                   random_crops=True)
  data = pipeline.build_data(cfg, batch_size=6, seed=11)
  crops = np.concatenate([data.train_batches[i] for i in range(400)])
  offsets = crops[:, 0] - 1
  np.testing.assert_array_equal(crops, stream[offsets[:, None] + np.arange(seq_len)])
  counts = np.bincount(offsets, minlength=61 - seq_len + 1)
  assert counts.size == 54 and counts.min() > 0
  assert scipy.stats.chisquare(counts).pvalue > 1e-3
  again = pipeline.build_data(cfg, batch_size=6, seed=11)
  for i in (0, 5, 399, 10_000):
    np.testing.assert_array_equal(again.train_batches[i], data.train_batches[i])
  assert not np.array_equal(pipeline.build_data(cfg, batch_size=6, seed=12).train_batches[0], data.train_batches[0])
  source = pipeline.RandomCrops(pipeline.PreparedRows(prepared.PreparedSplit(cfg.prepared_dir, "train"), 8, False),
                                61, seq_len, seed=11)
  shares = [pipeline.crop_batches(source, 6, process_index=p, process_count=2)[3] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(shares), data.train_batches[3])
  # Evaluation keeps the fixed validation rows.
  np.testing.assert_array_equal(data.val_windows[0], stream[:seq_len])


def test_random_crops_refuse_rows_of_separate_documents(tmp_path):
  cfg = DataConfig(name="stdlib", seq_len=8, random_crops=True,
                   prepared_dir=_prepared_stream(tmp_path, np.arange(1, 30, dtype=np.int32), 8, packing="packed"))
  with pytest.raises(ValueError, match="random_crops crops windows out of one token stream; .* 'packed'-packed"):
    pipeline.build_data(cfg, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="the synthetic 'markov' source has none"):
    DataConfig(name="markov", random_crops=True)


def test_tokenizers_import_no_corpus_module():
  """The corpus modules import their tokenizers from ``data/tokenizers.py``, never the reverse: no import circle.
  Mutation: moving a tokenizer back beside its corpus and importing it lazily from ``make_tokenizer``."""
  import ast
  import pathlib
  source = pathlib.Path(tokenizers.__file__).read_text()
  imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module}
  imported |= {f"{node.module}.{a.name}" for node in ast.walk(ast.parse(source))
               if isinstance(node, ast.ImportFrom) and node.module for a in node.names}
  corpora = {f"d3pm_jax.data.{name}" for name in ("text8", "openwebtext", "lm1b", "stdlib", "pipeline", "prepared")}
  assert not imported & corpora, sorted(imported & corpora)
  for name in ("Text8Tokenizer", "Gpt2Tokenizer", "WordPieceTokenizer", "SentencePieceTokenizer", "ByteTokenizer"):
    assert getattr(tokenizers, name).__module__ == "d3pm_jax.data.tokenizers"
