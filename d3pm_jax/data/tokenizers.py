"""Tokenizers that round-trip bytes exactly: raw bytes (256 symbols) and a locally trained sentencepiece model
(text8's characters, GPT-2's BPE and BERT's WordPiece live beside their data sets).

Each maps ``bytes -> np.ndarray[int32]`` and back, and has a ``name`` (the config's ``data.tokenizer``), a
``fingerprint()`` (a SHA-256 of its definition) that prepared shards record, and ``text_bytes(ids)``: how many
bytes of the original UTF-8 text the ids stand for, the denominator of bits per byte. It counts each token's own
bytes, so a character cut by a window edge counts the bytes on each side, not a replacement character's three,
and separators the tokenizer adds (GPT-2's ``<|endoftext|>``, BERT's ``[CLS]``/``[SEP]``) count 0. The corpus
is handled as bytes, so a file that is not valid UTF-8 still round-trips.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from typing import Iterable

import numpy as np

from d3pm_jax import _checks

TOKENIZERS = ("bytes", "sentencepiece", "text8", "gpt2", "wordpiece")
# Runs that bypass the sentencepiece model: undecodable bytes (surrogate escapes) and the whitespace mark U+2581.
_RAW = re.compile("([\udc80-\udcff\u2581]+)")


def file_sha256(*paths: str) -> str:
  """The SHA-256 of the files' contents, in order: what identifies a tokenizer defined by files."""
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


class HuggingFaceTokenizer:
  """What GPT-2's BPE and BERT's WordPiece share: a Hugging Face ``tokenizers`` object in ``self._tok``, defined
  by the files ``self.files`` (their SHA-256 is the fingerprint); text in, int32 ids out."""

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def fingerprint(self) -> str:
    return file_sha256(*self.files)

  def encode(self, data: bytes | str) -> np.ndarray:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return np.asarray(self._tok.encode(text).ids, np.int32)

  def encode_batch(self, texts) -> list:
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

  def text_bytes(self, ids) -> int:
    """The sum of the ids' byte counts (``token_bytes``)."""
    ids = np.asarray(ids, np.int64).ravel()
    table = self.token_bytes()
    if ids.size and (ids.min() < 0 or ids.max() >= table.size):
      raise ValueError(f"{self.name} ids must lie in [0, {table.size}); got min {ids.min()}, max {ids.max()}")
    return int(table[ids].sum())


class ByteTokenizer:
  """Each byte is a token: vocab 256, lossless for any input."""
  name = "bytes"
  vocab_size = 256

  def fingerprint(self) -> str:
    return hashlib.sha256(b"bytes").hexdigest()

  def encode(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 256); got min {ids.min()}, max {ids.max()}")
    return ids.astype(np.uint8).tobytes()

  def text_bytes(self, ids) -> int:
    return int(np.size(ids))


@dataclasses.dataclass
class SentencePieceTokenizer:
  """A sentencepiece model, loaded from ``model_path`` (a ``.model`` file). A model trained here
  (``SentencePieceTokenizer.train``) is lossless. One trained elsewhere without byte pieces (such as D3PM's LM1B
  model) is accepted as ``lossless = False``: text it has no pieces for becomes its unknown piece, bytes that are
  not UTF-8 are refused, and decoding (and so ``text_bytes``) is the model's own decode (an unknown piece shows as
  its " \u2047 ")."""
  model_path: str
  name = "sentencepiece"

  def __post_init__(self):
    import sentencepiece as spm  # optional dependency: the `data` extra
    if not os.path.exists(self.model_path):
      raise ValueError(f"sentencepiece model {self.model_path!r} does not exist; train one with "
                       "SentencePieceTokenizer.train(...) or pass an existing .model path")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self._tables()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def fingerprint(self) -> str:
    return file_sha256(self.model_path)

  @property
  def files(self) -> list[str]:
    return [self.model_path]

  @property
  def bos_id(self) -> int | None:
    """The sentence-start piece (``<s>``), or None when the model has none."""
    return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

  @property
  def eos_id(self) -> int | None:
    """The sentence-end piece (``</s>``), or None when the model has none."""
    return self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  @property
  def lossless(self) -> bool:
    return self._byte_ids is not None

  def encode(self, data: bytes) -> np.ndarray:
    """Valid UTF-8 goes through the model; bytes that are not valid UTF-8, and literal U+2581 (the model's own
    whitespace mark, which it would decode as a space), become byte-fallback pieces, so any input round-trips."""
    if not self.lossless:
      try:
        return np.asarray(self._sp.encode(data.decode("utf-8")), np.int32)
      except UnicodeDecodeError as e:
        raise ValueError(f"sentencepiece model {self.model_path!r} has no byte pieces, so it cannot encode bytes "
                         f"that are not UTF-8 ({e}); use a model trained with byte fallback") from e
    ids = []
    for i, segment in enumerate(_RAW.split(data.decode("utf-8", errors="surrogateescape"))):
      if i % 2 == 0:
        ids.extend(self._sp.encode(segment) if segment else [])
      else:
        raw = segment.encode("utf-8", errors="surrogateescape")
        ids.extend(self._byte_ids[b] for b in raw)
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> bytes:
    """The exact bytes of ``ids`` (byte pieces are raw bytes, so invalid UTF-8 survives); unknown pieces, which
    encoding never produces but a sampler may, show as U+2047."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"sentencepiece ids must lie in [0, {self.vocab_size}); got min {ids.min()}, max {ids.max()}")
    if not self.lossless:
      return self._sp.decode([int(i) for i in ids.ravel()]).encode("utf-8")
    return b"".join(self._piece_bytes[i] for i in ids.tolist())

  def text_bytes(self, ids) -> int:
    """The decoded bytes: exact for a lossless model (identity normalisation, no dummy prefix, byte pieces are raw
    bytes); for another, its own decode's bytes."""
    return len(self.decode(ids))

  def _tables(self):
    self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    if any(self._sp.is_unknown(i) for i in self._byte_ids):
      self._byte_ids = None  # a model trained elsewhere without byte fallback: lossy
      return
    pieces = []
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        pieces.append(bytes([int(self._sp.id_to_piece(i)[3:5], 16)]))
      elif self._sp.is_unknown(i):
        pieces.append("\u2047".encode())
      elif self._sp.is_control(i):
        pieces.append(b"")
      else:
        pieces.append(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self._piece_bytes = pieces

  @classmethod
  def train(cls, texts: Iterable[bytes], model_prefix: str, vocab_size: int = 8192,
            model_type: str = "unigram", max_sentences: int = 2_000_000,
            delimiters: bool = False) -> "SentencePieceTokenizer":
    """Trains a lossless model: identity normalisation, whitespace kept as is, byte fallback for anything unseen.
    ``delimiters`` reserves sentence-start and sentence-end pieces (``<s>`` = 1, ``</s>`` = 2, sentencepiece's
    defaults) for data that wraps each sentence in them (D3PM's LM1B).

    ``texts`` are documents; each line becomes a training sentence (sentencepiece learns within lines, and
    newlines are encoded through byte fallback). The same texts give the same model file wherever it is written
    (the model is taken from memory, so no output path is recorded in it), hence the same fingerprint.
    """
    import sentencepiece as spm
    _checks.check_choice("sentencepiece model_type", model_type, ("unigram", "bpe"))
    lines = (line for text in texts for line in text.decode("utf-8", errors="replace").splitlines() if line.strip())
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
          normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
          byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
          split_by_whitespace=False, input_sentence_size=max_sentences, shuffle_input_sentence=True,
          bos_id=1 if delimiters else -1, eos_id=2 if delimiters else -1, pad_id=-1, unk_id=0, minloglevel=2)
    except RuntimeError as e:  # sentencepiece reports a vocabulary it cannot fill as an internal error
      needed = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
      if needed:
        raise ValueError(f"a sentencepiece vocabulary of {vocab_size} pieces cannot hold the {needed.group(2)} "
                         f"characters and byte pieces this text needs; use a vocabulary size above "
                         f"{needed.group(2)} (data.spm_vocab_size or --vocab_size)") from e
      raise ValueError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model: {e}") from e
    with open(model_prefix + ".model.tmp", "wb") as f:
      f.write(model.getvalue())
    os.replace(model_prefix + ".model.tmp", model_prefix + ".model")
    return cls(model_prefix + ".model")


def make_tokenizer(name: str, model_path: str | None = None):
  _checks.check_choice("tokenizer", name, TOKENIZERS)
  if name == "bytes":
    return ByteTokenizer()
  if name == "text8":
    from d3pm_jax.data.text8 import Text8Tokenizer
    return Text8Tokenizer()
  if name == "gpt2":
    if not model_path:
      raise ValueError("tokenizer 'gpt2' needs data.tokenizer_path (GPT-2's tokenizer.json, or a directory with "
                       "vocab.json and merges.txt)")
    from d3pm_jax.data.openwebtext import Gpt2Tokenizer
    return Gpt2Tokenizer(model_path)
  if name == "wordpiece":
    if not model_path:
      raise ValueError("tokenizer 'wordpiece' needs data.tokenizer_path (a BERT vocab.txt)")
    from d3pm_jax.data.lm1b import WordPieceTokenizer
    return WordPieceTokenizer(model_path)
  if not model_path:
    raise ValueError("tokenizer 'sentencepiece' needs data.tokenizer_path (a .model file)")
  return SentencePieceTokenizer(model_path)
