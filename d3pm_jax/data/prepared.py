"""The prepared format: a corpus tokenised once into ArrayRecord shards of fixed-length rows, with a metadata file.

Every row is ``seq_len`` tokens and ``seq_len`` segment ids (one int32 record of 2 x L): segment 0 is padding
(weight 0, never attended to), and positions with the same non-zero id belong to the same document in that row.
Three packing modes, one per published setup:

  ``stream``  documents concatenated (each followed by ``separator`` when given, e.g. GPT-2's EOS) and cut into
              rows; every real token has segment 1, so attention crosses document boundaries (MD4 / MDLM on
              OpenWebText, text8, the stdlib corpus). Only the last row is padded.
  ``packed``  documents concatenated and cut into rows, but each document in a row gets its own segment id
              (1, 2, ...), so attention never crosses a document boundary; a document cut by a row boundary
              continues as segment 1 of the next row (D3PM on LM1B: sentences packed into 128 tokens).
  ``padded``  each document starts a fresh row and is padded to the row's end; a longer one wraps onto further
              rows.
  ``truncated``  each document in one row of its own, padded; a longer one keeps its first L - 1 tokens and its
              last (its end marker, as a tokenizer's truncation keeps ``[SEP]``) (MDLM on LM1B: one sentence per
              row, truncated at 128).

No token is lost or duplicated in any mode but ``truncated``: the rows' real tokens, in order, are the documents'
tokens (with the separators in ``stream``/``packed`` mode).

``metadata.json`` holds the format version, the data set, ``seq_len``, the packing mode, the tokenizer (kind,
vocabulary size and a SHA-256 fingerprint of its file or definition) and per split the rows, tokens, documents
and shard files. Beside each split's shards, ``{split}-documents.npy`` gives every row its document: the index
(in the split's document order) of the document holding the row's first token, so that evaluation can cluster
its intervals by document (windows of one document are not independent samples of text). Where the data set
defines words (LM1B: a sentence's whitespace-separated words plus one for its end), ``{split}-words.npy`` gives
every row the words of the documents that end in it (whose last token it holds), so a split's rows sum to its
words and per-word perplexity, the unit D3PM reports on LM1B, is total nats over total words. Likewise
``{split}-bytes.npy`` gives every row the bytes of original UTF-8 text its real tokens stand for (the tokenizer's
per-token counts, ``tokenizers.py``, summed; separators the packer adds count 0), the denominator of bits per byte:
a split's rows sum to its documents' bytes (less what ``truncated`` rows cut). Shards prepared before the byte
counts were recorded lack that file (``PreparedSplit.row_bytes`` is then None). Reading needs only grain and
array_record, never TensorFlow.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, NamedTuple

import numpy as np

from d3pm_jax.runtime.files import write_json

FORMAT_VERSION = 2  # 2: row documents
PACKING = ("stream", "packed", "padded", "truncated", "wrapped")
# Packings whose rows are plain token windows of one stream (no segment ids): 'wrapped' is 'stream' cut into rows
# of L - 2 tokens, each wrapped in the tokenizer's start and end tokens (BD3-LM's LM1B rows).
UNSEGMENTED = ("stream", "wrapped")
METADATA = "metadata.json"


class Document(NamedTuple):
  """A document's tokens ``[n]`` with, where it comes from text, the bytes of that text each token stands for
  (``token_bytes [n]``, from the tokenizer's ``encode_with_bytes``), and its words where the data set defines
  them. ``prepare_split`` takes either these or plain token arrays, the same kind for a whole split."""
  tokens: np.ndarray
  token_bytes: np.ndarray | None = None
  words: int | None = None


class Packer:
  """Turns a stream of documents (int token arrays) into rows ``[N, 2, L]`` (tokens, segment ids), chunk by
  chunk: ``add(documents, words, token_bytes)`` returns the rows completed so far, ``finish()`` the padded last
  one. ``row_documents()`` is the document of every row returned so far (that of its first token),
  ``row_words()`` the words (``add``'s per-document counts) of the documents whose last token each row holds,
  ``row_bytes()`` the bytes (``add``'s per-token counts) of the tokens each row holds."""

  def __init__(self, seq_len: int, packing: str, separator: int | None = None, wrap: tuple[int, int] | None = None):
    if packing not in PACKING:
      raise ValueError(f"unknown packing {packing!r}; valid: {list(PACKING)}")
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1; got {seq_len}")
    if separator is not None and packing in ("padded", "truncated"):
      raise ValueError(f"{packing} rows hold one document each and take no separator")
    if (packing == "wrapped") != (wrap is not None) or (wrap is not None and seq_len < 3):
      raise ValueError(f"'wrapped' packing, and only it, takes wrap=(start, end) token ids and rows of >= 3 tokens; "
                       f"got packing {packing!r}, wrap {wrap}, seq_len {seq_len}")
    # 'wrapped': the stream is cut into rows of seq_len - 2 and each row wrapped in (start, end) at emission.
    self.output_len, self.wrap = seq_len, wrap
    seq_len = seq_len - 2 if wrap is not None else seq_len
    self.seq_len, self.packing, self.separator = seq_len, packing, separator
    self._tokens = np.zeros(0, np.int32)   # the carried, not yet emitted part of the stream
    self._docs = np.zeros(0, np.int64)     # the document index of each carried token
    self._ends = np.zeros(0, np.int64)     # a document's words at its last token, 0 elsewhere
    self._bytes = np.zeros(0, np.int32)    # the text's bytes each carried token stands for
    self.documents = 0
    self.tokens = 0
    self._row_documents: list[np.ndarray] = []
    self._row_words: list[np.ndarray] = []
    self._row_bytes: list[np.ndarray] = []

  def add(self, documents: Iterable, words: Iterable[int] | None = None,
          token_bytes: Iterable | None = None) -> np.ndarray:
    """``documents``: token arrays; ``words``: one count per document; ``token_bytes``: per document, the bytes
    of text each of its tokens stands for (an array as long as the document)."""
    docs = [np.asarray(d, np.int32).ravel() for d in documents]
    counts = np.zeros(len(docs), np.int64) if words is None else np.asarray(list(words), np.int64)
    if counts.shape != (len(docs),):
      raise ValueError(f"words must give one count per document: {counts.size} for {len(docs)} documents")
    sizes = ([np.zeros(d.size, np.int32) for d in docs] if token_bytes is None
             else [np.asarray(b, np.int32).ravel() for b in token_bytes])
    if [b.size for b in sizes] != [d.size for d in docs]:
      raise ValueError(f"token_bytes must give one count per token: documents of {[d.size for d in docs][:5]} "
                       f"tokens got {[b.size for b in sizes][:5]} counts (first 5)")
    if self.separator is not None:  # stands for no text
      docs = [np.append(d, np.int32(self.separator)) for d in docs]
      sizes = [np.append(b, np.int32(0)) for b in sizes]
    if self.packing == "truncated":  # the text of the pieces cut goes with them
      docs, sizes = zip(*[(d, b) if d.size <= self.seq_len else
                          (np.append(d[:self.seq_len - 1], d[-1]), np.append(b[:self.seq_len - 1], b[-1]))
                          for d, b in zip(docs, sizes)]) if docs else ([], [])
    if any(c and not d.size for c, d in zip(counts, docs)):
      raise ValueError("a document without tokens cannot hold words")
    first = self.documents  # the index of this chunk's first document in the whole stream
    self.documents += len(docs)
    self.tokens += sum(d.size for d in docs)
    ends = [np.pad(np.zeros(d.size - 1, np.int64), (0, 1), constant_values=c) if d.size else np.zeros(0, np.int64)
            for d, c in zip(docs, counts)]
    if self.packing in ("padded", "truncated"):
      return self._padded(docs, ends, sizes)
    ids = np.repeat(np.arange(first, self.documents), np.array([d.size for d in docs], np.int64))
    tokens = np.concatenate([self._tokens, *docs])
    doc_ids = np.concatenate([self._docs, ids])
    marks = np.concatenate([self._ends, *ends])
    byte_counts = np.concatenate([self._bytes, *sizes])
    full = tokens.size // self.seq_len * self.seq_len
    self._tokens, self._docs, self._ends = tokens[full:], doc_ids[full:], marks[full:]
    self._bytes = byte_counts[full:]
    return self._rows(tokens[:full], doc_ids[:full], marks[:full], byte_counts[:full])

  def finish(self) -> np.ndarray:
    """The last, padded row of a ``stream``/``packed`` stream (none when it ended on a row boundary)."""
    rows = self._rows(self._tokens, self._docs, self._ends, self._bytes)
    self._tokens, self._docs, self._ends = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    self._bytes = np.zeros(0, np.int32)
    return rows

  def row_documents(self) -> np.ndarray:
    """int64 ``[rows]``: the document index of each row's first token, for every row emitted so far."""
    return np.concatenate(self._row_documents) if self._row_documents else np.zeros(0, np.int64)

  def row_words(self) -> np.ndarray:
    """int64 ``[rows]``: the words of the documents whose last token each row holds."""
    return np.concatenate(self._row_words) if self._row_words else np.zeros(0, np.int64)

  def row_bytes(self) -> np.ndarray:
    """int64 ``[rows]``: the bytes of text the tokens of each row stand for."""
    return np.concatenate(self._row_bytes) if self._row_bytes else np.zeros(0, np.int64)

  def _rows(self, tokens, doc_ids, marks, byte_counts) -> np.ndarray:
    """Rows of ``tokens`` (a whole number of rows, or the final partial one, zero-padded)."""
    n = -(-tokens.size // self.seq_len)
    out = np.zeros((n, 2, self.seq_len), np.int32)
    if self.packing in UNSEGMENTED:
      segments = np.ones(tokens.size, np.int32)
    else:  # packed (and padded, one document): documents numbered from 1 within each row
      row_start = np.arange(tokens.size) // self.seq_len * self.seq_len
      segments = (doc_ids - doc_ids[row_start] + 1).astype(np.int32)
    tokens_flat, segments_flat = np.zeros(n * self.seq_len, np.int32), np.zeros(n * self.seq_len, np.int32)
    tokens_flat[:tokens.size], segments_flat[:tokens.size] = tokens, segments
    out[:, 0], out[:, 1] = tokens_flat.reshape(n, self.seq_len), segments_flat.reshape(n, self.seq_len)
    self._row_documents.append(np.asarray(doc_ids[::self.seq_len], np.int64))
    row_starts = np.arange(0, tokens.size, self.seq_len)
    self._row_words.append(np.add.reduceat(marks, row_starts) if n else np.zeros(0, np.int64))
    self._row_bytes.append(np.add.reduceat(byte_counts, row_starts, dtype=np.int64) if n else np.zeros(0, np.int64))
    return out if self.wrap is None else self._wrapped(out)

  def _wrapped(self, rows_Nx2xK) -> np.ndarray:
    """Rows of K = L - 2 tokens as rows of L: the start token, the row's tokens, the end token right after them
    (before the padding of a last, partial row), all in segment 1. The two stand for no text (0 bytes)."""
    start, end = self.wrap
    n, _, k = rows_Nx2xK.shape
    real_N = (rows_Nx2xK[:, 1] > 0).sum(axis=1)
    out = np.zeros((n, 2, k + 2), np.int32)
    out[:, 0, 0] = start
    out[:, :, 1:k + 1] = rows_Nx2xK
    out[np.arange(n), 0, real_N + 1] = end
    out[:, 1] = np.arange(k + 2)[None, :] < (real_N + 2)[:, None]
    return out

  def _padded(self, docs, ends, sizes) -> np.ndarray:
    """Each document from the start of a fresh row (one document: segment 1), wrapping onto as many rows as it
    needs."""
    first = self.documents - len(docs)
    rows = [self._rows(d, np.full(d.size, first + i, np.int64), e, b)
            for i, (d, e, b) in enumerate(zip(docs, ends, sizes)) if d.size]
    return np.concatenate(rows) if rows else np.zeros((0, 2, self.seq_len), np.int32)


# ---------------------------------------------------------------- writing and reading shards

class SplitWriter:
  """Writes rows ``[N, 2, L]`` of one split into ArrayRecord shards of ``rows_per_shard`` rows each
  (``{split}-00000.array_record``, ...)."""

  def __init__(self, out_dir: str, split: str, seq_len: int, rows_per_shard: int = 65536):
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir, self.split, self.seq_len, self.rows_per_shard = out_dir, split, seq_len, rows_per_shard
    self.shards: list[str] = []
    self.rows = 0
    self._writer = None
    self._in_shard = 0

  def write(self, rows_Nx2xL: np.ndarray) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    rows = np.asarray(rows_Nx2xL, np.int32)
    if rows.ndim != 3 or rows.shape[1:] != (2, self.seq_len):
      raise ValueError(f"rows must be [N, 2, {self.seq_len}]; got {rows.shape}")
    for row in rows:
      if self._writer is None or self._in_shard == self.rows_per_shard:
        self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}.array_record"
        self._writer = ArrayRecordWriter(os.path.join(self.out_dir, name), "group_size:1")
        self.shards.append(name)
      self._writer.write(row.tobytes())
      self._in_shard += 1
      self.rows += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self) -> dict:
    self._close_shard()
    return {"rows": self.rows, "shards": list(self.shards)}


class PreparedSplit:
  """One split of a prepared directory as a random-access sequence of rows: ``split[i]`` is int32 ``[2, L]``
  (tokens, segment ids). Backed by grain's ArrayRecord source, so only the rows read are loaded."""

  def __init__(self, prepared_dir: str, split: str):
    import grain
    self.metadata = load_metadata(prepared_dir)
    if split not in self.metadata["splits"]:
      raise ValueError(f"{prepared_dir} has no split {split!r}; it has {sorted(self.metadata['splits'])}")
    info = self.metadata["splits"][split]
    self.seq_len = int(self.metadata["seq_len"])
    self._dir, self._documents_file = prepared_dir, info.get("row_documents", f"{split}-documents.npy")
    self._words_file, self._unigram_file = info.get("row_words"), info.get("unigram")
    self._bytes_file = info.get("row_bytes")
    paths = [os.path.join(prepared_dir, name) for name in info["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []
    if len(self._source) != info["rows"]:
      raise ValueError(f"{prepared_dir}: split {split!r} should hold {info['rows']} rows (metadata.json) but its "
                       f"shards hold {len(self._source)}; prepare it again")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[index], np.int32).reshape(2, self.seq_len)

  def documents(self) -> np.ndarray:
    """int64 ``[rows]``: each row's document (that of its first token), as ``Packer.row_documents`` made it."""
    return np.load(os.path.join(self._dir, self._documents_file)).astype(np.int64)

  def words(self) -> np.ndarray | None:
    """int64 ``[rows]``: the words ending in each row (``Packer.row_words``), or None where the data set defines
    no words."""
    if not self._words_file:
      return None
    return np.load(os.path.join(self._dir, self._words_file)).astype(np.int64)

  def row_bytes(self) -> np.ndarray | None:
    """int64 ``[rows]``: the bytes of original text each row's real tokens stand for (``Packer.row_bytes``), or
    None where they were not recorded (documents given without byte counts, or shards prepared before they were)."""
    if not self._bytes_file:
      return None
    return np.load(os.path.join(self._dir, self._bytes_file)).astype(np.int64)

  def unigram(self) -> np.ndarray:
    """int64 ``[max token + 1]``: how often each token occurs in the split's real positions (counted while
    preparing; counted now, in chunks, for a directory prepared before that)."""
    if self._unigram_file:
      return np.load(os.path.join(self._dir, self._unigram_file)).astype(np.int64)
    counts = np.zeros(0, np.int64)
    for start in range(0, len(self), 65536):
      records = self._source.__getitems__(range(start, min(start + 65536, len(self))))
      counts = _count_tokens(counts, np.frombuffer(b"".join(records), np.int32).reshape(-1, 2, self.seq_len))
    return counts

  def read_all(self) -> np.ndarray:
    """Every row, ``[rows, 2, L]``, read in bulk (one read per record costs ~15x as much)."""
    if not len(self):
      return np.zeros((0, 2, self.seq_len), np.int32)
    records = self._source.__getitems__(range(len(self)))
    return np.frombuffer(b"".join(records), np.int32).reshape(len(self), 2, self.seq_len)


def _count_tokens(counts, rows_Nx2xL) -> np.ndarray:
  """``counts`` plus the occurrences of each token in the rows' real (segment > 0) positions, grown as needed."""
  real = rows_Nx2xL[:, 0][rows_Nx2xL[:, 1] > 0]
  if not real.size:
    return counts
  counts = np.pad(counts, (0, max(0, int(real.max()) + 1 - counts.size)))
  return counts + np.bincount(real, minlength=counts.size)


def write_metadata(prepared_dir: str, metadata: dict) -> None:
  """Written last, so a directory with metadata holds complete shards."""
  write_json(os.path.join(prepared_dir, METADATA), {"format_version": FORMAT_VERSION, **metadata})


def load_metadata(prepared_dir: str) -> dict:
  path = os.path.join(prepared_dir, METADATA)
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: {prepared_dir} is not a prepared data set (or its preparation did not "
                     f"finish); run d3pm-prepare --out={prepared_dir}")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {metadata.get('format_version')}; this d3pm_jax reads "
                     f"{FORMAT_VERSION}; prepare it again")
  return metadata


def _pack(packer: Packer, documents: Iterable, chunk: int, write) -> tuple[bool, bool]:
  """Feeds ``documents`` (token arrays, or ``Document`` ones) through ``packer`` ``chunk`` at a time, handing
  every completed row, the padded last one included, to ``write(rows)``; returns whether the documents came with
  words and with byte counts."""
  batch, words, sizes, kind = [], [], [], None

  def flush():
    write(packer.add(batch, words if kind and kind[0] else None, sizes if kind and kind[1] else None))
    for pending in (batch, words, sizes):
      pending.clear()

  for doc in documents:
    doc = doc if isinstance(doc, Document) else Document(doc)
    this = (doc.words is not None, doc.token_bytes is not None)
    if kind is None:
      kind = this
    if this != kind:
      raise ValueError(f"a split's documents must all carry the same fields: the first had words {kind[0]}, "
                       f"byte counts {kind[1]}; another has words {this[0]}, byte counts {this[1]}")
    batch.append(doc.tokens)
    words.append(doc.words)
    sizes.append(doc.token_bytes)
    if len(batch) == chunk:
      flush()
  flush()
  write(packer.finish())
  return kind or (False, False)


def chunk_hash(seed: int, rows) -> np.ndarray:
  """A uniform float in [0, 1) for each row index, from (seed, index) alone (splitmix64): the same row goes to the
  same split whatever the chunking and wherever it is prepared."""
  with np.errstate(over="ignore"):
    # splitmix64's state after row + 1 steps of its golden-ratio increment from a state set by the seed.
    z = (np.uint64(seed % 2 ** 64) * np.uint64(0xD1B54A32D192ED03)
         + (np.asarray(rows, np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


def prepare_chunk_splits(out_dir: str, documents: Iterable, seq_len: int, separator: int | None,
                         validation_permille: int, seed: int = 0, chunk: int = 10000,
                         rows_per_shard: int = 65536) -> dict:
  """One stream of ``documents`` cut into rows, each row (chunk) going to ``validation`` with probability
  ``validation_permille`` / 1000 by ``chunk_hash(seed, row)`` and to ``train`` otherwise (MD4's OpenWebText split:
  a random 2% of the 1024-token chunks). Returns both splits' metadata entries; a split's ``documents`` counts the
  distinct documents its rows start in."""
  if not 0 < validation_permille < 1000:
    raise ValueError(f"validation_permille must lie in (0, 1000); got {validation_permille}")
  packer = Packer(seq_len, "stream", separator)
  writers = {split: SplitWriter(out_dir, split, seq_len, rows_per_shard) for split in ("train", "validation")}
  counts = {split: np.zeros(0, np.int64) for split in writers}
  held_out, written = [], 0

  def write(rows):
    nonlocal written
    validation = chunk_hash(seed, np.arange(written, written + len(rows))) < validation_permille / 1000.0
    written += len(rows)
    held_out.append(validation)
    for split, mask in (("train", ~validation), ("validation", validation)):
      counts[split] = _count_tokens(counts[split], rows[mask])
      writers[split].write(rows[mask])

  _, counted = _pack(packer, documents, chunk, write)
  held_out = np.concatenate(held_out) if held_out else np.zeros(0, bool)
  row_documents, row_bytes = packer.row_documents(), packer.row_bytes()
  infos = {}
  for split, mask in (("train", ~held_out), ("validation", held_out)):
    documents_file, unigram_file = f"{split}-documents.npy", f"{split}-unigram.npy"
    np.save(os.path.join(out_dir, documents_file), row_documents[mask])
    np.save(os.path.join(out_dir, unigram_file), counts[split])
    infos[split] = {**writers[split].close(), "tokens": int(counts[split].sum()),
                    "documents": int(np.unique(row_documents[mask]).size), "row_documents": documents_file,
                    "unigram": unigram_file}
    if counted:
      infos[split].update(_save_bytes(out_dir, split, row_bytes[mask]))
  return infos


def _save_bytes(out_dir: str, split: str, row_bytes) -> dict:
  """Writes a split's row byte counts; returns its metadata entries (the total and the file)."""
  np.save(os.path.join(out_dir, f"{split}-bytes.npy"), np.asarray(row_bytes, np.int64))
  return {"bytes": int(np.sum(row_bytes)), "row_bytes": f"{split}-bytes.npy"}


def prepare_split(out_dir: str, split: str, documents: Iterable, seq_len: int, packing: str,
                  separator: int | None = None, chunk: int = 10000, rows_per_shard: int = 65536,
                  wrap: tuple[int, int] | None = None) -> dict:
  """Packs ``documents`` (an iterable of token arrays, or of ``Document`` ones carrying their byte counts and
  words) into ``out_dir``'s shards of ``split``; returns the split's metadata entry (rows, tokens, documents,
  shards, and where the documents carry them the words and bytes with the rows' word and byte files)."""
  packer = Packer(seq_len, packing, separator, wrap)
  writer = SplitWriter(out_dir, split, seq_len, rows_per_shard)
  counts = np.zeros(0, np.int64)

  def write(rows):
    nonlocal counts
    counts = _count_tokens(counts, rows)
    writer.write(rows)

  worded, counted = _pack(packer, documents, chunk, write)
  documents_file = f"{split}-documents.npy"
  row_documents = packer.row_documents()
  np.save(os.path.join(out_dir, documents_file),
          row_documents.astype(np.int32 if packer.documents < 2 ** 31 else np.int64))
  np.save(os.path.join(out_dir, f"{split}-unigram.npy"), counts)
  info = {**writer.close(), "tokens": int(packer.tokens), "documents": int(packer.documents),
          "row_documents": documents_file, "unigram": f"{split}-unigram.npy"}
  if worded:
    info.update(words=int(packer.row_words().sum()), row_words=f"{split}-words.npy")
    np.save(os.path.join(out_dir, info["row_words"]), packer.row_words())
  if counted:
    info.update(_save_bytes(out_dir, split, packer.row_bytes()))
  return info
