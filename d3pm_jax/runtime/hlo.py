"""The collectives of a compiled program, read from its optimised HLO text (``compiled.as_text()``).

A step's communication is what its collectives move, and the compiler decides it (it combines, splits and moves
them), so it is read from what the compiler produced rather than predicted from the sharding rules. The text is
XLA's, for TPU and GPU alike: a collective is an instruction whose opcode is one of ``KINDS``, either plain
(``all-reduce(...)``, also inside a fusion, as XLA:TPU fuses all-gathers with their matmuls) or an async pair
(``all-reduce-start`` / ``all-reduce-done``, counted once, with the ``-done``'s result). A collective that XLA:GPU
wraps in an ``async-start`` of its own computation is the plain instruction inside that computation.

Each instruction counts once as written: a collective inside a ``while`` body (a ``lax.scan``, such as gradient
accumulation's loop over micro-batches) runs once per iteration but appears once in the text; ``in_loop`` says
which ones do.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start|-done)?\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_LOOP = re.compile(r"\b(?:body|condition)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction. ``shapes`` are its result's arrays (one each for a combined, tuple-shaped
  collective) and ``bytes`` their size on one device; ``dtype`` is their element type, or the types joined by '+'
  when a combined collective mixes them. ``in_loop``: it sits in a ``while`` body (or a computation one calls), so it
  runs once per iteration."""
  kind: str
  dtype: str
  bytes: int
  name: str
  in_loop: bool
  shapes: tuple[str, ...]


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``(element type, dims)`` of each array in an HLO type (``bf16[2,64]{1,0:T(8,128)}`` or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _BYTES or dtype.startswith(("f8", "s4", "u4")):
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
  bits = 4 if dtype in ("s4", "u4") else 8 * _BYTES.get(dtype, 1)
  return math.ceil(math.prod(dims) * bits / 8)


def _split_computations(hlo_text: str) -> dict[str, list[str]]:
  """Each computation's instruction lines, by name. A computation ends at a line that is a lone ``}`` followed by a
  blank line (or the end): an instruction's metadata may hold JSON whose lines start with braces (splash
  attention's does), and those belong to the computation they are in."""
  computations, current = {}, None
  lines = hlo_text.splitlines()
  for i, line in enumerate(lines):
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = computations.setdefault(header.group(1), [])
    elif line.rstrip() == "}" and (i + 1 == len(lines) or not lines[i + 1].strip()):
      current = None
    elif current is not None:
      current.append(line)
  return computations


def _looped(computations: dict[str, list[str]]) -> set[str]:
  """The computations a ``while`` runs per iteration: its bodies and conditions and all they call."""
  calls = {}
  roots = set()
  for name, lines in computations.items():
    called = set()
    for line in lines:
      called.update(_CALLED.findall(line))
      for group in _CALLED_LISTS.findall(line):
        called.update(c.strip().lstrip("%") for c in group.split(",") if c.strip())
      if " while(" in line:
        roots.update(_LOOP.findall(line))
    calls[name] = called
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(calls.get(name, ()))
  return seen


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimised HLO module's text, in the order written; an async pair counts once, as its
  ``-done`` (whose result is the collective's) named after its ``-start``."""
  computations = _split_computations(hlo_text)
  looped = _looped(computations)
  found = []
  for computation, lines in computations.items():
    for line in lines:
      match = _COLLECTIVE.match(line)
      if match is None:
        continue
      name, type_text, kind, phase, rest = match.groups()
      if phase == "-start":
        continue
      if phase == "-done":
        name = rest.split(")")[0].split(",")[0].strip().lstrip("%")
      result = arrays(type_text)
      dtypes = sorted({dtype for dtype, _ in result})
      found.append(Collective(kind=kind, dtype="+".join(dtypes), bytes=sum(array_bytes(*a) for a in result),
                              name=name, in_loop=computation in looped,
                              shapes=tuple(f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in result)))
  return found


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
  """Per kind present (in ``KINDS`` order): ``count`` of instructions, their result ``bytes`` per device, and how
  many of them are ``in_loop``."""
  totals = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "in_loop": 0})
  for c in found:
    totals[c.kind]["count"] += 1
    totals[c.kind]["bytes"] += c.bytes
    totals[c.kind]["in_loop"] += int(c.in_loop)
  return {kind: totals[kind] for kind in KINDS if kind in totals}
