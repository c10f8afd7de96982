"""Every tokenizer: raw bytes (256 symbols), a sentencepiece model (trained here, lossless, or one made elsewhere),
text8's 27 characters, GPT-2's byte-level BPE and BERT's WordPiece. The corpus modules (``text8``, ``openwebtext``,
``lm1b``) import their tokenizer from here; this module imports none of them.

Each maps ``bytes -> np.ndarray[int32]`` and back, and has a ``name`` (the config's ``data.tokenizer``) and a
``fingerprint()`` (a SHA-256 of its definition) that prepared shards record. ``encode_with_bytes(data)`` gives the
ids and, beside them, how many bytes of the original UTF-8 text each token stands for: its own span of the text
and the gap before it (whitespace the tokenizer drops, characters its normaliser removes), the last token also
the text after it. A document's counts sum to exactly its UTF-8 length, whatever the tokenizer normalises (BERT's
lower case, stripped accents, punctuation split off, ``[UNK]``; sentencepiece's NFKC), and separators the
tokenizer adds (``[CLS]``, ``[SEP]``) count 0 (or the whitespace after the last piece). ``d3pm-prepare`` records
them, summed per row, as the denominator of bits per byte. A ``lossless`` tokenizer's ids alone give its text, so
``token_bytes()`` (bytes per id) counts exactly too: raw bytes, text8, GPT-2 and a sentencepiece model trained
here; not WordPiece or a model without byte pieces, whose ids lose the original text. The corpus is handled as
bytes, so a file that is not valid UTF-8 still round-trips (for the Hugging Face tokenizers it is decoded with
U+FFFD first, and the counts are those of the decoded text).
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


def char_byte_offsets(text: str) -> np.ndarray:
  """int64 ``[chars + 1]``: where each character of ``text`` starts in its UTF-8 encoding, and the encoding's
  length last (character offsets, as Hugging Face tokenizers give them, to byte offsets)."""
  raw = np.frombuffer(text.encode("utf-8"), np.uint8)
  return np.append(np.flatnonzero((raw & 0xC0) != 0x80), raw.size)  # UTF-8 continuation bytes are 10xxxxxx


def bytes_from_ends(ends_N, total: int) -> np.ndarray:
  """int32 ``[N]``: the bytes of original text each of N tokens stands for, given where each ends in the text
  (byte offsets): those after the previous token's end up to its own, so the gap before a token counts with it.
  An end that does not move forward (a token added without text, such as ``[CLS]``/``[SEP]`` at offset 0, or a
  second piece of one character) counts 0; the last token also takes the text after it, so the counts sum to
  ``total``. No tokens, no counts: text a tokenizer drops entirely (only whitespace) stands for nothing."""
  ends = np.maximum.accumulate(np.asarray(ends_N, np.int64).ravel()) if np.size(ends_N) else np.zeros(0, np.int64)
  if ends.size:
    if ends[-1] > total:
      raise ValueError(f"a token ends at byte {ends[-1]} of a text of {total} bytes")
    ends[-1] = total
  return np.diff(ends, prepend=0).astype(np.int32)


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

  def encode_with_bytes(self, data: bytes | str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n], bytes [n])``: the ids and the bytes of the original text each stands for (module docstring)."""
    return self.encode_batch_with_bytes([data])[0]

  def encode_batch_with_bytes(self, texts) -> list[tuple[np.ndarray, np.ndarray]]:
    """``encode_with_bytes`` of every text, tokenised as one batch."""
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
    return [self._counted(text, e) for text, e in zip(texts, self._tok.encode_batch(texts))]

  def _counted(self, text: str, encoding) -> tuple[np.ndarray, np.ndarray]:
    """From the encoding's offsets into ``text`` (characters of the original, before normalisation)."""
    starts = char_byte_offsets(text)
    ends = starts[np.asarray(encoding.offsets, np.int64).reshape(-1, 2)[:, 1]]
    return np.asarray(encoding.ids, np.int32), bytes_from_ends(ends, int(starts[-1]))


class ByteTokenizer:
  """Each byte is a token: vocab 256, lossless for any input."""
  name = "bytes"
  vocab_size = 256
  lossless = True

  def fingerprint(self) -> str:
    return hashlib.sha256(b"bytes").hexdigest()

  def encode(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 256); got min {ids.min()}, max {ids.max()}")
    return ids.astype(np.uint8).tobytes()

  def encode_with_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(data)
    return ids, np.ones(ids.size, np.int32)

  def token_bytes(self) -> np.ndarray:
    return np.ones(self.vocab_size, np.int64)


@dataclasses.dataclass
class SentencePieceTokenizer:
  """A sentencepiece model, loaded from ``model_path`` (a ``.model`` file). A model trained here
  (``SentencePieceTokenizer.train``) is lossless. One trained elsewhere without byte pieces (such as D3PM's LM1B
  model) is accepted as ``lossless = False``: text it has no pieces for becomes its unknown piece, bytes that are
  not UTF-8 are refused, and decoding is the model's own decode (an unknown piece shows as its " \u2047 "), so
  its ids do not give the original text's bytes: ``encode_with_bytes`` takes them from the model's offsets into
  the original text."""
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
      return np.asarray(self._sp.encode(self._utf8(data)), np.int32)
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

  def encode_with_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n], bytes [n])``: a lossless model's pieces are the text's own bytes (identity normalisation, no
    dummy prefix, byte pieces raw bytes), so each counts its length; another model's counts come from where each
    piece ends in the original text (``bytes_from_ends``), as its normaliser (NFKC), dummy prefix and unknown
    piece change the text its pieces spell."""
    if self.lossless:
      ids = self.encode(data)
      return ids, self.token_bytes()[ids].astype(np.int32)
    from sentencepiece import sentencepiece_pb2  # the serialised form: its API is the same in every 0.2 release
    serialized = self._sp.encode(self._utf8(data), out_type="serialized_proto")
    pieces = sentencepiece_pb2.SentencePieceText.FromString(serialized).pieces
    return (np.array([p.id for p in pieces], np.int32),
            bytes_from_ends([p.end for p in pieces], len(data)))  # offsets are bytes of the original input

  def _utf8(self, data: bytes) -> str:
    """``data`` as text for a model without byte pieces, which has no way to encode anything else."""
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"sentencepiece model {self.model_path!r} has no byte pieces, so it cannot encode bytes "
                       f"that are not UTF-8 ({e}); use a model trained with byte fallback") from e

  def token_bytes(self) -> np.ndarray:
    """int64 ``[V]``: the bytes each piece stands for, for a lossless model (whose pieces spell the text exactly);
    refused for another, whose pieces spell normalised text."""
    if not self.lossless:
      raise ValueError(f"sentencepiece model {self.model_path!r} has no byte pieces, so its pieces do not give the "
                       f"original text's bytes; count them at encoding (encode_with_bytes)")
    return np.array([len(p) for p in self._piece_bytes], np.int64)

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
  lossless = True

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

  def encode_with_bytes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(data)
    return ids, np.ones(ids.size, np.int32)  # every character is one ASCII byte

  def token_bytes(self) -> np.ndarray:
    return np.ones(self.vocab_size, np.int64)


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
  lossless = True

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

  def _counted(self, text: str, encoding) -> tuple[np.ndarray, np.ndarray]:
    """Each piece's own bytes (exact even for pieces of one character) where they add up to the text's; else
    (``<|endoftext|>`` written in the text, which the tokenizer matches as its special token, or a tokenizer file
    that adds a prefix space) from the offsets."""
    ids = np.asarray(encoding.ids, np.int32)
    counts = self.token_bytes()[ids]
    if counts.sum() == len(text.encode("utf-8")):
      return ids, counts.astype(np.int32)
    return super()._counted(text, encoding)

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
  lossless = False  # lower case, accents stripped, punctuation split off, [UNK]: the ids lose the original text

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
    self.cls_id, self.sep_id = self._tok.token_to_id("[CLS]"), self._tok.token_to_id("[SEP]")

  @property
  def files(self) -> list[str]:
    return [self.path]

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
