"""``d3pm-prepare --dataset=NAME --out=DIR [--source=PATH] [--seq_len=L]``: tokenise a corpus once into ArrayRecord
shards with ``DIR/metadata.json`` (the prepared format, ``d3pm_jax/data/prepared.py``), then train on it with
``--config.data.prepared_dir=DIR``.

  --dataset=stdlib                      this interpreter's standard library, bytes, rows of 128
  --dataset=text8 --source=text8.zip    27 characters, the standard 90M/5M/5M split, rows of 256
  --dataset=openwebtext --source=DIR[,FILES] --tokenizer_path=tokenizer.json
                                        jsonl / parquet / txt documents, GPT-2 BPE, EOS-joined rows of 1024,
                                        the last --validation_documents (100k) documents for validation

Nothing is downloaded: a missing source fails at once, naming the file to fetch and where to put it.
"""
from __future__ import annotations

from absl import app, flags, logging

from d3pm_jax import prepare

DATASETS = ("stdlib", "text8", "openwebtext")
_DATASET = flags.DEFINE_enum("dataset", None, list(DATASETS), "Which corpus to prepare.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the shards and metadata.json.")
_SOURCE = flags.DEFINE_list("source", None, "The corpus on disk (text8: the path of text8.zip; openwebtext: "
                            "directories, files or globs of jsonl / parquet / txt documents).")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", None, "openwebtext: GPT-2's tokenizer.json, or a directory "
                                      "with its vocab.json and merges.txt.")
_VALIDATION_DOCUMENTS = flags.DEFINE_integer("validation_documents", 100_000, "openwebtext: the last this many "
                                             "documents form the validation split.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Row length in tokens (0: the data set's published setup).")
flags.mark_flags_as_required(["dataset", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    if _DATASET.value == "stdlib":
      metadata = prepare.prepare_stdlib(_OUT.value, seq_len=_SEQ_LEN.value or 128)
    elif _DATASET.value == "text8":
      if not _SOURCE.value:
        raise ValueError("--dataset=text8 needs --source=/path/to/text8.zip (http://mattmahoney.net/dc/text8.zip)")
      metadata = prepare.prepare_text8(_SOURCE.value[0], _OUT.value, seq_len=_SEQ_LEN.value or 256)
    else:
      if not _SOURCE.value or not _TOKENIZER_PATH.value:
        raise ValueError("--dataset=openwebtext needs --source=DIR (its jsonl / parquet / txt files) and "
                         "--tokenizer_path=GPT-2's tokenizer.json")
      metadata = prepare.prepare_openwebtext(_SOURCE.value, _TOKENIZER_PATH.value, _OUT.value,
                                             seq_len=_SEQ_LEN.value or 1024,
                                             validation_documents=_VALIDATION_DOCUMENTS.value)
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
