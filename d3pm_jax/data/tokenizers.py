"""Every tokenizer: raw bytes (256 symbols), a sentencepiece model (trained here, lossless, or one made elsewhere),
text8's 27 characters, GPT-2's byte-level BPE and BERT's WordPiece. The corpus modules (``text8``, ``openwebtext``,
``lm1b``) import their tokenizer from here; this module imports none of them.

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
import importlib
import io
import os
import re
from typing import Iterable

import numpy as np

from d3pm_jax import _checks

TOKENIZERS = ("bytes", "sentencepiece", "text8", "gpt2", "wordpiece")
TEXT8_ALPHABET = b"abcdefghijklmnopqrstuvwxyz "
GPT2_EOS = "<|endoftext|>"
WORDPIECE_SPECIALS = {"[PAD]": b"", "[CLS]": b"", "[SEP]": b"\n"}  # as decoded text: one line a sentence
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


@dataclasses.dataclass(frozen=True)
class Text8Tokenizer:
  """Characters to ids and back; any other byte is refused with its position."""
  vocab_size: int = len(TEXT8_ALPHABET)
  name = "text8"

  def encode(self, data: bytes) -> np.ndarray:
    table = np.full(256, -1, np.int32)
    table[np.frombuffer(TEXT8_ALPHABET, np.uint8)] = np.arange(len(TEXT8_ALPHABET))
    ids = table[np.frombuffer(data, np.uint8)]
    bad = np.flatnonzero(ids < 0)
    if bad.size:
      raise ValueError(f"text8 holds only a-z and space; byte {data[bad[0]:bad[0] + 1]!r} at offset {bad[0]}")
    return ids

  def decode(self, ids) -> bytes:
    return np.frombuffer(TEXT8_ALPHABET, np.uint8)[np.asarray(ids, np.int64)].tobytes()

  def fingerprint(self) -> str:
    return hashlib.sha256(b"text8-chars:" + TEXT8_ALPHABET).hexdigest()

  def text_bytes(self, ids) -> int:
    return int(np.size(ids))  # every character is one ASCII byte


def need_package(module: str, why: str, extra: str):
  """``module`` imported, or a ValueError naming the pip extra that installs it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ValueError(f"{why} needs the '{module}' package: pip install -e '.[{extra}]'") from e


@dataclasses.dataclass
class Gpt2Tokenizer(HuggingFaceTokenizer):
  """GPT-2's byte-level BPE from ``path``: a ``tokenizer.json`` file, or a directory with ``vocab.json`` and
  ``merges.txt``. Maps UTF-8 ``bytes`` to ids and back; ``eos_id`` is ``<|endoftext|>``."""
  path: str
  name = "gpt2"

  def __post_init__(self):
    hf_tokenizers = need_package("tokenizers", "GPT-2's tokenizer", "openwebtext")
    if os.path.isdir(self.path):
      vocab, merges = os.path.join(self.path, "vocab.json"), os.path.join(self.path, "merges.txt")
      if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise ValueError(f"{self.path} should hold GPT-2's vocab.json and merges.txt (or pass a tokenizer.json)")
      self._files = [vocab, merges]
      self._tok = hf_tokenizers.ByteLevelBPETokenizer(vocab, merges)
    elif os.path.isfile(self.path):
      self._files = [self.path]
      self._tok = hf_tokenizers.Tokenizer.from_file(self.path)
    else:
      raise ValueError(f"GPT-2 tokenizer {self.path!r} does not exist: copy GPT-2's tokenizer.json (or vocab.json "
                       f"and merges.txt) there and pass it with --tokenizer_path / data.tokenizer_path")
    self.eos_id = self._tok.token_to_id(GPT2_EOS)
    if self.eos_id is None:
      raise ValueError(f"the tokenizer at {self.path} has no {GPT2_EOS} token")

  def decode(self, ids) -> bytes:
    return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=False).encode("utf-8")

  def token_bytes(self) -> np.ndarray:
    """int64 ``[V]``: the bytes each id stands for. A byte-level BPE piece is written in GPT-2's printable
    alphabet (one character per byte), so its byte count is its length in that alphabet; ``<|endoftext|>`` and any
    other special token separate documents and stand for no text (0)."""
    if getattr(self, "_token_bytes", None) is None:
      table = np.zeros(self.vocab_size, np.int64)
      special = {t.content for t in self._tok.get_added_tokens_decoder().values()} | {GPT2_EOS}
      for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
        table[i] = 0 if piece in special else len(piece)
      self._token_bytes = table
    return self._token_bytes

  @property
  def files(self) -> list[str]:
    return list(self._files)


@dataclasses.dataclass
class WordPieceTokenizer(HuggingFaceTokenizer):
  """A BERT WordPiece vocabulary (``vocab.txt``; MDLM uses ``bert-base-uncased``'s, 30,522 pieces), lower-casing
  and stripping accents as that model does. ``encode`` gives one sentence as ``[CLS] pieces [SEP]``; ``decode``
  joins pieces with single spaces (LM1B's text is already split at punctuation, so a lower-case sentence decodes
  to itself), drops ``[CLS]``/``[PAD]`` and ends each sentence at ``[SEP]`` with a newline."""
  path: str
  name = "wordpiece"

  def __post_init__(self):
    hf_tokenizers = need_package("tokenizers", "the WordPiece tokenizer", "lm1b")
    if not os.path.isfile(self.path):
      raise ValueError(f"WordPiece vocabulary {self.path!r} does not exist: copy bert-base-uncased's vocab.txt "
                       f"there and pass it with --tokenizer_path / data.tokenizer_path")
    self._tok = hf_tokenizers.BertWordPieceTokenizer(self.path, lowercase=True)
    self._tok._tokenizer.decoder = hf_tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    missing = [s for s in WORDPIECE_SPECIALS if self._tok.token_to_id(s) is None]
    if missing:
      raise ValueError(f"the WordPiece vocabulary {self.path} lacks {missing}; a BERT vocab.txt has them")
    self._special = {self._tok.token_to_id(s): text for s, text in WORDPIECE_SPECIALS.items()}

  @property
  def files(self) -> list[str]:
    return [self.path]

  def text_bytes(self, ids) -> int:
    """The bytes of the normalised text the ids stand for (lower-cased, accents stripped, and CJK characters
    split into words of their own by BERT's pre-tokenizer: all that WordPiece ids can express; LM1B's English
    text is unchanged but for its case): each piece's own bytes (``##`` continuations without the marks), and
    the space before a piece that starts a word after another piece of its sentence; ``[CLS]``, ``[SEP]`` and
    ``[PAD]`` mark sentences and count 0. A window that starts mid-sentence does not count the space before its
    first word."""
    total, previous_piece = 0, False
    for i in (int(i) for i in np.asarray(ids).ravel()):
      if i in self._special:
        previous_piece = False
        continue
      piece = self._tok.id_to_token(i)
      if piece is None:
        raise ValueError(f"WordPiece ids must lie in [0, {self.vocab_size}); got {i}")
      continuation = piece.startswith("##")
      total += len((piece[2:] if continuation else piece).encode("utf-8")) + (previous_piece and not continuation)
      previous_piece = True
    return total

  def decode(self, ids) -> bytes:
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
      raise ValueError(f"WordPiece ids must lie in [0, {self.vocab_size}); got min {min(ids)}, max {max(ids)}")
    out, run = [], []
    for i in ids + [None]:
      if i is None or i in self._special:
        if run:
          out.append(self._tok.decode(run, skip_special_tokens=False).encode("utf-8"))
          run = []
        if i is not None:
          out.append(self._special[i])
      else:
        run.append(i)
    return b"".join(out)


def make_tokenizer(name: str, model_path: str | None = None):
  _checks.check_choice("tokenizer", name, TOKENIZERS)
  if name == "bytes":
    return ByteTokenizer()
  if name == "text8":
    return Text8Tokenizer()
  if name == "gpt2":
    if not model_path:
      raise ValueError("tokenizer 'gpt2' needs data.tokenizer_path (GPT-2's tokenizer.json, or a directory with "
                       "vocab.json and merges.txt)")
    return Gpt2Tokenizer(model_path)
  if name == "wordpiece":
    if not model_path:
      raise ValueError("tokenizer 'wordpiece' needs data.tokenizer_path (a BERT vocab.txt)")
    return WordPieceTokenizer(model_path)
  if not model_path:
    raise ValueError("tokenizer 'sentencepiece' needs data.tokenizer_path (a .model file)")
  return SentencePieceTokenizer(model_path)
