"""Preparing a corpus once into the prepared format (``data/prepared.py``): ``d3pm-prepare`` is the command line
over these functions. Each returns the metadata it wrote to ``out/metadata.json``.

  stdlib   the embedded corpus (this interpreter's standard library), bytes, rows of ``seq_len`` (stream packing),
           split by a hash of each file's path exactly as ``d3pm-train`` splits it without preparation.
  text8    a local ``text8.zip``: 27 characters, the standard 90M/5M/5M split, rows of 256 (stream packing).
  openwebtext  local jsonl / parquet / txt files with GPT-2's BPE from local tokenizer files: documents joined
           with EOS, rows of 1024 (stream packing), the last 100k documents for validation (MD4, MDLM, SEDD).
  lm1b     LM1B's sentences in D3PM's setup (sentencepiece 8k trained here, each sentence ``<s> ... </s>``, the
           stream cut into rows of 128 with attention across sentences) or MDLM's (BERT's uncased WordPiece, a
           sentence per padded row of 128, truncated). Both record each sentence's words (plus one for its end) for
           per-word perplexity.

A file-defined tokenizer is kept in ``out/tokenizer/``, so the prepared directory alone defines the data. Every
document is tokenised with ``encode_with_bytes``, so each row records the bytes of original text it stands for
(bits per byte's denominator; separators and sentence delimiters count 0).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil

import numpy as np

from d3pm_jax.data import fetch, lm1b, openwebtext, prepared, stdlib, text8, tokenizers


TOKENIZER_DIR = "tokenizer"


def tokenizer_fingerprint(tokenizer) -> dict:
  """What a config's tokenizer must match: its kind, vocabulary size and a SHA-256 of its definition."""
  return {"kind": tokenizer.name, "vocab_size": int(tokenizer.vocab_size), "sha256": tokenizer.fingerprint()}


def _keep_tokenizer(out: str, tokenizer) -> str | None:
  """Copies a file-defined tokenizer into ``out/tokenizer/`` (so the prepared directory is self-contained and a
  config needs no ``data.tokenizer_path``); returns the path to load it from, relative to ``out``."""
  files = getattr(tokenizer, "files", None)
  if not files:
    return None
  os.makedirs(os.path.join(out, TOKENIZER_DIR), exist_ok=True)
  for path in files:
    target = os.path.join(out, TOKENIZER_DIR, os.path.basename(path))
    if os.path.abspath(path) != os.path.abspath(target):
      shutil.copyfile(path, target)
  return TOKENIZER_DIR if len(files) > 1 else os.path.join(TOKENIZER_DIR, os.path.basename(files[0]))


def _write(out: str, dataset: str, seq_len: int, packing: str, tokenizer, splits: dict, source: dict,
           separator=None, wrap=None) -> dict:
  infos = {split: prepared.prepare_split(out, split, documents, seq_len, packing, separator, wrap=wrap)
           for split, documents in splits.items()}
  return _write_metadata(out, dataset, seq_len, packing, tokenizer, infos, source, separator)


def _write_metadata(out: str, dataset: str, seq_len: int, packing: str, tokenizer, infos: dict, source: dict,
                    separator=None) -> dict:
  metadata = {"dataset": dataset, "seq_len": seq_len, "packing": packing, "separator": separator,
              "tokenizer": {**tokenizer_fingerprint(tokenizer), "path": _keep_tokenizer(out, tokenizer)},
              "splits": infos, "source": source}
  prepared.write_metadata(out, metadata)
  return metadata


def prepare_stdlib(out: str, seq_len: int = 128, validation_permille: int = 20, root: str | None = None,
                   tokenizer=None, corpus: dict | None = None) -> dict:
  """The stdlib corpus: every file a document, concatenated without separators and cut into rows of
  ``seq_len`` (what ``d3pm-train`` reads for it), in bytes or with ``tokenizer``. ``corpus`` (``{split: (files,
  contents)}``, as ``stdlib.read_corpus`` returns) saves reading the files again."""
  tok = tokenizer or tokenizers.ByteTokenizer()
  corpus = corpus or stdlib.read_corpus(validation_permille, root)
  splits, source = {}, {"root": root or stdlib.stdlib_root(), "validation_permille": validation_permille}
  for split, (chosen, contents) in corpus.items():
    source[split] = stdlib.fingerprint(chosen, contents)
    splits[split] = (prepared.Document(*tok.encode_with_bytes(c)) for c in contents)
  return _write(out, "stdlib", seq_len, "stream", tok, splits, source)


def prepare_text8(zip_path: str | None, out: str, seq_len: int = 256, split_chars: dict | None = None) -> dict:
  """text8 from ``zip_path``: each split one document, cut into rows of ``seq_len`` characters. A missing file
  (default ``out/text8.zip``) is downloaded from text8's URL when it answers."""
  zip_path = zip_path or os.path.join(out, "text8.zip")
  if not os.path.exists(zip_path) and fetch.reachable(text8.URL):
    fetch.download(text8.URL, zip_path)
  texts = text8.read_splits(zip_path, split_chars)
  tok = tokenizers.Text8Tokenizer()
  source = {"zip": zip_path, "split_chars": split_chars or text8.SPLIT_CHARS,
            "sha256": {split: hashlib.sha256(t).hexdigest() for split, t in texts.items()}}
  return _write(out, "text8", seq_len, "stream", tok,
                {s: [prepared.Document(*tok.encode_with_bytes(t))] for s, t in texts.items()}, source)


OWT_VALIDATION = ("documents", "chunks")


def prepare_openwebtext(sources, tokenizer_path: str, out: str, seq_len: int = 1024,
                        validation_documents: int = 100_000, chunk: int = 1000, validation: str = "documents",
                        validation_permille: int = 20, seed: int = 0) -> dict:
  """OpenWebText from the files under ``sources`` (read in sorted order), or from one hub data set
  ``hf://NAME``: each document followed by GPT-2's EOS, the stream cut into rows of ``seq_len``. ``validation``:
  ``documents`` holds out the last ``validation_documents`` documents (MDLM, SEDD); ``chunks`` a random
  ``validation_permille`` of the rows, chosen by ``seed`` (MD4: 2% of the 1024-token chunks)."""
  if validation not in OWT_VALIDATION:
    raise ValueError(f"unknown OpenWebText validation split {validation!r}; valid: {list(OWT_VALIDATION)}")
  tok = tokenizers.Gpt2Tokenizer(tokenizer_path)
  if len(sources) == 1 and sources[0].startswith(openwebtext.HUB):
    total, texts = openwebtext.hub_documents(sources[0])
    where = {"hub": sources[0][len(openwebtext.HUB):]}
  else:
    files = openwebtext.list_files(sources)
    total, texts = openwebtext.count_documents(files), openwebtext.iter_documents(files)
    where = {"files": [os.path.abspath(f) for f in files]}
  if validation == "documents" and not 0 < validation_documents < total:
    raise ValueError(f"validation_documents must lie in (0, {total}) for these {total} documents; got "
                     f"{validation_documents}")

  def encoded(count):  # the next `count` documents of the one pass, tokenised in batches
    remaining = count
    while remaining:
      batch = list(itertools.islice(texts, min(chunk, remaining)))
      remaining -= len(batch)
      yield from (prepared.Document(ids, counts) for ids, counts in tok.encode_batch_with_bytes(batch))

  if validation == "chunks":
    source = {**where, "documents": total, "validation": "chunks", "validation_permille": validation_permille,
              "seed": seed, "tokenizer_path": os.path.abspath(tokenizer_path)}
    infos = prepared.prepare_chunk_splits(out, encoded(total), seq_len, tok.eos_id, validation_permille, seed)
    return _write_metadata(out, "openwebtext", seq_len, "stream", tok, infos, source, separator=tok.eos_id)
  source = {**where, "documents": total, "validation": "documents",
            "validation_documents": validation_documents, "tokenizer_path": os.path.abspath(tokenizer_path)}
  # Both generators read the one pass over the files, lazily: train is written (consumed) before validation starts.
  splits = {"train": encoded(total - validation_documents), "validation": encoded(validation_documents)}
  return _write(out, "openwebtext", seq_len, "stream", tok, splits, source, separator=tok.eos_id)


LM1B_SETUPS = {
    # D3PM (Austin et al. 2021; its reference code's lm1b pipeline): cased sentencepiece with 8192 pieces trained
    # on the training split, each sentence wrapped in <s> ... </s>, the sentences batched into rows of 128 with no
    # segment ids, so attention crosses sentences ('stream'); 'packed' keeps them apart with segment ids.
    "d3pm": {"tokenizer": "sentencepiece", "packing": "stream", "vocab_size": 8192},
    # MDLM (Sahoo et al. 2024): bert-base-uncased WordPiece, each sentence [CLS] ... [SEP] in its own row padded
    # to 128, a longer one truncated ('truncated', MDLM's wrap=False); 'padded' wraps it onto the next row instead,
    # and 'stream' gives MDLM's wrapped variant. 'wrapped' is BD3-LM's (its lm1b-wrap): the stream of the sentences'
    # "pieces [SEP]" cut into rows of 126, each row [CLS] ... [SEP] (with data.ignore_bos, [CLS] is not scored).
    "mdlm": {"tokenizer": "wordpiece", "packing": "truncated"},
}


def prepare_lm1b(out: str, setup: str, manual_dir: str | None = None, tfds_data_dir: str | None = None,
                 tokenizer_path: str | None = None, vocab_size: int | None = None, seq_len: int = 128,
                 packing: str | None = None, spm_sentences: int = 2_000_000) -> dict:
  """LM1B (``data/lm1b.py`` says where the sentences come from) in one of the published setups
  (``LM1B_SETUPS``). ``d3pm``: trains the sentencepiece model on the training split into ``out/tokenizer/``
  unless ``tokenizer_path`` names one (``vocab_size`` pieces, 8192 by default; at most ``spm_sentences``
  sentences sampled for training). ``mdlm``: ``tokenizer_path`` is BERT's ``vocab.txt``. The validation split
  is LM1B's held-out set (tfds's ``test``). Each sentence's words, for per-word perplexity, are its
  whitespace-separated words plus one for its end (D3PM's unit: the end-of-sentence is scored)."""
  if setup not in LM1B_SETUPS:
    raise ValueError(f"unknown LM1B setup {setup!r}; valid: {sorted(LM1B_SETUPS)}")
  recipe = LM1B_SETUPS[setup]
  packing = packing or recipe["packing"]
  if setup == "mdlm" and packing not in ("truncated", "padded", "stream", "wrapped"):
    raise ValueError(f"the MDLM setup puts a sentence in a row of its own or wraps the stream: packing must be "
                     f"'truncated', 'padded', 'stream' or 'wrapped' (BD3-LM's rows); got {packing!r}")
  if setup == "d3pm" and packing not in ("stream", "packed"):
    raise ValueError(f"the D3PM setup cuts the sentence stream into rows: packing must be 'stream' (D3PM's: "
                     f"attention crosses sentences) or 'packed' (segment ids keep them apart); got {packing!r}")
  if setup == "mdlm" and not tokenizer_path:
    raise ValueError("the MDLM LM1B setup needs --tokenizer_path=bert-base-uncased's vocab.txt (download it from "
                     "https://huggingface.co/bert-base-uncased on a machine with network access)")
  if setup == "d3pm" and not tokenizer_path and vocab_size is not None and vocab_size < 300:
    raise ValueError(f"a sentencepiece vocabulary of {vocab_size} cannot hold the 256 byte pieces it needs; use "
                     f"at least 300 (D3PM: 8192)")
  splits, source = lm1b.open_splits(manual_dir, tfds_data_dir)
  if setup == "mdlm":
    tok = tokenizers.WordPieceTokenizer(tokenizer_path)
  elif tokenizer_path:
    tok = tokenizers.SentencePieceTokenizer(tokenizer_path)
    if tok.bos_id is None or tok.eos_id is None:
      raise ValueError(f"the D3PM setup wraps each sentence in <s> ... </s>, but the sentencepiece model "
                       f"{tokenizer_path} defines no sentence-start or -end piece (bos_id {tok.bos_id}, eos_id "
                       f"{tok.eos_id}); train one with them, or leave --tokenizer_path out to train it here")
  else:
    os.makedirs(os.path.join(out, TOKENIZER_DIR), exist_ok=True)
    prefix = os.path.join(out, TOKENIZER_DIR, "lm1b_spm")
    sentences = (line.encode("utf-8") for line in splits["train"]())
    tok = tokenizers.SentencePieceTokenizer.train(sentences, prefix, vocab_size or recipe["vocab_size"],
                                                  max_sentences=spm_sentences, delimiters=True)

  def document(ids, counts, sentence: str) -> prepared.Document:
    """D3PM's setup wraps the sentence in <s> ... </s>, which stand for no text (0 bytes each)."""
    if setup == "d3pm":
      ids, counts = np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32), np.pad(counts, 1)
    if packing == "wrapped":  # "pieces [SEP]": the row's own [CLS] starts it (counts[0], [CLS]'s, is 0 bytes)
      ids, counts = ids[1:], np.concatenate([counts[1:2] + counts[0], counts[2:]])
    return prepared.Document(ids, counts, len(sentence.split()) + 1)

  def encoded(lines, chunk=4096):
    batch = []
    for line in itertools.chain(lines(), [None]):
      if line is not None:
        batch.append(line)
      if len(batch) == chunk or (line is None and batch):
        counted = (tok.encode_batch_with_bytes(batch) if hasattr(tok, "encode_batch_with_bytes")
                   else [tok.encode_with_bytes(s.encode()) for s in batch])
        yield from (document(ids, counts, s) for (ids, counts), s in zip(counted, batch))
        batch = []

  source = {**source, "setup": setup}
  wrap = (tok.cls_id, tok.sep_id) if packing == "wrapped" else None
  return _write(out, "lm1b", seq_len, packing, tok, {s: encoded(lines) for s, lines in splits.items()}, source,
                wrap=wrap)
