"""The network, used only by ``d3pm-prepare`` and only when a data set is not on disk: a bounded reachability
probe, so that an offline machine is told what to download within seconds instead of retrying for minutes, and a
download that writes its file atomically."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request


def reachable(url: str, timeout: float = 4.0) -> bool:
  """Whether ``url``'s host accepts a TCP connection within ``timeout`` seconds, the name look-up included (it
  runs in a daemon thread, since ``getaddrinfo`` itself takes no timeout)."""
  parts = urllib.parse.urlsplit(url)
  port = parts.port or (443 if parts.scheme == "https" else 80)
  result = []

  def probe():
    try:
      socket.create_connection((parts.hostname, port), timeout=timeout).close()
      result.append(True)
    except Exception:  # noqa: BLE001 - offline, refused, blocked by a test's guard: all mean "not reachable"
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


def download(url: str, path: str, timeout: float = 60.0) -> str:
  """Downloads ``url`` to ``path`` through a temporary file, so an interrupted download leaves no partial file
  under the final name."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with urllib.request.urlopen(url, timeout=timeout) as response, open(path + ".part", "wb") as f:
    shutil.copyfileobj(response, f, length=1 << 20)
  os.replace(path + ".part", path)
  return path
