"""Tokenizers that round-trip bytes exactly: raw bytes (256 symbols) and a locally trained sentencepiece model.

Both map ``bytes -> np.ndarray[int32]`` and back. The corpus is handled as bytes, so a file that is not valid
UTF-8 still round-trips.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np

from d3pm_jax import _checks

TOKENIZERS = ("bytes", "sentencepiece")


class ByteTokenizer:
  """Each byte is a token: vocab 256, lossless for any input."""
  vocab_size = 256

  def encode(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 256); got min {ids.min()}, max {ids.max()}")
    return ids.astype(np.uint8).tobytes()


@dataclasses.dataclass
class SentencePieceTokenizer:
  """A sentencepiece model, loaded from ``model_path`` (a ``.model`` file)."""
  model_path: str

  def __post_init__(self):
    import sentencepiece as spm  # optional dependency: the `data` extra
    if not os.path.exists(self.model_path):
      raise ValueError(f"sentencepiece model {self.model_path!r} does not exist; train one with "
                       "SentencePieceTokenizer.train(...) or pass an existing .model path")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, data: bytes) -> np.ndarray:
    return np.asarray(self._sp.encode(data.decode("utf-8", errors="surrogateescape")), np.int32)

  def decode(self, ids) -> bytes:
    return self._sp.decode([int(i) for i in np.asarray(ids)]).encode("utf-8", errors="surrogateescape")

  @classmethod
  def train(cls, texts: Iterable[bytes], model_prefix: str, vocab_size: int = 8192,
            model_type: str = "unigram", max_sentences: int = 2_000_000) -> "SentencePieceTokenizer":
    """Trains a lossless model: identity normalisation, whitespace kept as is, byte fallback for anything unseen.

    ``texts`` are documents; each line becomes a training sentence (sentencepiece learns within lines, and
    newlines are encoded through byte fallback).
    """
    import sentencepiece as spm
    _checks.check_choice("sentencepiece model_type", model_type, ("unigram", "bpe"))
    lines = (line for text in texts for line in text.decode("utf-8", errors="replace").splitlines() if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        split_by_whitespace=False, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2)
    return cls(model_prefix + ".model")


def make_tokenizer(name: str, model_path: str | None = None):
  _checks.check_choice("tokenizer", name, TOKENIZERS)
  if name == "bytes":
    return ByteTokenizer()
  if not model_path:
    raise ValueError("tokenizer 'sentencepiece' needs data.tokenizer_path (a .model file)")
  return SentencePieceTokenizer(model_path)
