"""Preparing a corpus once into the prepared format (``data/prepared.py``): ``d3pm-prepare`` is the command line
over these functions. Each returns the metadata it wrote to ``out/metadata.json``.

  stdlib   the embedded corpus (this interpreter's standard library), bytes, rows of ``seq_len`` (stream packing),
           split by a hash of each file's path exactly as ``d3pm-train`` splits it without preparation.
  text8    a local ``text8.zip``: 27 characters, the standard 90M/5M/5M split, rows of 256 (stream packing).
  openwebtext  local jsonl / parquet / txt files with GPT-2's BPE from local tokenizer files: documents joined
           with EOS, rows of 1024 (stream packing), the last 100k documents for validation (MD4, MDLM, SEDD).
"""
from __future__ import annotations

import hashlib
import itertools
import os

from d3pm_jax.data import openwebtext, prepared, stdlib, text8, tokenizers


def tokenizer_fingerprint(tokenizer) -> dict:
  """What a config's tokenizer must match: its kind, vocabulary size and a SHA-256 of its definition."""
  return {"kind": tokenizer.name, "vocab_size": int(tokenizer.vocab_size), "sha256": tokenizer.fingerprint()}


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


def prepare_openwebtext(sources, tokenizer_path: str, out: str, seq_len: int = 1024,
                        validation_documents: int = 100_000, chunk: int = 1000) -> dict:
  """OpenWebText from the files under ``sources`` (read in sorted order): each document followed by GPT-2's EOS,
  the stream cut into rows of ``seq_len``; the last ``validation_documents`` documents are the validation split."""
  files = openwebtext.list_files(sources)
  tok = openwebtext.Gpt2Tokenizer(tokenizer_path)
  total = openwebtext.count_documents(files)
  if not 0 < validation_documents < total:
    raise ValueError(f"validation_documents must lie in (0, {total}) for these {total} documents; got "
                     f"{validation_documents}")
  texts = openwebtext.iter_documents(files)

  def encoded(count):  # the next `count` documents of the one pass, tokenised in batches
    remaining = count
    while remaining:
      batch = list(itertools.islice(texts, min(chunk, remaining)))
      remaining -= len(batch)
      yield from tok.encode_batch(batch)

  source = {"files": [os.path.abspath(f) for f in files], "documents": total,
            "validation_documents": validation_documents, "tokenizer_path": os.path.abspath(tokenizer_path)}
  # Both generators read the one pass over the files, lazily: train is written (consumed) before validation starts.
  splits = {"train": encoded(total - validation_documents), "validation": encoded(validation_documents)}
  return _write(out, "openwebtext", seq_len, "stream", tok, splits, source, separator=tok.eos_id)
