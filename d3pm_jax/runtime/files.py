"""Files a crash must never leave half-written."""
from __future__ import annotations

import json
import os


def write_json(path: str, obj) -> None:
  """``obj`` as indented JSON at ``path``, replaced whole: a crash mid-write leaves the previous file (or none)."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
