"""text8: the first 10^8 characters of a cleaned English Wikipedia dump (lower-case a-z and space), from a local
``text8.zip``. The standard split (D3PM, MD4): the first 90M characters train, the next 5M validation, the last
5M test. 27 tokens: a-z are 0-25 and space is 26.
"""
from __future__ import annotations

import os
import zipfile

SPLIT_CHARS = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
URL = "http://mattmahoney.net/dc/text8.zip"


def read_splits(zip_path: str, split_chars: dict | None = None) -> dict:
  """``{split: bytes}`` from ``text8.zip`` (its one member, ``text8``). ``split_chars`` (default: the standard
  90M/5M/5M) maps each split to its [start, end) characters; the file must be long enough for them."""
  if not os.path.exists(zip_path):
    raise ValueError(f"text8 not found at {zip_path}: download {URL} on a machine with network access and pass "
                     f"its path (--source=/path/to/text8.zip)")
  with zipfile.ZipFile(zip_path) as archive:
    names = archive.namelist()
    if "text8" not in names:
      raise ValueError(f"{zip_path} should hold one file named 'text8'; it holds {names}")
    text = archive.read("text8")
  split_chars = split_chars or SPLIT_CHARS
  need = max(end for _, end in split_chars.values())
  if len(text) < need:
    raise ValueError(f"{zip_path}: text8 has {len(text):,} characters; the splits {split_chars} need {need:,}")
  return {split: text[start:end] for split, (start, end) in split_chars.items()}
