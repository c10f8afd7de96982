"""The embedded default corpus: the running interpreter's standard library ``.py`` sources.

Present on every Python installation, real text nobody here wrote. The file list is sorted and deterministic;
site-packages, dist-packages and caches are excluded. A file belongs to validation when a hash of its relative
path falls under ``validation_permille``, so the split is stable across machines and never splits a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
SPLITS = ("train", "validation")


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def list_files(root: str | None = None) -> list[str]:
  """Sorted POSIX paths of every ``.py`` file under ``root`` (default: the stdlib), relative to it."""
  root = root or stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith(".py"):
        found.append(os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/"))
  return sorted(found)


def is_validation(rel_path: str, validation_permille: int) -> bool:
  digest = hashlib.sha256(rel_path.encode()).digest()
  return int.from_bytes(digest[:4], "big") % 1000 < validation_permille


def split_files(files: list[str], split: str, validation_permille: int = 20) -> list[str]:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLITS)}")
  want_validation = split == "validation"
  return [f for f in files if is_validation(f, validation_permille) == want_validation]


def read_files(files: list[str], root: str | None = None) -> list[bytes]:
  root = root or stdlib_root()
  out = []
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      out.append(f.read())
  return out


def read_corpus(validation_permille: int = 20, root: str | None = None) -> dict:
  """``{split: (files, contents)}`` for both splits."""
  files = list_files(root)
  out = {}
  for split in SPLITS:
    chosen = split_files(files, split, validation_permille)
    out[split] = (chosen, read_files(chosen, root))
  return out


def fingerprint(files: list[str], contents: list[bytes]) -> dict:
  """File count, total bytes and a SHA-256 over (path, content) pairs: identifies the exact corpus."""
  digest = hashlib.sha256()
  for rel, data in zip(files, contents):
    digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
  return {"files": len(files), "bytes": sum(len(c) for c in contents), "sha256": digest.hexdigest()}


def write_fingerprint(path: str, info: dict) -> None:
  with open(path, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
