"""LM1B (the One Billion Word benchmark): about 30M training sentences and the 306,688 held-out sentences that
tensorflow-datasets calls ``test`` and every diffusion paper reports on (our ``validation`` split).

Where the sentences come from, in this order:

  1. ``manual_dir`` holding the benchmark's archive ``1-billion-word-language-modeling-benchmark-r13output.tar.gz``
     (tfds's own manual-download convention) or its extracted directory: read here in plain Python, the same
     files and lines (stripped) that tfds's ``lm1b`` builder reads. No TensorFlow needed.
  2. ``tfds_data_dir`` (tfds's default ``~/tensorflow_datasets`` when unset) holding ``lm1b`` prepared by tfds in
     the ``array_record`` format: read through ``tfds.data_source``, without TensorFlow.
  3. Neither: when www.statmt.org answers, tfds downloads and prepares it (``download_and_prepare`` needs
     TensorFlow: the ``lm1b`` extra); offline, it fails within seconds naming the file to fetch and where to put it.

Two published tokenisations (``prepare.prepare_lm1b``): D3PM's cased sentencepiece 8k trained on the training
split with sentences packed into 128 tokens, and MDLM's ``bert-base-uncased`` WordPiece with each sentence
(``[CLS] ... [SEP]``) padded, or wrapped, to 128 tokens.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import tarfile
from typing import Callable, Iterator

from d3pm_jax.data import fetch, tokenizers

URL = "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
ARCHIVE = os.path.basename(URL)
TOP = "1-billion-word-language-modeling-benchmark-r13output"
# The files tfds's lm1b builder reads, relative to TOP: ours are its `train` and `test` splits.
PATTERNS = {"train": "training-monolingual.tokenized.shuffled/news.en-*",
            "validation": "heldout-monolingual.tokenized.shuffled/news.en.heldout-*"}
TFDS_SPLITS = {"train": "train", "validation": "test"}


def _offline_message(manual_dir: str | None, data_dir: str | None) -> str:
  where = manual_dir or "DIR"
  return (f"LM1B is not on disk (no {ARCHIVE} or {TOP}/ in --manual_dir={manual_dir!r}, no array_record lm1b in "
          f"tfds data dir {data_dir or '~/tensorflow_datasets'!r}) and {URL.split('/')[2]} cannot be reached. On a "
          f"machine with network access download {URL} (1.8 GB), copy it to {where}/{ARCHIVE} (or extract it there: "
          f"tar xzf {ARCHIVE} -C {where}) and pass --manual_dir={where}")


# ---------------------------------------------------------------- 1. the archive or its extracted directory

def _raw_root(manual_dir: str) -> str | None:
  for root in (os.path.join(manual_dir, TOP), manual_dir):
    if all(glob.glob(os.path.join(root, p)) for p in PATTERNS.values()):
      return root
  return None


def _raw_split(manual_dir: str, split: str) -> tuple[Callable[[], Iterator[str]], list[str]]:
  """A function that yields ``split``'s stripped lines afresh on every call, and the files it reads, in order:
  sorted names from an extracted directory, the archive's own order from the ``.tar.gz`` (streamed, never
  extracted to disk)."""
  root = _raw_root(manual_dir)
  if root is not None:
    files = sorted(glob.glob(os.path.join(root, PATTERNS[split])))

    def lines():
      for path in files:
        with open(path, encoding="utf-8") as f:
          yield from (line.strip() for line in f)
    return lines, files

  archive = os.path.join(manual_dir, ARCHIVE)
  pattern = os.path.join(TOP, PATTERNS[split])
  with tarfile.open(archive, "r:gz") as tar:
    members = [m.name for m in tar if m.isfile() and fnmatch.fnmatch(m.name, pattern)]
  if not members:
    raise ValueError(f"{archive} holds no {pattern} files: is it the LM1B archive {URL}?")

  def lines():
    with tarfile.open(archive, "r|gz") as tar:  # a stream: one pass over the 1.8 GB, in the archive's order
      for member in tar:
        if member.isfile() and fnmatch.fnmatch(member.name, pattern):
          with tar.extractfile(member) as f:
            yield from (line.decode("utf-8").strip() for line in f)
  return lines, members


# ---------------------------------------------------------------- 2./3. tensorflow-datasets

def _tfds_split(source) -> Callable[[], Iterator[str]]:
  def lines():
    for example in source:  # tfds's own order
      text = example["text"]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
  return lines


def _tfds_splits(data_dir: str | None, manual_dir: str | None) -> dict:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    tfds = None
  builder = tfds.builder("lm1b", data_dir=data_dir) if tfds is not None else None
  if builder is None or not builder.is_prepared():
    if not fetch.reachable(URL):  # offline: say what to download, within seconds
      raise ValueError(_offline_message(manual_dir, data_dir))
    if builder is None:
      tokenizers.need_package("tensorflow_datasets", "downloading and preparing LM1B with tensorflow-datasets",
                              "lm1b")
    try:
      builder.download_and_prepare(file_format="array_record",
                                   download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except ImportError as e:
      raise ValueError(f"tensorflow-datasets needs TensorFlow to build LM1B ({e}): pip install -e '.[lm1b]', or "
                       f"download {URL} yourself and pass its directory with --manual_dir") from e
  try:
    return {split: builder.as_data_source(split=tfds_split) for split, tfds_split in TFDS_SPLITS.items()}
  except NotImplementedError as e:
    raise ValueError(f"lm1b in {builder.data_dir} was prepared in another file format than array_record, which "
                     f"tfds cannot read without TensorFlow; prepare it again with file_format='array_record' into "
                     f"another --tfds_data_dir, or pass the raw archive with --manual_dir") from e


def open_splits(manual_dir: str | None = None, tfds_data_dir: str | None = None) -> tuple[dict, dict]:
  """``({split: lines}, source)``: for ``train`` and ``validation``, a function yielding the split's sentences
  (``str``) afresh on every call, and a description of where they came from for the metadata."""
  if manual_dir:
    if not os.path.isdir(manual_dir):
      raise ValueError(f"--manual_dir={manual_dir!r} is not a directory. {_offline_message(manual_dir, None)}")
    if _raw_root(manual_dir) is not None or os.path.exists(os.path.join(manual_dir, ARCHIVE)):
      splits, files = {}, {}
      for split in PATTERNS:
        splits[split], files[split] = _raw_split(manual_dir, split)
      return splits, {"manual_dir": os.path.abspath(manual_dir), "files": files}
  sources = _tfds_splits(tfds_data_dir, manual_dir)
  return ({split: _tfds_split(s) for split, s in sources.items()},
          {"tfds_data_dir": tfds_data_dir, "tfds_splits": TFDS_SPLITS,
           "tfds_examples": {split: len(s) for split, s in sources.items()}})
