"""``d3pm-prepare --dataset=NAME --out=DIR [--source=PATH] [--seq_len=L]``: tokenise a corpus once into ArrayRecord
shards with ``DIR/metadata.json`` (the prepared format, ``d3pm_jax/data/prepared.py``), then train on it with
``--config.data.prepared_dir=DIR``.

  --dataset=stdlib                      this interpreter's standard library, bytes, rows of 128
  --dataset=text8 --source=text8.zip    27 characters, the standard 90M/5M/5M split, rows of 256

Nothing is downloaded: a missing source fails at once, naming the file to fetch and where to put it.
"""
from __future__ import annotations

from absl import app, flags, logging

from d3pm_jax import prepare

DATASETS = ("stdlib", "text8")
_DATASET = flags.DEFINE_enum("dataset", None, list(DATASETS), "Which corpus to prepare.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the shards and metadata.json.")
_SOURCE = flags.DEFINE_string("source", None, "The corpus on disk (text8: the path of text8.zip).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Row length in tokens (0: the data set's published setup).")
flags.mark_flags_as_required(["dataset", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    if _DATASET.value == "stdlib":
      metadata = prepare.prepare_stdlib(_OUT.value, seq_len=_SEQ_LEN.value or 128)
    else:
      if not _SOURCE.value:
        raise ValueError("--dataset=text8 needs --source=/path/to/text8.zip (http://mattmahoney.net/dc/text8.zip)")
      metadata = prepare.prepare_text8(_SOURCE.value, _OUT.value, seq_len=_SEQ_LEN.value or 256)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for split, info in metadata["splits"].items():
    print(f"{split}: {info['rows']:,} rows of {metadata['seq_len']} tokens ({info['tokens']:,} tokens, "
          f"{info['documents']:,} documents, {len(info['shards'])} shards)")
  print(f"prepared {metadata['dataset']} into {_OUT.value}; train with --config.data.prepared_dir={_OUT.value}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
