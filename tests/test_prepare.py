"""d3pm-prepare: the stdlib corpus through the prepared format gives the very batches and validation windows of
the direct path; a tiny text8.zip made here prepares with the right split and round-trips, and d3pm-train trains
on it; OpenWebText documents in jsonl / parquet / txt with a BPE trained here keep their order, EOS and held-out
tail; shards that do not match the config, and a missing source or tokenizer, are refused at once with a
message."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from d3pm_jax.config import DataConfig
from d3pm_jax.data import pipeline, prepare, prepared, stdlib, tokenizers

from conftest import guarded_command
from test_train import ROOT, experiment

SPLITS = {"train": (0, 4000), "validation": (4000, 4600), "test": (4600, 5200)}


def test_the_stdlib_default_reads_its_own_prepared_shards_with_the_corpus_windows(tmp_path, monkeypatch):
  """The default (no prepared_dir) reads the stdlib corpus through the prepared format, prepared once into the
  cache: its windows and batches are the corpus's files, as bytes, concatenated and cut in memory here, and the
  same as a d3pm-prepare directory's, each validation window knowing its file; a second build reuses the
  cache."""
  corpus = stdlib.read_corpus(20)
  expected = {split: pipeline.pack([np.frombuffer(c, np.uint8) for c in contents], 64)
              for split, (_, contents) in corpus.items()}
  train_windows = expected["train"][0][expected["train"][1].min(axis=1) > 0]
  default = pipeline.build_data(DataConfig(seq_len=64), batch_size=8, seed=3)
  assert default.info["prepared_dir"].startswith(pipeline.cache_root())
  np.testing.assert_array_equal(default.val_windows, expected["validation"][0])
  np.testing.assert_array_equal(default.val_weights, expected["validation"][1])
  # Each validation window's document is the file holding its first byte.
  ends = np.cumsum([len(c) for c in corpus["validation"][1]])
  np.testing.assert_array_equal(default.val_documents,
                                np.searchsorted(ends, np.arange(len(default.val_windows)) * 64, side="right"))
  assert default.val_documents.max() == len(corpus["validation"][0]) - 1
  in_memory = pipeline.train_batches(train_windows, 8, 3)
  assert len(default.train_batches) == len(in_memory)
  prepare.prepare_stdlib(str(tmp_path), seq_len=64)
  via_shards = pipeline.build_data(DataConfig(seq_len=64, prepared_dir=str(tmp_path)), batch_size=8, seed=3)
  for i in (0, 1, 977, len(in_memory) - 1):
    np.testing.assert_array_equal(default.train_batches[i], in_memory[i])
    np.testing.assert_array_equal(via_shards.train_batches[i], in_memory[i])
  monkeypatch.setattr(prepare, "prepare_stdlib", lambda *a, **k: pytest.fail("the cache was not reused"))
  again = pipeline.build_data(DataConfig(seq_len=64), batch_size=8, seed=3)
  assert again.info["prepared_dir"] == default.info["prepared_dir"]


def test_text8_prepares_with_its_split_and_round_trips(tmp_path, text8_zip):
  path, text = text8_zip
  metadata = prepare.prepare_text8(path, str(tmp_path), seq_len=32, split_chars=SPLITS)
  tok = tokenizers.Text8Tokenizer()
  for split, (start, end) in SPLITS.items():
    rows = prepared.PreparedSplit(str(tmp_path), split).read_all()
    assert len(rows) == -(-(end - start) // 32) == metadata["splits"][split]["rows"]
    assert tok.decode(rows[:, 0][rows[:, 1] > 0]) == text[start:end]
  assert metadata["tokenizer"]["kind"] == "text8" and metadata["tokenizer"]["vocab_size"] == 27


def test_text8_tokenizer_refuses_other_characters():
  with pytest.raises(ValueError, match=r"byte b'A' at offset 3"):
    tokenizers.Text8Tokenizer().encode(b"abcA")


def test_d3pm_train_trains_on_prepared_text8(tmp_path, text8_zip):
  prepare.prepare_text8(text8_zip[0], str(tmp_path / "text8"), seq_len=16, split_chars=SPLITS)
  out = subprocess.run(
      [sys.executable, "-m", "d3pm_jax.cli.train", f"--config={ROOT / 'configs' / 'test.py'}",
       f"--workdir={tmp_path / 'run'}", "--config.data.name=text8", "--config.data.tokenizer=text8",
       f"--config.data.prepared_dir={tmp_path / 'text8'}", "--config.train.steps=2"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "validation:" in out.stdout and "bits per character (" in out.stdout
  # One batch of 4 windows spread over the 38 validation rows of 16: three full ones and the last, 600 - 37 * 16.
  tokens = int(out.stdout.split("bits per character (")[1].split(" tokens")[0])
  assert tokens == 3 * 16 + 8
  # d3pm-eval on the test split (text8's published figures are there): its 600 characters, not validation's.
  ev = subprocess.run([sys.executable, "-m", "d3pm_jax.cli.eval", f"--workdir={tmp_path / 'run'}", "--split=test",
                       "--infill_windows=0", "--time_samples=2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert "38 of 38 test windows, 600 tokens" in ev.stdout
  with open(tmp_path / "run" / "eval.json") as f:
    assert json.load(f)["settings"]["split"] == "test"


def test_the_evaluation_split_is_read_from_the_prepared_shards(tmp_path, text8_zip):
  path, text = text8_zip
  prepare.prepare_text8(path, str(tmp_path), seq_len=16, split_chars=SPLITS)
  config = DataConfig(name="text8", tokenizer="text8", seq_len=16, prepared_dir=str(tmp_path))
  for split, (start, end) in SPLITS.items():
    data = pipeline.build_data(config, 4, 0, eval_split=split)
    assert data.tokenizer.decode(data.val_windows[data.val_weights > 0]) == text[start:end]
  with pytest.raises(ValueError, match=r"has no split 'dev'; it has \['test', 'train', 'validation'\]"):
    pipeline.build_data(config, 4, 0, eval_split="dev")
  with pytest.raises(ValueError, match=r"has no split 'test'; it has \['train', 'validation'\]"):
    pipeline.build_data(DataConfig(seq_len=16), 4, 0, eval_split="test")
  with pytest.raises(ValueError, match=r"split 'test': the synthetic 'markov' source has only 'validation'"):
    pipeline.build_data(DataConfig(name="markov", seq_len=16), 4, 0, eval_split="test")


def test_mismatched_shards_are_refused(tmp_path, text8_zip):
  prepare.prepare_text8(text8_zip[0], str(tmp_path), seq_len=32, split_chars=SPLITS)
  with pytest.raises(ValueError, match=r"seq_len: shards 32 vs config 16.*prepare the data again"):
    pipeline.build_data(DataConfig(name="text8", tokenizer="text8", seq_len=16, prepared_dir=str(tmp_path)), 4, 0)
  with pytest.raises(ValueError, match=r"dataset: shards 'text8' vs config 'stdlib'"):
    pipeline.build_data(DataConfig(seq_len=32, prepared_dir=str(tmp_path)), 4, 0)


def test_a_missing_source_fails_at_once_with_what_to_do(tmp_path):
  start = time.time()
  out = subprocess.run(guarded_command("d3pm_jax.cli.prepare", "--dataset=text8",
                                       f"--source={tmp_path / 'text8.zip'}", f"--out={tmp_path / 'out'}"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert out.returncode != 0 and time.time() - start < 10
  assert "text8 not found at" in out.stderr and "http://mattmahoney.net/dc/text8.zip" in out.stderr
  with pytest.raises(ValueError, match="is read from prepared shards: run d3pm-prepare --dataset=text8"):
    DataConfig(name="text8", tokenizer="text8")
  assert not os.path.exists(tmp_path / "out" / "metadata.json")


def test_openwebtext_prepares_documents_in_order_with_eos_and_the_last_ones_held_out(tmp_path, owt):
  root, docs = owt
  tok = tokenizers.Gpt2Tokenizer(str(root / "tokenizer.json"))
  from_pair = tokenizers.Gpt2Tokenizer(str(root / "vocab"))
  for doc in docs:
    assert tok.decode(tok.encode(doc.encode())) == doc.encode()
    assert np.array_equal(tok.encode(doc), from_pair.encode(doc))
  metadata = prepare.prepare_openwebtext([str(root / "corpus")], str(root / "tokenizer.json"), str(tmp_path),
                                         seq_len=32, validation_documents=3, chunk=2)
  for split, chosen in (("train", docs[:9]), ("validation", docs[9:])):
    rows = prepared.PreparedSplit(str(tmp_path), split).read_all()
    expected = np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in chosen])
    assert np.array_equal(rows[:, 0][rows[:, 1] > 0], expected)
    assert metadata["splits"][split]["documents"] == len(chosen)
  assert metadata["tokenizer"]["kind"] == "gpt2" and metadata["separator"] == tok.eos_id
  config = DataConfig(name="openwebtext", tokenizer="gpt2", tokenizer_path=str(root / "tokenizer.json"), seq_len=32,
                      prepared_dir=str(tmp_path))
  data = pipeline.build_data(config, batch_size=2, seed=0)
  assert data.tokenizer.vocab_size == tok.vocab_size and data.val_windows.shape[1] == 32
  # A different tokenizer file (the same merges, one token fewer) is refused by its fingerprint.
  other = root / "other.json"
  spec = json.loads((root / "tokenizer.json").read_text())
  spec["model"]["vocab"].pop(next(iter(spec["model"]["vocab"])))
  other.write_text(json.dumps(spec))
  with pytest.raises(ValueError, match="tokenizer_sha256: shards"):
    pipeline.build_data(dataclasses.replace(config, tokenizer_path=str(other)), batch_size=2, seed=0)


def test_openwebtext_sources_and_tokenizer_missing_say_what_to_do(tmp_path, owt):
  root, _ = owt
  with pytest.raises(ValueError, match="holds no .jsonl/.parquet/.txt files; download the corpus"):
    prepare.prepare_openwebtext([str(tmp_path / "nothing")], str(root / "tokenizer.json"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="does not exist: copy GPT-2's tokenizer.json"):
    prepare.prepare_openwebtext([str(root / "corpus")], str(tmp_path / "tok.json"), str(tmp_path / "out"))
  with pytest.raises(ValueError, match=r"validation_documents must lie in \(0, 12\)"):
    prepare.prepare_openwebtext([str(root / "corpus")], str(root / "tokenizer.json"), str(tmp_path / "out"),
                                validation_documents=12)


def test_openwebtext_from_the_hub_offline_fails_within_seconds_saying_what_to_fetch(tmp_path, owt):
  """No --source means the hub's Skylion007/openwebtext; behind the network guard it must fail fast."""
  root, _ = owt
  start = time.time()
  out = subprocess.run(guarded_command("d3pm_jax.cli.prepare", "--dataset=openwebtext", f"--out={tmp_path / 'o'}",
                                       f"--tokenizer_path={root / 'tokenizer.json'}"),
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert out.returncode != 0 and time.time() - start < 10, out.stderr[-2000:]
  assert ("huggingface.co cannot be reached to read 'Skylion007/openwebtext'" in out.stderr
          and "https://huggingface.co/datasets/Skylion007/openwebtext" in out.stderr and "--source=DIR" in out.stderr)
  assert not os.path.exists(tmp_path / "o" / prepared.METADATA)


def prepare_random_documents(out, packing):
  """Random byte documents of 1-20 tokens prepared in rows of 16, as the stdlib data set; returns the validation
  documents."""
  rng = np.random.default_rng(5)
  splits = {split: [rng.integers(0, 256, rng.integers(1, 21)) for _ in range(count)]
            for split, count in (("train", 300), ("validation", 40))}
  infos = {split: prepared.prepare_split(out, split, docs, 16, packing) for split, docs in splits.items()}
  prepared.write_metadata(out, {"dataset": "stdlib", "seq_len": 16, "packing": packing, "separator": None,
                                "tokenizer": prepare.tokenizer_fingerprint(tokenizers.ByteTokenizer()),
                                "splits": infos, "source": {"validation_permille": 20}})
  return splits["validation"]


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("padded"))
  prepare_random_documents(out, "padded")
  return out


def test_a_train_step_on_padded_rows_counts_only_real_tokens(padded_dir):
  import jax

  from d3pm_jax.models.transformer import Transformer
  from d3pm_jax.training import state, train
  base = experiment()
  config = dataclasses.replace(base, data=dataclasses.replace(base.data, prepared_dir=padded_dir))
  data = pipeline.build_data(config.data, config.train.batch_size, config.train.seed)
  local = np.asarray(data.train_batches[0])
  assert local.shape == (4, 2, 16) and (local[:, 1] == 0).any()
  tokens, segments = local[:, 0], local[:, 1]
  model, process = Transformer(config.model), state.build_process(config.process, config.model)
  optimizer = state.make_optimizer(config.train)
  start = state.init_state(config, model, optimizer)
  step = jax.jit(train.make_train_step(config, model, process, optimizer))
  _, metrics = step(start, (tokens, segments))
  key = jax.random.split(jax.random.split(start.rng)[1], 1)[0]  # the step's key for its one micro-batch
  nats = state.loss_terms(config, model, process, start.params, key, tokens, segments_BxL=segments)["nelbo"]
  assert float(metrics["bits_per_token"]) == pytest.approx(
      float(nats.sum()) / (segments > 0).sum() / np.log(2.0), rel=1e-5)
  _, plain = step(start, tokens)  # the same tokens as plain windows: padding counted, documents mixed
  assert float(plain["bits_per_token"]) != pytest.approx(float(metrics["bits_per_token"]), rel=1e-3)


def test_training_on_padded_rows_evaluates_real_tokens_only(tmp_path, padded_dir):
  from d3pm_jax.training import train
  base = experiment(steps=2, eval_every=2, eval_batches=100)
  config = dataclasses.replace(base, data=dataclasses.replace(base.data, prepared_dir=padded_dir))
  result = train.train_and_evaluate(config, str(tmp_path), quiet=True)
  data = result["data"]
  assert data.val_segments is not None
  evaluated = len(data.val_windows) // 4 * 4  # whole batches of 4
  assert result["validation"]["tokens"] == int(data.val_weights[pipeline.spread_rows(len(data.val_windows),
                                                                                      evaluated)].sum())
  assert np.isfinite(result["validation"]["bits_per_token"])


def test_d3pm_eval_scores_a_packed_row_as_its_documents_apart(tmp_path):
  """An AR baseline trained on packed rows: d3pm-eval's NLL of the whole validation split equals the sum, over
  the validation documents (cut where a row ends, as packing cuts them), of the model's NLL of each piece alone,
  computed position by position."""
  from d3pm_jax.evaluation.eval_workdir import evaluate_workdir
  from d3pm_jax.training import checkpoints, train
  from test_eval_cli import direct_ar_nats
  docs = prepare_random_documents(str(tmp_path / "packed"), "packed")
  base = experiment("autoregressive", steps=2, eval_every=2)
  config = dataclasses.replace(base, data=dataclasses.replace(base.data, prepared_dir=str(tmp_path / "packed")))
  train.train_and_evaluate(config, str(tmp_path / "run"), quiet=True)
  result = evaluate_workdir(str(tmp_path / "run"), batch=8, infill_windows=0)
  params, _ = checkpoints.restore_params(str(tmp_path / "run"), config)
  pieces, position = [], 0
  for doc in docs:
    while doc.size:
      take = min(doc.size, 16 - position % 16)
      pieces.append(doc[:take])
      doc, position = doc[take:], position + take
  alone = 0.0
  for piece in pieces:
    window = np.zeros((1, 16), np.int64)
    window[0, :piece.size] = piece
    alone += direct_ar_nats(config, params, window, (np.arange(16) < piece.size)[None].astype(np.float64))
  like = result["likelihood"]
  assert like["tokens"] == sum(d.size for d in docs)
  assert like["nats_per_token"] * like["tokens"] == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_processes_read_disjoint_complete_rows_of_prepared_shards(tmp_path, processes):
  """Packed rows read from shards by 1, 2 or 4 processes: each global batch is the same, its rows split without
  overlap, and one epoch's batches read every row once."""
  prepare_random_documents(str(tmp_path), "packed")
  split = prepared.PreparedSplit(str(tmp_path), "train")
  source = pipeline.PreparedRows(split, len(split), segments=True)
  whole = pipeline.train_batches(source, 8, seed=2, process_index=0, process_count=1)
  shares = [pipeline.train_batches(source, 8, seed=2, process_index=p, process_count=processes)
            for p in range(processes)]
  all_rows = split.read_all()
  row_ids = {row.tobytes(): i for i, row in enumerate(all_rows)}  # rows are distinct random documents
  seen = []
  for i in range(len(split) // 8):
    parts = [np.asarray(s[i]) for s in shares]
    assert all(part.shape == (8 // processes, 2, 16) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole[i])
    seen += [row_ids[row.tobytes()] for part in parts for row in part]
  assert len(seen) == len(set(seen)) == len(split) // 8 * 8
