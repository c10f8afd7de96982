"""OpenWebText from local files, tokenised with GPT-2's byte-level BPE from local tokenizer files (MD4, MDLM and
SEDD's setup: documents joined with EOS, cut into rows of 1024, the last 100k documents held out for validation).

Documents are read from ``.jsonl`` (one JSON object per line with a ``"text"`` field), ``.parquet`` (a ``text``
column; needs pyarrow) or ``.txt`` (a whole file is one document) files, in sorted path order, so the split is
the same on every machine; or, when huggingface.co answers, from a Hugging Face hub data set (``hf://NAME``,
``Skylion007/openwebtext`` by default) in its own order, through the ``datasets`` package. The tokenizer is ``tokenizer.json`` (Hugging Face ``tokenizers``) or a directory holding
GPT-2's ``vocab.json`` and ``merges.txt``; both need the ``tokenizers`` package (the ``openwebtext`` extra).
"""
from __future__ import annotations

import glob
import json
import os

from d3pm_jax.data import fetch, tokenizers

EXTENSIONS = (".jsonl", ".parquet", ".txt")
HUB = "hf://"
DEFAULT_HUB = "hf://Skylion007/openwebtext"


def _need(module: str):
  return tokenizers.need_package(module, "preparing OpenWebText", "openwebtext")


def hub_documents(source: str):
  """``(count, texts)`` of the hub data set ``source`` (``hf://NAME``, its ``train`` split, ``text`` column).
  Offline it fails within seconds saying what to download instead (``HF_DATASETS_OFFLINE=1`` skips the check and
  reads the local Hugging Face cache)."""
  name = source[len(HUB):]
  if os.environ.get("HF_DATASETS_OFFLINE") != "1" and not fetch.reachable("https://huggingface.co"):
    raise ValueError(f"huggingface.co cannot be reached to read {name!r}: on a machine with network access download "
                     f"its parquet files (https://huggingface.co/datasets/{name}) into a directory DIR, copy DIR "
                     f"here and pass --source=DIR")
  datasets = _need("datasets")
  table = datasets.load_dataset(name, split="train")
  if "text" not in table.column_names:
    raise ValueError(f"hub data set {name!r} has no 'text' column; it has {table.column_names}")
  return len(table), (row["text"] for row in table)


def list_files(sources) -> list[str]:
  """The document files named by ``sources`` (files, directories or glob patterns), sorted; refuses a source
  that matches nothing and files of another kind, naming them."""
  files = []
  for source in sources:
    if os.path.isdir(source):
      matched = [os.path.join(d, f) for d, _, names in os.walk(source) for f in names if f.endswith(EXTENSIONS)]
    else:
      matched = glob.glob(source)
    if not matched:
      raise ValueError(f"OpenWebText source {source!r} holds no {'/'.join(EXTENSIONS)} files; download the corpus "
                       f"on a machine with network access (e.g. the Hugging Face 'Skylion007/openwebtext' parquet "
                       f"files) and pass their directory with --source")
    bad = [f for f in matched if not f.endswith(EXTENSIONS)]
    if bad:
      raise ValueError(f"unsupported OpenWebText files {bad[:3]}; valid extensions: {list(EXTENSIONS)}")
    files += matched
  return sorted(set(files))


def iter_documents(files):
  """Every document's text (str) of ``files``, in order."""
  for path in files:
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if "text" not in record:
              raise ValueError(f"{path}:{number} has no 'text' field; it has {sorted(record)}")
            yield record["text"]
    elif path.endswith(".parquet"):
      table = _need("pyarrow.parquet").read_table(path, columns=["text"])
      yield from table.column("text").to_pylist()
    else:
      with open(path, encoding="utf-8") as f:
        yield f.read()


def count_documents(files) -> int:
  """How many documents ``iter_documents`` yields, without decoding them: parquet row counts come from the file
  metadata, jsonl documents are its non-blank lines, a txt file is one document."""
  count = 0
  for path in files:
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        count += sum(1 for line in f if line.strip())
    elif path.endswith(".parquet"):
      count += _need("pyarrow.parquet").ParquetFile(path).metadata.num_rows
    else:
      count += 1
  return count
