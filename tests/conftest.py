"""Shared fixtures, and a guard that no test reaches the network.

The math tests run in float64 (``x64``) so that closed forms can be compared with dense references to ~1e-12; a
few tests run in the default float32 on purpose.

The guard: every socket ``connect`` in the test process to an address that is not this machine's loopback (or a
Unix socket), and every name look-up other than this machine's own names, raises at once, so a test that would download a data set fails in milliseconds instead of hanging
(``tfds.load('lm1b')`` offline retries for minutes). Subprocesses that tests start run our own commands on local
files; the guard covers the pytest process itself.
"""
import ipaddress
import socket

import jax
import pytest


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


socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield
