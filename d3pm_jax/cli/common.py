"""How every ``d3pm-*`` command answers bad input: one paragraph on stderr that names the value, why it is wrong and
what would be valid, and exit status 2 — never a traceback.

``run(main)`` replaces ``absl.app.run(main)``. Anything that goes wrong while parsing the flags (an unknown flag or
config key, a wrong type, a config file that does not load) and the errors the library raises for bad values
(``ValueError``, ``app.UsageError``) or for paths (missing, not a directory, not writable) are usage errors: exit 2.
A full disk is reported the same way with status 1 (the input was fine; the checkpoints already on disk stay
usable). Any other exception is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading

import ml_collections
from absl import app, flags

EXIT_USAGE = 2
EXIT_FAILURE = 1
USAGE_ERRORS = (ValueError, app.UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, flags.Error)


_PROG = ["d3pm"]
_HELP_FLAGS = ("--help", "-help", "--helpshort", "--helpfull", "--helpxml", "-?")


def _prog() -> str:
  return _PROG[0]


def fail(message: str, status: int = EXIT_USAGE, hard: bool = False):
  """Prints ``PROG: error: message`` as one paragraph and exits with ``status``; ``hard`` skips the interpreter's
  shutdown (where a failed background write's leftover futures would log their tracebacks after the message)."""
  text = " ".join(str(message).split())
  hint = f" (see {_prog()} --help)" if status == EXIT_USAGE else ""
  sys.stderr.write(f"{_prog()}: error: {text}{hint}\n")
  sys.stderr.flush()
  if hard or _hard_exit():
    sys.stdout.flush()
    os._exit(status)
  sys.exit(status)


def _hard_exit() -> bool:
  # With jax.distributed running, a normal interpreter exit would wait on the other processes at shutdown.
  try:
    import jax
    return jax.process_count() > 1
  except Exception:  # noqa: BLE001 - no backend: a plain exit
    return False


def _describe(error: BaseException) -> str:
  """The message of the outermost error in ``error``'s chain whose text is not a formatted traceback
  (config_flags wraps a config file's own error in two layers of those)."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  error = next((e for e in chain if "Traceback (most recent call last)" not in str(e)), chain[-1])
  if isinstance(error, OSError) and error.filename is not None:
    return f"{error.strerror or error}: {error.filename}"
  message = str(error)
  if isinstance(error, KeyError):  # str(KeyError) is the repr of the key alone
    message = f"no such key {message}"
  return message or type(error).__name__


def unknown_key(argv, schema) -> str | None:
  """For the first ``--config.a.b=value`` of ``argv`` that names no key of ``schema`` (a ConfigDict of every
  key), what is wrong and the keys valid at that level."""
  for arg in argv[1:]:
    match = re.match(r"--config\.([\w.]+)=", arg)
    node, path = schema, []
    for part in (match.group(1).split(".") if match else ()):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"--config.{'.'.join(path)} is a value, not a section; {arg!r} goes one level too deep"
      if part not in node:
        where = "config." + ".".join(path) if path else "the top level of the config"
        return f"{arg!r}: there is no key {part!r} in {where}; valid: {sorted(node.keys())}"
      node = node[part]
      path.append(part)
  return None


def disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or one it was raised from) is a write that found no space."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      return True
    text = str(error)
    if "No space left on device" in text or "File too large" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def flags_parser(schema=None):
  """absl's flag parsing, with any failure reported as a usage error: unknown flags, wrong types, and a config file
  that does not load (config_flags defers that error to the first read of the flag, so every flag is read here).
  ``schema()``, when given, is the ConfigDict of every config key, for naming the valid ones."""
  def parse(argv):
    try:
      rest = flags.FLAGS(argv)
      for name in flags.FLAGS:
        hasattr(flags.FLAGS[name].value, "to_dict")  # a config file that failed to load raises here
      return rest
    except SystemExit as e:  # absl's --help exits 1 after printing the help asked for: that is a success
      if e.code == 1 and any(arg.split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
        raise SystemExit(0) from None
      raise
    except Exception as e:  # noqa: BLE001 - whatever the flags or the config file did wrong, it is the input's
      fail((schema is not None and unknown_key(argv, schema())) or _describe(e))
  return parse


def guarded(main):
  def wrapped(argv):
    for handler in logging.getLogger().handlers:  # absl's handler, installed by app.run; every logger reaches it
      handler.addFilter(_NoLibraryTracebacks())
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else re-raised with its traceback
      if disk_full(e):
        fail(f"out of disk space ({_describe(e)}); the checkpoints already complete on disk stay usable: free "
             f"space and run the same command to resume", EXIT_FAILURE, hard=True)
      if isinstance(e, USAGE_ERRORS):
        fail(_describe(e))
      raise
  return wrapped


class _NoLibraryTracebacks(logging.Filter):
  """Orbax logs the failure of a background write (e.g. a full disk) with its traceback, and asyncio may log the
  same error again for a future nobody read, while the train loop reports it once; these records keep their
  one-line message. On a machine without a GPU driver, JAX logs the CUDA plugin's failed start (``cuInit``) with a
  traceback whenever the plugin is installed (d3pm-compile's extra): that record becomes one line saying so."""

  def filter(self, record):
    if record.exc_info and ("orbax" in record.pathname or record.name == "asyncio"):
      record.msg = f"{record.msg} (traceback omitted: reported below)"
      record.exc_info = record.exc_text = None
    elif record.exc_info and record.name == "jax._src.xla_bridge" and "cuInit" in str(record.exc_info[1]):
      record.msg, record.args = ("the CUDA plugin is installed but no GPU driver answered (cuInit failed); running "
                                 "on the other backends"), ()
      record.exc_info = record.exc_text = None
    return True


def _closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_closed_loops(hook):
  """asyncio callbacks that tensorstore delivers after orbax closed a failed operation's event loop raise where
  nobody catches them; the failure itself is reported once, by the train loop."""
  def quiet(args):
    if not _closed_loop(args.exc_value):
      hook(args)
  return quiet


def show_command_help(main) -> None:
  """Makes ``--help`` describe the command whose ``main`` this is: absl prints ``__main__``'s docstring and the key
  flags of the module named ``sys.argv[0]``, which for a console script (``d3pm-train``) is the generated wrapper,
  with no docstring and no flags. The command module's docstring and key flags (its own, and those it adopts)
  are given to that name."""
  name = getattr(main, "__module__", "__main__")
  module = sys.modules.get(name)
  if module is None or name == "__main__":  # python -m d3pm_jax.cli.train: absl finds them itself
    return
  sys.modules["__main__"].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main, prog: str, schema=None) -> None:
  """``app.run(main)`` with bad input answered as usage errors naming ``prog`` (the command, also when run as
  ``python -m``), and ``--help`` naming the command's purpose and flags; ``schema`` as for ``flags_parser``."""
  _PROG[0] = prog
  show_command_help(main)
  threading.excepthook = _quiet_closed_loops(threading.excepthook)
  sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
  app.run(guarded(main), flags_parser=flags_parser(schema))
