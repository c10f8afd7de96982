"""The grain pipeline each process reads its own shard from.

``build_data(config, workdir)`` returns the tokenizer, the training ``grain.MapDataset`` of batches (shuffled,
sharded by JAX process, indexable so the iterator position is one integer that checkpoints save), and the
validation windows with their token weights and the bytes of original text each stands for. Every corpus is read
from the prepared format (``prepared.py``): text8, OpenWebText and LM1B from a ``d3pm-prepare`` directory, the
stdlib corpus from one prepared on first use into the cache (``cache_root``); only the synthetic Markov source is
sampled in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid

import grain
import jax
import numpy as np

from d3pm_jax.config import DataConfig
from d3pm_jax.data import prepared, stdlib, tokenizers
from d3pm_jax.data.synthetic import MarkovSource
from d3pm_jax.runtime import multihost

# Epochs of the training stream: far more than any run takes.
_EPOCHS = 10_000


def pack(token_arrays, seq_len: int):
  """Concatenates token arrays and cuts windows of ``seq_len``; the last window is zero-padded.

  Returns ``(windows_NxL int32, weights_NxL float32)`` where weights are 1 on real tokens and 0 on padding, so
  ``windows[weights > 0]`` is exactly the concatenated stream.
  """
  stream = np.concatenate([np.asarray(a, np.int32) for a in token_arrays]) if token_arrays else np.zeros(0, np.int32)
  num_windows = -(-stream.size // seq_len)
  windows = np.zeros((num_windows, seq_len), np.int32)
  weights = np.zeros((num_windows, seq_len), np.float32)
  windows.reshape(-1)[: stream.size] = stream
  weights.reshape(-1)[: stream.size] = 1.0
  return windows, weights


def byte_features() -> np.ndarray:
  """A hand-built embedding of the 256 bytes for the nearest-neighbour process: the code point (spacing 1) and
  character-class flags (weight 2), so a byte's neighbours are nearby code points of its own class first, while
  the graph stays connected across class boundaries."""
  feats = np.zeros((256, 6))
  for b in range(256):
    c = chr(b)
    flags = [c.isdigit(), c.islower(), c.isupper(), c.isspace(), (not c.isalnum()) and c.isprintable()]
    feats[b] = [b] + [2.0 * f for f in flags]
  return feats


@dataclasses.dataclass
class Data:
  tokenizer: object
  train_batches: grain.MapDataset   # element i: this process's i-th batch, int32 [B_local, L] (or [B_local, 2, L]:
  val_windows: np.ndarray           # [N, L]                               tokens and segment ids, packed rows)
  val_weights: np.ndarray           # [N, L]
  info: dict
  val_segments: np.ndarray | None = None   # [N, L] segment ids of packed rows (0: padding); None: one text per row
  val_documents: np.ndarray | None = None  # [N] the document of each window's first token (intervals cluster by it)
  val_words: np.ndarray | None = None      # [N] words ending in each window (LM1B); None: the data defines no words
  val_bytes: np.ndarray | None = None      # [N] bytes of original UTF-8 text each window's real tokens stand for
  #                                          (``row_bytes``); None: no text (markov) or none recorded for this text


def train_batches(windows_NxL: np.ndarray, batch_size: int, seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """This process's share of the training stream: element i is its rows (``process_rows``) of global batch i, so
  the processes read disjoint rows and the global batch assembled from them is the same for any number of
  processes. Only the rows a process uses are ever read."""
  rows = process_rows(batch_size, process_index, process_count)
  per = rows.stop - rows.start
  # shuffle-then-repeat draws a fresh permutation for every epoch.
  stream = grain.MapDataset.source(windows_NxL).shuffle(seed=seed).repeat(_EPOCHS)
  mine = grain.MapDataset.range(len(stream) // batch_size * per).map(
      lambda k: stream[(k // per) * batch_size + rows.start + k % per])
  return mine.batch(per, drop_remainder=True)


class RandomCrops:
  """Training windows cropped at uniformly random offsets of a stream-packed split (MD4's text8 pipeline), instead
  of its fixed rows: every offset ``[0, tokens - L]`` of the split's token stream is reachable, so a long run
  does not see the same few windows again and again. Crop g of the training stream (its position in it, the same
  for any number of processes) starts at an offset drawn from a generator seeded by ``(seed, g)``: deterministic
  given the seed, and random access, so a resumed run reads exactly the crops it would have read."""

  def __init__(self, rows, tokens: int, seq_len: int, seed: int):
    if tokens < seq_len:
      raise ValueError(f"random crops of {seq_len} tokens need a split of at least that many; it has {tokens}")
    self.rows, self.tokens, self.seq_len, self.seed = rows, tokens, seq_len, seed

  def offset(self, g: int) -> int:
    return int(np.random.default_rng([self.seed, int(g)]).integers(0, self.tokens - self.seq_len + 1))

  def __getitem__(self, g: int) -> np.ndarray:
    start = self.offset(g)
    row, at = divmod(start, self.seq_len)
    window = self.rows[row]
    if at:
      window = np.concatenate([window[at:], self.rows[row + 1][:at]])
    return np.asarray(window, np.int32)


def crop_batches(crops: RandomCrops, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """This process's rows (``process_rows``) of each global batch of ``crops``: element i holds crops
  ``i * batch_size + rows``."""
  rows = process_rows(batch_size, process_index, process_count)
  per = rows.stop - rows.start
  count = _EPOCHS * max(crops.tokens // crops.seq_len // batch_size, 1)
  mine = grain.MapDataset.range(count * per).map(lambda k: crops[(k // per) * batch_size + rows.start + k % per])
  return mine.batch(per, drop_remainder=True)


def process_rows(batch_size: int, process_index: int | None = None, process_count: int | None = None) -> slice:
  """Rows ``[p b, (p + 1) b)`` of a global batch, ``b = batch_size / P``: what process p of P (default: this
  process of the running job) supplies."""
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise ValueError(f"train.batch_size={batch_size} must divide evenly over {count} processes")
  per = batch_size // count
  return slice(p * per, (p + 1) * per)


def spread_rows(total: int, num: int) -> np.ndarray:
  """``num`` row indices spread evenly over ``[0, total)`` (all of them when ``num`` is 0 or >= total), so an
  evaluation subset covers the whole split rather than its first files."""
  if num <= 0 or num >= total:
    return np.arange(total)
  return np.linspace(0, total - 1, num).round().astype(int)


def cache_root() -> str:
  """Where derived data is kept between runs: ``$D3PM_CACHE``, else ``~/.cache/d3pm_jax``."""
  return os.environ.get("D3PM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "d3pm_jax")


def _stdlib(config: DataConfig, workdir: str | None) -> str:
  """The stdlib corpus through the prepared format, like every other data set: prepared once per machine into
  the cache, under a key of the corpus's contents, the row length, the split and the tokenizer (a sentencepiece
  model is trained into ``workdir`` first, by one process). Each process makes sure its own cache has it; the
  directory appears whole or not at all (prepared aside, then renamed), so concurrent processes cannot see a
  partial one."""
  corpus = stdlib.read_corpus(config.validation_permille)
  if config.tokenizer == "sentencepiece" and not config.tokenizer_path:
    if workdir is None:
      raise ValueError("training a sentencepiece tokenizer needs a workdir (or set data.tokenizer_path)")
    prefix = os.path.join(workdir, "stdlib_spm")
    if not os.path.exists(prefix + ".model") and multihost.is_leader():  # one process trains, the rest wait
      os.makedirs(workdir, exist_ok=True)  # a fresh --workdir does not exist yet
      tokenizers.SentencePieceTokenizer.train(corpus["train"][1], prefix, config.spm_vocab_size)
    multihost.sync("sentencepiece tokenizer trained")
  tok = tokenizer_of(config, workdir)
  key = {"format": prepared.FORMAT_VERSION, "seq_len": config.seq_len, "tokenizer": tok.fingerprint(),
         "validation_permille": config.validation_permille,
         "corpus": {split: stdlib.fingerprint(*files_contents) for split, files_contents in corpus.items()}}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  out = os.path.join(cache_root(), f"stdlib-{digest}")
  if not os.path.exists(os.path.join(out, prepared.METADATA)):
    from d3pm_jax.data import prepare  # the preparation code; reading never needs it
    aside = f"{out}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prepare.prepare_stdlib(aside, config.seq_len, config.validation_permille, tokenizer=tok, corpus=corpus)
    try:
      os.rename(aside, out)
    except OSError:  # another process finished first: its copy is the same
      shutil.rmtree(aside, ignore_errors=True)
  return out


class PreparedRows:
  """A prepared split's first ``length`` rows as a random-access source for grain: the tokens ``[L]``, or with
  ``segments`` the whole row ``[2, L]`` (tokens, segment ids)."""

  def __init__(self, split: prepared.PreparedSplit, length: int, segments: bool):
    self.split, self.length, self.segments = split, length, segments

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index):
    row = self.split[int(index)]
    return row if self.segments else row[0]


def check_prepared(metadata: dict, config: DataConfig, where: str) -> None:
  """Refuses prepared shards made for another data set, window length or tokenizer than ``config``'s."""
  want = {"dataset": config.name, "seq_len": config.seq_len, "tokenizer": config.tokenizer}
  have = {"dataset": metadata["dataset"], "seq_len": metadata["seq_len"], "tokenizer": metadata["tokenizer"]["kind"]}
  if config.name == "stdlib":  # the split is a hash of each path against this threshold
    want["validation_permille"] = config.validation_permille
    have["validation_permille"] = metadata["source"].get("validation_permille")
  if config.tokenizer_path:
    want["tokenizer_sha256"] = tokenizers.make_tokenizer(config.tokenizer, config.tokenizer_path).fingerprint()
    have["tokenizer_sha256"] = metadata["tokenizer"]["sha256"]
  diffs = [f"{k}: shards {have[k]!r} vs config {want[k]!r}" for k in want if have[k] != want[k]]
  if diffs:
    raise ValueError(f"the prepared shards in {where} do not match the config ({'; '.join(diffs)}); prepare the "
                     f"data again with the config's settings or point data.prepared_dir elsewhere")


def tokenizer_of(config: DataConfig, workdir: str | None = None):
  """The tokenizer a run with ``config`` reads its data with: prepared shards' own (``data.tokenizer_path``, or
  else the copy d3pm-prepare keeps in the prepared directory, checked against the shards' fingerprint), the
  sentencepiece model trained into ``workdir`` for the stdlib corpus, or the one the config names. ``None`` for
  the synthetic Markov source."""
  if config.name == "markov":
    return None
  if config.prepared_dir:
    recorded = prepared.load_metadata(config.prepared_dir)["tokenizer"]
    path = config.tokenizer_path or (os.path.join(config.prepared_dir, recorded["path"]) if recorded.get("path")
                                     else None)
    tok = tokenizers.make_tokenizer(recorded["kind"], path)
    if tok.fingerprint() != recorded["sha256"]:
      raise ValueError(f"the tokenizer at {path} is not the one {config.prepared_dir} was prepared with (SHA-256 "
                       f"{tok.fingerprint()[:12]}... vs {recorded['sha256'][:12]}...); prepare the data again")
    return tok
  if config.tokenizer == "sentencepiece" and not config.tokenizer_path and workdir is not None:
    return tokenizers.SentencePieceTokenizer(os.path.join(workdir, "stdlib_spm.model"))
  return tokenizers.make_tokenizer(config.tokenizer, config.tokenizer_path)


def row_bytes(split: prepared.PreparedSplit, rows_Nx2xL: np.ndarray, tokenizer) -> np.ndarray | None:
  """int64 ``[N]``: the bytes of original text the real tokens of each of ``split``'s rows (all of them, read
  into ``rows_Nx2xL``) stand for: as recorded when the split was prepared, or, for shards prepared before that,
  counted from the ids where they give the text exactly (a ``lossless`` tokenizer's ``token_bytes``). None where
  neither can: such WordPiece or sentencepiece-without-byte-pieces shards must be prepared again."""
  recorded = split.row_bytes()
  if recorded is not None:
    if recorded.shape != (rows_Nx2xL.shape[0],):
      raise ValueError(f"the split's byte counts cover {recorded.size} rows but it has {rows_Nx2xL.shape[0]}; "
                       f"prepare it again")
    return recorded
  if not getattr(tokenizer, "lossless", False):
    return None
  table = tokenizer.token_bytes()
  return np.where(rows_Nx2xL[:, 1] > 0, table[rows_Nx2xL[:, 0]], 0).sum(axis=1).astype(np.int64)


def _prepared(config: DataConfig, batch_size: int, seed: int, eval_split: str = "validation") -> Data:
  """Training and validation rows from ``config.prepared_dir``: training streams from the shards through grain,
  validation is read into memory. ``stream`` and ``wrapped`` rows are plain token windows (the padded last
  training row dropped); ``packed`` and ``padded`` rows carry their segment ids to the model and the loss. With
  ``ignore_bos`` the validation rows' first tokens weigh 0."""
  metadata = prepared.load_metadata(config.prepared_dir)
  check_prepared(metadata, config, config.prepared_dir)
  segmented = metadata["packing"] not in prepared.UNSEGMENTED
  train = prepared.PreparedSplit(config.prepared_dir, "train")
  usable = len(train)
  if not segmented and usable and train[usable - 1][1].min() == 0:
    usable -= 1
  if config.random_crops:
    if segmented:
      raise ValueError(f"data.random_crops crops windows out of one token stream; {config.prepared_dir} is "
                       f"{metadata['packing']!r}-packed (rows of separate documents): prepare it with stream packing "
                       f"or set data.random_crops=False")
    # Every row, the padded last one too: crops reach the stream's last token and never its padding.
    batches = crop_batches(RandomCrops(PreparedRows(train, len(train), False),
                                       int(metadata["splits"]["train"]["tokens"]), config.seq_len, seed), batch_size)
  else:
    batches = train_batches(PreparedRows(train, usable, segmented), batch_size, seed)
  val_split = prepared.PreparedSplit(config.prepared_dir, eval_split)
  val = val_split.read_all()
  tok = tokenizer_of(config)
  info = {"prepared_dir": config.prepared_dir, "packing": metadata["packing"], "splits": metadata["splits"],
          "source": metadata["source"], "train_windows": usable, "validation_windows": int(val.shape[0])}
  val_weights = (val[:, 1] > 0).astype(np.float32)
  if config.ignore_bos:  # each row's first token is given, not scored: it counts no token (and [CLS] no byte)
    val_weights[:, 0] = 0.0
  return Data(tokenizer=tok, train_batches=batches,
              val_windows=val[:, 0], val_weights=val_weights, info=info,
              val_segments=val[:, 1] if segmented else None, val_documents=val_split.documents(),
              val_words=val_split.words(), val_bytes=row_bytes(val_split, val, tok))


def build_data(config: DataConfig, batch_size: int, seed: int, workdir: str | None = None,
               eval_split: str = "validation") -> Data:
  """Loads the data set named by ``config`` (from ``config.prepared_dir`` when set); ``batch_size`` is global and
  split evenly over JAX processes. ``val_windows`` hold ``eval_split``: a prepared data set may have others than
  ``validation`` (text8's ``test``)."""
  process_rows(batch_size)  # fails before any loading if the batch does not split over the processes
  if config.name == "stdlib" and not config.prepared_dir:
    config = dataclasses.replace(config, prepared_dir=_stdlib(config, workdir))
  if config.prepared_dir:
    return _prepared(config, batch_size, seed, eval_split)
  if eval_split != "validation":
    raise ValueError(f"split {eval_split!r}: the synthetic 'markov' source has only 'validation'")
  # markov: a synthetic source with known entropy, for tests and calibration, sampled in memory
  source = MarkovSource.random(seed, config.markov_states, concentration=1.0)
  key_train, key_val = jax.random.split(jax.random.PRNGKey(seed))
  encoded = {"train": list(np.asarray(source.sample(key_train, config.markov_windows, config.seq_len))),
             "validation": list(np.asarray(source.sample(key_val, 64, config.seq_len)))}
  tok = None
  info = {"markov_states": config.markov_states,
          "entropy_bits_per_token": source.entropy(config.seq_len) / config.seq_len / np.log(2)}
  train_windows, train_weights = pack(encoded["train"], config.seq_len)
  train_windows = train_windows[train_weights.min(axis=1) > 0]  # training drops the one padded window
  val_windows, val_weights = pack(encoded["validation"], config.seq_len)
  info.update(train_windows=int(train_windows.shape[0]), validation_windows=int(val_windows.shape[0]))
  # Every validation window is an independent sample of the source: each its own document.
  return Data(tokenizer=tok, train_batches=train_batches(train_windows, batch_size, seed),
              val_windows=val_windows, val_weights=val_weights, info=info,
              val_documents=np.arange(val_windows.shape[0]))


def train_unigram(config: DataConfig, workdir: str | None = None) -> np.ndarray:
  """How often each token occurs in the training split ``[max token + 1]`` (the mutual-information schedule's
  unigram distribution), from its prepared shards (the stdlib corpus prepared into the cache first)."""
  if config.name == "markov":
    raise ValueError("the synthetic 'markov' source has no prepared training split to count unigrams in")
  if config.name == "stdlib" and not config.prepared_dir:
    config = dataclasses.replace(config, prepared_dir=_stdlib(config, workdir))
  return prepared.PreparedSplit(config.prepared_dir, "train").unigram()


def vocab_size_of(data: Data, config: DataConfig) -> int:
  return config.markov_states if data.tokenizer is None else data.tokenizer.vocab_size
