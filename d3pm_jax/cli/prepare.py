"""``d3pm-prepare --dataset=NAME --out=DIR [--source=PATH] [--seq_len=L]``: tokenise a corpus once into ArrayRecord
shards with ``DIR/metadata.json`` (the prepared format, ``d3pm_jax/data/prepared.py``), then train on it with
``--config.data.prepared_dir=DIR``.

  --dataset=stdlib                      this interpreter's standard library, bytes, rows of 128
  --dataset=text8 --source=text8.zip    27 characters, the standard 90M/5M/5M split, rows of 256
  --dataset=openwebtext [--source=DIR[,FILES] | --source=hf://NAME] --tokenizer_path=tokenizer.json
                                        jsonl / parquet / txt documents (default: the hub's
                                        Skylion007/openwebtext when online), GPT-2 BPE, EOS-joined rows of
                                        1024, the last --validation_documents (100k) documents for validation;
                                        --validation=chunks: a random --validation_permille (20) of the rows
                                        (MD4's split)
  --dataset=lm1b --setup=d3pm [--manual_dir=DIR] [--packing=stream|packed]
                                        D3PM's setup: cased sentencepiece 8k trained on the training split,
                                        each sentence <s> ... </s>, the stream cut into rows of 128 (attention
                                        crosses sentences; with packed, segment ids keep them apart)
  --dataset=lm1b --setup=mdlm --tokenizer_path=vocab.txt [--manual_dir=DIR] [--packing=truncated|padded|stream|wrapped]
                                        MDLM's setup: bert-base-uncased WordPiece, a sentence per row padded
                                        to 128 and truncated (padded: wrapped onto further rows; stream: the
                                        sentences' stream wrapped)

LM1B is read from --manual_dir (the benchmark's .tar.gz, or its extracted directory), else from an array_record
lm1b that tensorflow-datasets prepared in --tfds_data_dir, else tfds downloads and prepares it (needs TensorFlow:
pip install -e '.[lm1b]'). text8 is downloaded to --source (default DIR/text8.zip) when missing, and OpenWebText
read from the Hugging Face hub without --source (pip install -e '.[openwebtext]'), when online. Offline, a missing
corpus fails within seconds, naming the file to fetch and where to put it.
"""
from __future__ import annotations

from absl import app, flags, logging

from d3pm_jax.cli import common
from d3pm_jax.data import openwebtext, prepare

DATASETS = ("stdlib", "text8", "openwebtext", "lm1b")
_DATASET = flags.DEFINE_enum("dataset", None, list(DATASETS), "Which corpus to prepare.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the shards and metadata.json.")
_SOURCE = flags.DEFINE_list("source", None, "The corpus (text8: the path of text8.zip; openwebtext: hf://NAME or "
                            "directories, files or globs of jsonl / parquet / txt documents).")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", None, "openwebtext: GPT-2's tokenizer.json, or a directory "
                                      "with its vocab.json and merges.txt; lm1b mdlm: BERT's vocab.txt; lm1b d3pm: "
                                      "an existing sentencepiece .model instead of training one.")
_SETUP = flags.DEFINE_enum("setup", None, list(prepare.LM1B_SETUPS), "lm1b: which published setup.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "lm1b: a directory holding the benchmark's .tar.gz or its "
                                  "extracted directory.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "lm1b: tensorflow-datasets' data dir (default "
                                     "~/tensorflow_datasets).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "lm1b d3pm: sentencepiece pieces to train (default 8192).")
_PACKING = flags.DEFINE_enum("packing", None, ["truncated", "padded", "stream", "packed", "wrapped"], "lm1b mdlm: a "
                             "sentence per row, truncated (default) or wrapped onto further rows (padded), the "
                             "stream cut into rows (stream), or BD3-LM's rows of [CLS] ... [SEP] cut from the stream "
                             "(wrapped); lm1b d3pm: cut the stream into rows (stream, default: D3PM's) or give "
                             "each sentence of a row its segment id (packed).")
_VALIDATION_DOCUMENTS = flags.DEFINE_integer("validation_documents", 100_000, "openwebtext: the last this many "
                                             "documents form the validation split.")
_VALIDATION = flags.DEFINE_enum("validation", "documents", list(prepare.OWT_VALIDATION), "openwebtext: hold out "
                                "the last --validation_documents documents (MDLM, SEDD) or a random "
                                "--validation_permille of the rows (MD4).")
_VALIDATION_PERMILLE = flags.DEFINE_integer("validation_permille", 20, "openwebtext --validation=chunks: the "
                                            "rows held out, per thousand (MD4: 20).")
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
      metadata = prepare.prepare_text8(_SOURCE.value[0] if _SOURCE.value else None, _OUT.value,
                                       seq_len=_SEQ_LEN.value or 256)
    elif _DATASET.value == "lm1b":
      if not _SETUP.value:
        raise ValueError(f"--dataset=lm1b needs --setup, one of {sorted(prepare.LM1B_SETUPS)}")
      metadata = prepare.prepare_lm1b(_OUT.value, _SETUP.value, manual_dir=_MANUAL_DIR.value,
                                      tfds_data_dir=_TFDS_DATA_DIR.value, tokenizer_path=_TOKENIZER_PATH.value,
                                      vocab_size=_VOCAB_SIZE.value, seq_len=_SEQ_LEN.value or 128,
                                      packing=_PACKING.value)
    else:
      if not _TOKENIZER_PATH.value:
        raise ValueError("--dataset=openwebtext needs --tokenizer_path=GPT-2's tokenizer.json (or a directory with "
                         "its vocab.json and merges.txt)")
      metadata = prepare.prepare_openwebtext(_SOURCE.value or [openwebtext.DEFAULT_HUB], _TOKENIZER_PATH.value,
                                             _OUT.value,
                                             seq_len=_SEQ_LEN.value or 1024,
                                             validation_documents=_VALIDATION_DOCUMENTS.value,
                                             validation=_VALIDATION.value,
                                             validation_permille=_VALIDATION_PERMILLE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for split, info in metadata["splits"].items():
    print(f"{split}: {info['rows']:,} rows of {metadata['seq_len']} tokens ({info['tokens']:,} tokens, "
          f"{info['documents']:,} documents, {len(info['shards'])} shards)")
  print(f"prepared {metadata['dataset']} into {_OUT.value}; train with --config.data.prepared_dir={_OUT.value}")


def run():
  common.run(main, "d3pm-prepare")


if __name__ == "__main__":
  run()
