"""The conftest guard: a non-local connection fails at once with a message; loopback connections still work
(the multi-process tests and grain need them)."""
import socket
import threading
import time
import urllib.request

import pytest

from conftest import NetworkBlocked


def test_a_non_local_connection_fails_at_once():
  start = time.time()
  with pytest.raises(NetworkBlocked, match="must not use the network"):
    socket.create_connection(("192.0.2.1", 80), timeout=30)  # TEST-NET-1: would hang until the timeout
  with pytest.raises(Exception, match="must not use the network"):
    urllib.request.urlopen("http://93.184.215.14/", timeout=30)
  with pytest.raises(Exception, match="tried to look up 'storage.googleapis.com'"):
    urllib.request.urlopen("https://storage.googleapis.com/tfds-data/", timeout=30)
  assert time.time() - start < 5


def test_loopback_connections_work():
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  port = server.getsockname()[1]
  accepted = []
  thread = threading.Thread(target=lambda: accepted.append(server.accept()[0].recv(5)))
  thread.start()
  with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
    client.sendall(b"hello")
  thread.join(10)
  server.close()
  assert accepted == [b"hello"]
