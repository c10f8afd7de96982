"""The prepared format: every packing mode keeps every token once and in order, segment ids mark documents as the
mode promises, chunking does not change the rows, and ArrayRecord shards read back exactly."""
import os

import numpy as np
import pytest

from d3pm_jax.data import prepared


def random_documents(seed, count, max_len=40, vocab=50):
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, rng.integers(1, max_len)).astype(np.int32) for _ in range(count)]


def pack_all(docs, seq_len, packing, separator=None, chunk=None):
  packer = prepared.Packer(seq_len, packing, separator)
  parts = []
  chunk = chunk or len(docs)
  for i in range(0, len(docs), chunk):
    parts.append(packer.add(docs[i:i + chunk]))
  parts.append(packer.finish())
  return np.concatenate(parts), packer


# The packings that take no wrap tokens ('wrapped' is tested on its own below and in tests/test_lm1b.py).
PLAIN = [p for p in prepared.PACKING if p != "wrapped"]


def test_wrapped_rows_are_the_stream_between_start_and_end_tokens():
  """'wrapped' (BD3-LM's rows): rows of L, each the start token, the next L - 2 tokens of the stream, the end token
  (in the last, partial row right after its tokens, then padding), with each row's bytes those of its stream
  tokens. Mutations: the end token after the padding; rows of L stream tokens; a wrap on another packing."""
  docs = random_documents(6, 50)
  sizes = [np.arange(d.size) % 3 for d in docs]
  packer = prepared.Packer(16, "wrapped", wrap=(201, 202))
  rows = np.concatenate([packer.add(docs[:20], token_bytes=sizes[:20]), packer.add(docs[20:], token_bytes=sizes[20:]),
                         packer.finish()])
  real_N = (rows[:, 1] > 0).sum(axis=1)
  assert (real_N[:-1] == 16).all() and rows.shape[2] == 16 and (rows[:, 0, 0] == 201).all()
  assert (rows[np.arange(len(rows)), 0, real_N - 1] == 202).all() and (rows[:, 0][rows[:, 1] == 0] == 0).all()
  np.testing.assert_array_equal(np.concatenate([r[0, 1:n - 1] for r, n in zip(rows, real_N)]), np.concatenate(docs))
  stream_bytes = np.concatenate(sizes)
  np.testing.assert_array_equal(packer.row_bytes(), [stream_bytes[i:i + 14].sum() for i in range(0, stream_bytes.size, 14)])
  with pytest.raises(ValueError, match=r"'wrapped' packing, and only it, takes wrap"):
    prepared.Packer(16, "stream", wrap=(1, 2))
  with pytest.raises(ValueError, match=r"'wrapped' packing, and only it, takes wrap"):
    prepared.Packer(16, "wrapped")


@pytest.mark.parametrize("packing", [p for p in PLAIN if p != "truncated"])
def test_no_token_is_lost_or_duplicated(packing):
  docs = random_documents(0, 300)
  separator = 0 if packing != "padded" else None
  rows, packer = pack_all(docs, 16, packing, separator)
  expected = np.concatenate([np.append(d, 0) if separator is not None else d for d in docs])
  tokens, segments = rows[:, 0], rows[:, 1]
  assert np.array_equal(tokens[segments > 0], expected)
  assert np.all(tokens[segments == 0] == 0)  # padding is zeros
  assert packer.tokens == expected.size and packer.documents == 300


def test_stream_rows_are_full_except_the_last():
  rows, _ = pack_all(random_documents(1, 100), 16, "stream")
  segments = rows[:, 1]
  assert np.all(segments[:-1] == 1) and segments[-1, 0] == 1
  assert set(np.unique(segments[-1])) <= {0, 1}


def test_packed_segment_ids_follow_documents_and_restart_in_every_row():
  """Independent oracle: walk the documents token by token, numbering them from 1 in each row."""
  docs = random_documents(2, 200)
  seq_len = 16
  rows, _ = pack_all(docs, seq_len, "packed")
  expected_segments, position, last_doc, current = [], 0, None, 0
  for index, doc in enumerate(docs):
    for _ in doc:
      if position % seq_len == 0:
        last_doc, current = None, 0
      if index != last_doc:
        current += 1
        last_doc = index
      expected_segments.append(current)
      position += 1
  segments = rows[:, 1].reshape(-1)
  assert np.array_equal(segments[:len(expected_segments)], expected_segments)
  assert np.all(segments[len(expected_segments):] == 0)


def test_padded_rows_hold_one_document_each_and_wrap():
  docs = [np.arange(1, 6), np.arange(1, 40), np.arange(7, 8)]  # 5, 39 (3 rows of 16) and 1 tokens
  rows, _ = pack_all(docs, 16, "padded")
  assert rows.shape == (1 + 3 + 1, 2, 16)
  assert np.array_equal(rows[0, 0, :5], np.arange(1, 6)) and np.all(rows[0, 1] == (np.arange(16) < 5))
  assert np.array_equal(rows[1:4, 0].reshape(-1)[:39], np.arange(1, 40))
  assert rows[3, 1].sum() == 39 - 32 and rows[4, 0, 0] == 7 and rows[4, 1].sum() == 1


def test_truncated_rows_hold_each_document_cut_to_its_first_tokens_and_its_last():
  """A document of 39 tokens in rows of 16 keeps tokens 1..15 and its last, 39 (a tokenizer's truncation keeps
  the end marker); shorter ones are whole and padded; one row each. Mutation: keeping the first 16 (losing the end
  marker), or wrapping."""
  docs = [np.arange(1, 6), np.arange(1, 40), np.arange(7, 8), np.arange(20, 36)]
  rows, packer = pack_all(docs, 16, "truncated")
  assert rows.shape == (4, 2, 16) and packer.tokens == 5 + 16 + 1 + 16
  np.testing.assert_array_equal(rows[1, 0], np.append(np.arange(1, 16), 39))
  np.testing.assert_array_equal(rows[3, 0], np.arange(20, 36))
  assert rows[0, 1].sum() == 5 and rows[2, 1].sum() == 1 and (rows[[1, 3], 1] == 1).all()
  with pytest.raises(ValueError, match="truncated rows hold one document each and take no separator"):
    prepared.Packer(16, "truncated", separator=0)


@pytest.mark.parametrize("packing", PLAIN)
def test_chunking_does_not_change_the_rows(packing):
  docs = random_documents(3, 250)
  whole, _ = pack_all(docs, 16, packing)
  chunked, _ = pack_all(docs, 16, packing, chunk=7)
  assert np.array_equal(whole, chunked)


def test_shards_read_back_exactly(tmp_path):
  docs = random_documents(4, 500)
  info = prepared.prepare_split(str(tmp_path), "train", docs, 16, "packed", chunk=64, rows_per_shard=100)
  rows, _ = pack_all(docs, 16, "packed")
  assert info["rows"] == len(rows) and len(info["shards"]) == -(-len(rows) // 100)
  assert info["documents"] == 500 and info["tokens"] == sum(d.size for d in docs)
  prepared.write_metadata(str(tmp_path), {"seq_len": 16, "packing": "packed", "splits": {"train": info}})
  split = prepared.PreparedSplit(str(tmp_path), "train")
  assert len(split) == len(rows)
  assert np.array_equal(split.read_all(), rows)
  assert np.array_equal(split[len(rows) - 1], rows[-1])


def test_unprepared_or_incomplete_directories_are_refused(tmp_path):
  with pytest.raises(ValueError, match="not a prepared data set.*d3pm-prepare"):
    prepared.PreparedSplit(str(tmp_path), "train")
  info = prepared.prepare_split(str(tmp_path), "train", random_documents(5, 50), 16, "stream")
  prepared.write_metadata(str(tmp_path), {"seq_len": 16, "packing": "stream",
                                          "splits": {"train": {**info, "rows": info["rows"] + 1}}})
  with pytest.raises(ValueError, match="should hold .* rows"):
    prepared.PreparedSplit(str(tmp_path), "train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    prepared.PreparedSplit(str(tmp_path), "validation")
  with pytest.raises(ValueError, match="unknown packing 'pack'; valid"):
    prepared.Packer(16, "pack")
  assert os.path.exists(tmp_path / "metadata.json")


@pytest.mark.parametrize("packing", PLAIN)
def test_every_row_knows_the_document_of_its_first_token(packing, tmp_path):
  """Independent oracle: the document index of each row's first token, from the documents' lengths (and the
  separators) for stream/packed rows, from the row count of each document for padded rows; the split's
  ``documents()`` reads the same back. Mutation: numbering by the row's last token, or padded rows all 0."""
  docs = random_documents(6, 120)
  separator = 0 if packing not in ("padded", "truncated") else None
  seq_len = 16
  rows, packer = pack_all(docs, seq_len, packing, separator, chunk=13)
  if packing == "truncated":
    expected = np.arange(len(docs))
  elif packing == "padded":
    expected = np.repeat(np.arange(len(docs)), [-(-d.size // seq_len) for d in docs])
  else:
    ends = np.cumsum([d.size + (separator is not None) for d in docs])
    expected = np.searchsorted(ends, np.arange(len(rows)) * seq_len, side="right")
  np.testing.assert_array_equal(packer.row_documents(), expected)
  assert len(np.unique(expected)) < len(docs) < len(rows) or packing in ("padded", "truncated")  # mid-document
  info = prepared.prepare_split(str(tmp_path), "validation", docs, seq_len, packing, separator, chunk=13)
  prepared.write_metadata(str(tmp_path), {"seq_len": seq_len, "packing": packing, "splits": {"validation": info}})
  np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path), "validation").documents(), expected)


@pytest.mark.parametrize("packing", PLAIN)
def test_every_row_counts_the_words_of_the_documents_ending_in_it(packing, tmp_path):
  """Independent oracle: the row of each document's last token (from the documents' lengths and separators, or
  for padded rows from the rows each document fills) gets its words; summed over rows they are all the words.
  The split reads them back; a split of plain documents has none. Mutation: attributing words to the row of a
  document's first token, or dropping those that end in the padded last row."""
  docs = random_documents(7, 90)
  words = [int(w) for w in np.random.default_rng(8).integers(1, 20, len(docs))]
  separator = 0 if packing not in ("padded", "truncated") else None
  seq_len = 16
  packer = prepared.Packer(seq_len, packing, separator)
  rows = np.concatenate([packer.add(docs[i:i + 11], words[i:i + 11]) for i in range(0, len(docs), 11)]
                        + [packer.finish()])
  if packing == "truncated":
    last_row = np.arange(len(docs))
  elif packing == "padded":
    last_row = np.cumsum([-(-d.size // seq_len) for d in docs]) - 1
  else:
    last_row = (np.cumsum([d.size + (separator is not None) for d in docs]) - 1) // seq_len
  expected = np.bincount(last_row, weights=words, minlength=len(rows)).astype(np.int64)
  np.testing.assert_array_equal(packer.row_words(), expected)
  assert packer.row_words().sum() == sum(words) and expected[-1] > 0
  worded = [prepared.Document(d, words=w) for d, w in zip(docs, words)]
  info = prepared.prepare_split(str(tmp_path), "validation", worded, seq_len, packing, separator, chunk=13)
  plain = prepared.prepare_split(str(tmp_path), "train", docs, seq_len, packing, separator)
  prepared.write_metadata(str(tmp_path), {"seq_len": seq_len, "packing": packing,
                                          "splits": {"validation": info, "train": plain}})
  np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path), "validation").words(), expected)
  assert info["words"] == sum(words) and prepared.PreparedSplit(str(tmp_path), "train").words() is None
  with pytest.raises(ValueError, match="one count per document: 2 for 3 documents"):
    prepared.Packer(seq_len, packing, separator).add(docs[:3], [1, 2])


def _rows_by_hand(docs, seq_len, packing, separator):
  """The rows' real positions as lists of document positions ``(document, index)`` (index -1: the separator),
  written out one position at a time: what each packing mode promises, without the packer's arrays."""
  rows, current = [], []
  for i, d in enumerate(docs):
    positions = [(i, k) for k in range(d.size)] + ([(i, -1)] if separator is not None else [])
    if packing == "truncated" and len(positions) > seq_len:
      positions = positions[:seq_len - 1] + positions[-1:]
    if packing in ("padded", "truncated"):
      rows += [positions[j:j + seq_len] for j in range(0, len(positions), seq_len)]
      continue
    for position in positions:
      current.append(position)
      if len(current) == seq_len:
        rows.append(current)
        current = []
  return rows + ([current] if current else [])


@pytest.mark.parametrize("packing", PLAIN)
def test_every_row_counts_the_bytes_its_tokens_stand_for(packing, tmp_path):
  """Per-token byte counts (what a tokenizer's ``encode_with_bytes`` gives) follow their tokens into the rows:
  each row's bytes are the counts of the positions it holds, written out position by position here, separators
  0 and the pieces a ``truncated`` row cuts not counted; the split reads them back with their total, and a split
  of plain token arrays records none. Mutations: a separator counting a byte; truncating the tokens but not their
  counts (the row then counts its first 16); summing each row's counts from the wrong offset."""
  docs = random_documents(11, 90)
  rng = np.random.default_rng(12)
  counts = [rng.integers(1, 5, d.size).astype(np.int32) for d in docs]
  separator = 0 if packing not in ("padded", "truncated") else None
  seq_len = 16
  expected = np.array([sum(int(counts[i][k]) if k >= 0 else 0 for i, k in row)
                       for row in _rows_by_hand(docs, seq_len, packing, separator)], np.int64)
  packer = prepared.Packer(seq_len, packing, separator)
  rows = np.concatenate([packer.add(docs[i:i + 11], token_bytes=counts[i:i + 11]) for i in range(0, len(docs), 11)]
                        + [packer.finish()])
  assert len(rows) == len(expected)
  np.testing.assert_array_equal(packer.row_bytes(), expected)
  if packing != "truncated":
    assert expected.sum() == sum(int(c.sum()) for c in counts)  # no text lost, none counted twice
  counted = [prepared.Document(d, c) for d, c in zip(docs, counts)]
  info = prepared.prepare_split(str(tmp_path), "validation", counted, seq_len, packing, separator, chunk=13)
  plain = prepared.prepare_split(str(tmp_path), "train", docs, seq_len, packing, separator)
  prepared.write_metadata(str(tmp_path), {"seq_len": seq_len, "packing": packing,
                                          "splits": {"validation": info, "train": plain}})
  np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path), "validation").row_bytes(), expected)
  assert info["bytes"] == expected.sum() and prepared.PreparedSplit(str(tmp_path), "train").row_bytes() is None
  with pytest.raises(ValueError, match=r"one count per token: documents of \[.*\] tokens got \[.*\] counts"):
    prepared.Packer(seq_len, packing, separator).add(docs[:2], token_bytes=[counts[0], counts[0][:-1]])
  with pytest.raises(ValueError, match="must all carry the same fields: the first had words False, byte counts "
                                       "True; another has words False, byte counts False"):
    prepared.prepare_split(str(tmp_path / "mixed"), "train", [counted[0], docs[1]], seq_len, packing, separator)


def test_the_split_counts_its_tokens(tmp_path):
  """The unigram counts (the mutual-information schedule's distribution) are the documents' own token counts, the
  separators included and the padding not; a directory prepared without them counts them on reading. Mutation:
  counting the padded zeros, or only the first chunk."""
  docs = random_documents(9, 70)
  info = prepared.prepare_split(str(tmp_path), "train", docs, 16, "packed", separator=0, chunk=9)
  prepared.write_metadata(str(tmp_path), {"seq_len": 16, "packing": "packed", "splits": {"train": info}})
  want = np.bincount(np.concatenate([np.append(d, 0) for d in docs]))
  np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path), "train").unigram(), want)
  del info["unigram"]
  prepared.write_metadata(str(tmp_path), {"seq_len": 16, "packing": "packed", "splits": {"train": info}})
  np.testing.assert_array_equal(prepared.PreparedSplit(str(tmp_path), "train").unigram(), want)


def test_chunk_splits_hold_out_a_random_share_of_one_stream(tmp_path):
  """MD4's split: the stream's rows, each in exactly one split and in stream order within it (so together they are
  the plain stream's rows), the validation share within 3 standard deviations of 20%, the same rows for the same
  seed and others for another; each split's row documents, token counts and byte counts are those of its rows.
  Mutations: deciding by a row's index within its chunk of documents (the same pattern every chunk), dropping the
  padded last row, or giving a split the byte counts of the stream's first rows."""
  docs = random_documents(10, 3000)
  counts = [np.random.default_rng(i).integers(1, 5, d.size).astype(np.int32) for i, d in enumerate(docs)]
  row_bytes = np.array([sum(int(counts[i][k]) if k >= 0 else 0 for i, k in row)
                        for row in _rows_by_hand(docs, 16, "stream", 0)])
  stream, packer = pack_all(docs, 16, "stream", separator=0)
  infos = prepared.prepare_chunk_splits(str(tmp_path), [prepared.Document(d, c) for d, c in zip(docs, counts)], 16,
                                        0, validation_permille=200, seed=3, chunk=97)
  prepared.write_metadata(str(tmp_path), {"seq_len": 16, "packing": "stream", "splits": infos})
  splits = {s: prepared.PreparedSplit(str(tmp_path), s) for s in infos}
  rows = {s: split.read_all() for s, split in splits.items()}
  total = len(stream)
  assert len(rows["train"]) + len(rows["validation"]) == total
  held = np.zeros(total, bool)
  position = {row.tobytes(): i for i, row in enumerate(stream)}  # rows are distinct (random tokens)
  assert len(position) == total
  for split, r in rows.items():
    where = np.array([position[row.tobytes()] for row in r])
    assert (np.diff(where) > 0).all()  # in stream order
    held[where] = split == "validation"
    np.testing.assert_array_equal(splits[split].documents(), packer.row_documents()[where])
    np.testing.assert_array_equal(splits[split].row_bytes(), row_bytes[where])
    np.testing.assert_array_equal(splits[split].unigram(), np.bincount(r[:, 0][r[:, 1] > 0], minlength=50)[
        :splits[split].unigram().size])
  share = held.mean()
  assert abs(share - 0.2) < 3 * np.sqrt(0.2 * 0.8 / total), (share, total)
  again = prepared.prepare_chunk_splits(str(tmp_path / "again"), docs, 16, 0, validation_permille=200, seed=3)
  other = prepared.prepare_chunk_splits(str(tmp_path / "other"), docs, 16, 0, validation_permille=200, seed=4)
  assert again["validation"]["rows"] == infos["validation"]["rows"]
  np.testing.assert_array_equal(np.load(tmp_path / "again" / "validation-documents.npy"),
                                np.load(tmp_path / "validation-documents.npy"))
  assert not np.array_equal(np.load(tmp_path / "other" / "validation-documents.npy"),
                            np.load(tmp_path / "validation-documents.npy"))
  assert other["train"]["rows"] + other["validation"]["rows"] == total
