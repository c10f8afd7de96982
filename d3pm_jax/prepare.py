"""Preparing a corpus once into the prepared format (``data/prepared.py``): ``d3pm-prepare`` is the command line
over these functions. Each returns the metadata it wrote to ``out/metadata.json``.

  stdlib   the embedded corpus (this interpreter's standard library), bytes, rows of ``seq_len`` (stream packing),
           split by a hash of each file's path exactly as ``d3pm-train`` splits it without preparation.
  text8    a local ``text8.zip``: 27 characters, the standard 90M/5M/5M split, rows of 256 (stream packing).
"""
from __future__ import annotations

import hashlib

from d3pm_jax.data import prepared, stdlib, text8, tokenizers


def tokenizer_fingerprint(tokenizer) -> dict:
  """What a config's tokenizer must match: its kind, vocabulary size and a SHA-256 of its definition (the model
  file for sentencepiece)."""
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    kind, definition = "bytes", b"bytes"
  elif isinstance(tokenizer, text8.Text8Tokenizer):
    kind, definition = "text8", tokenizer.fingerprint().encode()
  elif isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    kind = "sentencepiece"
    with open(tokenizer.model_path, "rb") as f:
      definition = f.read()
  else:
    raise ValueError(f"no fingerprint for tokenizer {type(tokenizer).__name__}")
  return {"kind": kind, "vocab_size": int(tokenizer.vocab_size), "sha256": hashlib.sha256(definition).hexdigest()}


def _write(out: str, dataset: str, seq_len: int, packing: str, tokenizer, splits: dict, source: dict,
           separator=None) -> dict:
  infos = {split: prepared.prepare_split(out, split, documents, seq_len, packing, separator)
           for split, documents in splits.items()}
  metadata = {"dataset": dataset, "seq_len": seq_len, "packing": packing, "separator": separator,
              "tokenizer": tokenizer_fingerprint(tokenizer), "splits": infos, "source": source}
  prepared.write_metadata(out, metadata)
  return metadata


def prepare_stdlib(out: str, seq_len: int = 128, validation_permille: int = 20, root: str | None = None) -> dict:
  """The stdlib corpus as bytes: every file a document, concatenated without separators (as ``d3pm-train`` packs
  it), so the prepared rows equal the unprepared windows."""
  files = stdlib.list_files(root)
  tok = tokenizers.ByteTokenizer()
  splits, source = {}, {"root": root or stdlib.stdlib_root(), "validation_permille": validation_permille}
  for split in stdlib.SPLITS:
    chosen = stdlib.split_files(files, split, validation_permille)
    contents = stdlib.read_files(chosen, root)
    source[split] = stdlib.fingerprint(chosen, contents)
    splits[split] = (tok.encode(c) for c in contents)
  return _write(out, "stdlib", seq_len, "stream", tok, splits, source)


def prepare_text8(zip_path: str, out: str, seq_len: int = 256, split_chars: dict | None = None) -> dict:
  """text8 from ``zip_path``: each split one document, cut into rows of ``seq_len`` characters."""
  texts = text8.read_splits(zip_path, split_chars)
  tok = text8.Text8Tokenizer()
  source = {"zip": zip_path, "split_chars": split_chars or text8.SPLIT_CHARS,
            "sha256": {split: hashlib.sha256(t).hexdigest() for split, t in texts.items()}}
  return _write(out, "text8", seq_len, "stream", tok, {s: [tok.encode(t)] for s, t in texts.items()}, source)
