"""Shared fixtures, and a guard that no test reaches the network.

The math tests run in float64 (``x64``) so that closed forms can be compared with dense references to ~1e-12; a
few tests run in the default float32 on purpose.

The guard: every socket ``connect`` in the test process to an address that is not this machine's loopback (or a
Unix socket), and every name look-up other than this machine's own names, raises at once, so a test that would download a data set fails in milliseconds instead of hanging
(``tfds.load('lm1b')`` offline retries for minutes). Subprocesses that tests start run our own commands on local
files; the guard covers the pytest process itself.
"""
import atexit
import ipaddress
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import zipfile

import jax
import numpy as np
import pytest

from d3pm_jax.runtime import targets

# Tests compile for TPU and GPU slices in-process (tests/test_compile.py and others), which needs the compilers'
# environment set before JAX starts a backend, as d3pm-compile sets it for itself; the processes tests start
# inherit it. tests/test_compile.py checks that a command without it still prints no traceback.
targets.prepare_environment()


class NetworkBlocked(RuntimeError):
  pass


def _is_local(address) -> bool:
  if isinstance(address, (str, bytes)):  # AF_UNIX path
    return True
  host = address[0]
  if host in ("localhost", ""):
    return True
  try:
    return ipaddress.ip_address(host.split("%")[0]).is_loopback
  except ValueError:  # a host name: only loopback names are allowed, and resolving others would itself be network
    return False


def _guarded(method):
  def connect(self, address, *args):
    if self.family != socket.AF_UNIX and not _is_local(address):
      raise NetworkBlocked(f"a test tried to reach {address!r}; tests must not use the network (tests/conftest.py)")
    return method(self, address, *args)
  return connect


_getaddrinfo = socket.getaddrinfo
_OWN_NAMES = {None, "", "localhost", socket.gethostname(), socket.getfqdn()}


def _guarded_getaddrinfo(host, *args, **kwargs):
  """Name look-ups are network traffic too (DNS): only this machine's own names and address literals resolve."""
  name = host.decode() if isinstance(host, bytes) else host
  if name not in _OWN_NAMES:
    try:
      ipaddress.ip_address(name.split("%")[0])
    except ValueError:
      raise NetworkBlocked(f"a test tried to look up {name!r}; tests must not use the network (tests/conftest.py)")
  return _getaddrinfo(host, *args, **kwargs)


def guarded_command(module: str, *args: str) -> list[str]:
  """A command line that runs ``python -m module args`` behind this guard, for tests of what a command does
  offline (run it from the repository root)."""
  code = (f"import runpy, sys; sys.path.insert(0, 'tests'); import conftest; "
          f"runpy.run_module({module!r}, run_name='__main__')")
  return [sys.executable, "-c", code, *args]


# One directory per test session, made by the first pytest process and inherited through the environment by the
# processes it starts (pytest-xdist's workers, the commands tests run), and removed by its maker at exit.
if "D3PM_TEST_SESSION_DIR" not in os.environ:
  os.environ["D3PM_TEST_SESSION_DIR"] = tempfile.mkdtemp(prefix="d3pm_test_session_")
  atexit.register(shutil.rmtree, os.environ["D3PM_TEST_SESSION_DIR"], ignore_errors=True)
_SESSION = os.environ["D3PM_TEST_SESSION_DIR"]

# The stdlib corpus is prepared on first use into a cache (d3pm_jax/data/pipeline.py): one fresh cache for the
# whole session, so tests neither read nor fill the user's (concurrent preparations are safe: each is renamed
# into place whole).
os.environ["D3PM_CACHE"] = os.path.join(_SESSION, "data")

# Compiled programs are shared by the whole session through JAX's persistent compilation cache: the many tests,
# workers and subprocesses that train the same tiny models compile each program once. Every program is written,
# however quick its compile: with a 0.5 s threshold the tests that start commands ran 30-40% longer (the commands
# recompiled the small programs they had found in the cache; measured in a run that also shared the CPU with a
# training at nice 19, which took about 15% of one core).
_COMPILED = os.path.join(_SESSION, "xla")
for _name, _value in (("jax_compilation_cache_dir", _COMPILED), ("jax_persistent_cache_min_compile_time_secs", 0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
  os.environ[_name.upper()] = str(_value)
  jax.config.update(_name, _value)

# The tests' programs are tiny: compiling them costs far more than running them, so XLA compiles them (here and in
# the commands the tests start, which inherit the flags) without LLVM's optimisation passes (measured 30% less time
# for test_model + test_sampler_knobs) and with the CPU backend's classic fusion code generation instead of its
# newer fusion emitters (which compile each small program about 45% slower: a compile benchmark of a tiny
# transformer's gradient and 120 eager ops, 28.1 s -> 14.7 s of CPU). Set before any JAX backend starts; a
# command's own flags are appended to them. XLA aborts on a flag it does not know, so the second one is added only
# where a JAX started with it runs (checked once per session, by the first pytest process; the rest inherit it).
def _xla_accepts(flags: str) -> bool:
  import subprocess
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
  return probe.returncode == 0


if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  if _xla_accepts(os.environ["XLA_FLAGS"] + " --xla_cpu_use_fusion_emitters=false"):
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
socket.getaddrinfo = _guarded_getaddrinfo


def pytest_collection_modifyitems(session, config, items):
  """Modules that hold a ``slow`` test run first, each module's tests kept together (so a module's fixtures are
  made once per worker): under pytest-xdist the longest tests then start early and the short ones fill the end,
  instead of a two-minute test starting last on one worker while the other idles."""
  has_slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in has_slow)  # stable: the order within each group stays


def train_tiny(path, config="test.py", *overrides):
  """``path`` after two d3pm-train steps of ``configs/CONFIG`` on the stdlib corpus (a subprocess)."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "d3pm_jax.cli.train", f"--config={os.path.join(root, 'configs', config)}",
         f"--workdir={path}", "--config.train.steps=2", "--config.train.eval_every=2", *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
  assert out.returncode == 0, out.stderr[-2000:]
  return path


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """The tests' masked-diffusion config after two steps, shared by the modules that sample or score it. A large
  learning rate takes the parameters far from their EMA (which stays near the initialisation)."""
  return train_tiny(tmp_path_factory.mktemp("trained"), "test.py", "--config.train.learning_rate=0.05")


@pytest.fixture(scope="session")
def tiny_ar_workdir(tmp_path_factory):
  """The tests' AR baseline after two steps (an evaluator for the workdir above)."""
  return train_tiny(tmp_path_factory.mktemp("trained_ar"), "test.py:autoregressive")


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------- fake corpora made here (tests never download)

@pytest.fixture(scope="module")
def text8_zip(tmp_path_factory):
  rng = np.random.default_rng(0)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  words = [rng.choice(letters, rng.integers(1, 9)).tobytes() for _ in range(1200)]
  text = b" ".join(words)[:5200]
  path = tmp_path_factory.mktemp("text8") / "text8.zip"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("text8", text)
  return str(path), text


OWT_WORDS = ("the model samples every masked position from its prediction while the schedule decides how many "
             "tokens stay hidden at each step of the reverse process").split()


@pytest.fixture(scope="module")
def owt(tmp_path_factory):
  """Twelve documents in a jsonl file, a parquet file and three txt files, and a byte-level BPE with GPT-2's EOS
  trained on them here, saved both as tokenizer.json and as vocab.json + merges.txt."""
  import pyarrow
  import pyarrow.parquet
  import tokenizers

  rng = np.random.default_rng(1)
  docs = [" ".join(rng.choice(OWT_WORDS, rng.integers(5, 40))) + ("\n" if i % 2 else "") for i in range(12)]
  root = tmp_path_factory.mktemp("owt")
  (root / "corpus").mkdir()
  with open(root / "corpus" / "a.jsonl", "w") as f:
    f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:5]))
  pyarrow.parquet.write_table(pyarrow.table({"text": docs[5:9]}), root / "corpus" / "b.parquet")
  for i, d in enumerate(docs[9:]):
    (root / "corpus" / f"c{i}.txt").write_text(d)
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(docs, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
  bpe.save(str(root / "tokenizer.json"))
  (root / "vocab").mkdir()
  bpe.save_model(str(root / "vocab"))
  return root, docs


LM1B_WORDS = ("The central bank said on Tuesday that prices rose by 3 percent , more than expected in a year "
              "when officials in London and New York had warned of slower growth ; shares fell \" sharply \" .").split()
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def lm1b_sentences(rng, n):
  return [" ".join(rng.choice(LM1B_WORDS, rng.integers(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def fake_lm1b(tmp_path_factory):
  """The benchmark's layout with 3 training files and 2 held-out files (and a decoy that tfds's patterns skip),
  extracted under ``extracted/`` and archived as ``archive/<the benchmark's .tar.gz>``, plus a BERT-style
  WordPiece vocab.txt trained on the sentences."""
  import tokenizers as hf

  from d3pm_jax.data import lm1b
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("lm1b")
  top = root / "extracted" / lm1b.TOP
  files = {"train": [f"training-monolingual.tokenized.shuffled/news.en-0000{i}-of-00100" for i in (2, 1, 3)],
           "validation": [f"heldout-monolingual.tokenized.shuffled/news.en.heldout-0000{i}-of-00050"
                          for i in (1, 0)]}
  lines = {}
  for split, names in files.items():
    for name in names:
      (top / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
      lines[name] = lm1b_sentences(rng, 40 if split == "train" else 15)
      # Real LM1B lines end with a newline, some with trailing blanks that tfds strips.
      (top / name).write_text("".join(s + (" \n" if i % 3 == 0 else "\n") for i, s in enumerate(lines[name])))
  (top / "heldout-monolingual.tokenized.shuffled" / "README").write_text("not a sentence file\n")
  (root / "archive").mkdir()
  with tarfile.open(root / "archive" / lm1b.ARCHIVE, "w:gz") as tar:
    tar.add(top, arcname=lm1b.TOP)
  expected = {split: [s for name in sorted(names) for s in lines[name]] for split, names in files.items()}
  wordpiece = hf.BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator(expected["train"], vocab_size=120, special_tokens=WORDPIECE_SPECIALS)
  (root / "vocab").mkdir()
  wordpiece.save_model(str(root / "vocab"))
  return root, expected, str(root / "vocab" / "vocab.txt")
