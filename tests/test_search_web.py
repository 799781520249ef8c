"""Serper client and summariser against a fake server on 127.0.0.1 with injected faults."""

import http.server
import io
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from segresearch_jax.search import factory, web
from segresearch_jax.search import results as results_lib

KEY = "test-secret-key"


def _png() -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class FakeSerper(http.server.ThreadingHTTPServer):
  """Answers like serper.dev; `faults` is consumed one per request ("ok" when empty)."""

  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.faults = []
    self.requests = []
    self.lock = threading.Lock()
    threading.Thread(target=self.serve_forever, daemon=True).start()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):
    pass

  def _send(self, status, data, ctype="application/json", headers=()):
    self.send_response(status)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(data)))
    for k, v in headers:
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    self._send(200, _png() if self.path == "/img/good.png" else b"not an image", "image/png")

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with self.server.lock:
      self.server.requests.append((self.path, body, self.headers.get("X-API-KEY")))
      fault = self.server.faults.pop(0) if self.server.faults else "ok"
    if fault == "slow":
      time.sleep(1.0)
    elif fault == "500":
      return self._send(500, b"{}")
    elif fault == "429":
      return self._send(429, b"{}", headers=[("Retry-After", "0")])
    elif fault == "403":
      return self._send(403, b"{}")
    elif fault == "malformed":
      return self._send(200, b"{not json")
    elif fault == "reset":
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
      self.close_connection = True
      return
    if self.path == "/search":
      organic = [
        {"title": f"Doc {i}", "link": "x", "snippet": f"snippet {i} for {body['q']}"}
        for i in range(5)
      ]
      return self._send(200, json.dumps({"organic": organic}).encode())
    if self.path == "/images":
      images = [
        {"title": "no url"},
        {"title": "Broken", "imageUrl": f"{self.server.url}/img/bad.png"},
        {"title": "Good", "imageUrl": f"{self.server.url}/img/good.png"},
      ]
      return self._send(200, json.dumps({"images": images}).encode())
    if self.path == "/v1/chat/completions":
      return self._send(
        200, json.dumps({"choices": [{"message": {"content": " short summary "}}]}).encode()
      )
    self._send(404, b"{}")


@pytest.fixture
def server():
  s = FakeSerper()
  yield s
  s.shutdown()
  s.server_close()


def _client(server, **kw):
  kw = {"timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.01, **kw}
  return web.SerperBackend(KEY, base_url=server.url, **kw)


def test_text_search_request_and_formatting(server):
  found = _client(server).text_search("Claudio Miranda", 3)
  assert [r.title for r in found] == ["Doc 0", "Doc 1", "Doc 2"]
  assert found[0].text == "snippet 0 for Claudio Miranda"
  path, body, key = server.requests[0]
  assert path == "/search" and body["q"] == "Claudio Miranda" and key == KEY
  assert set(body) == {"q", "hl", "gl", "num"}


@pytest.mark.parametrize("fault", ["500", "429", "reset", "slow"])
def test_transient_faults_are_retried(server, fault):
  server.faults = [fault]
  found = _client(server).text_search("q", 2)
  assert len(found) == 2
  assert len(server.requests) == 2  # one failure, one retry


def test_malformed_json_fails_without_retry(server):
  server.faults = ["malformed"]
  with pytest.raises(results_lib.SearchError, match="Malformed JSON"):
    _client(server).text_search("q", 2)
  assert len(server.requests) == 1


def test_retries_exhausted_and_no_retry_on_403(server, caplog):
  server.faults = ["429", "429", "429"]
  start = time.perf_counter()
  with pytest.raises(results_lib.SearchError, match=r"after 3 attempt\(s\): HTTP 429"):
    _client(server).text_search("q", 2)
  assert len(server.requests) == 3
  server.faults = ["slow", "slow"]
  with pytest.raises(results_lib.SearchError, match="timeout"):
    _client(server, max_retries=1, timeout_s=0.2).text_search("q", 2)
  assert time.perf_counter() - start < 10
  server.requests.clear()
  server.faults = ["403"]
  with pytest.raises(results_lib.SearchError, match="HTTP 403") as e:
    _client(server).text_search("q", 2)
  assert len(server.requests) == 1
  assert KEY not in str(e.value) and KEY not in caplog.text and KEY not in repr(_client(server))


def test_image_search_first_valid(server, tmp_path):
  found = _client(server, image_dir=tmp_path).image_search("Apple Inc", 1)
  assert len(found) == 1 and found[0].name == "Good"
  assert found[0].url.endswith("/img/good.png")
  Image.open(found[0].path).verify()
  assert server.requests[0][1]["num"] == 6


def test_summariser_condenses_text_results(server):
  summariser = web.Summariser(server.url, "local-model", timeout_s=1.0)
  found = _client(server, summariser=summariser).text_search("who", 3)
  assert [(r.title, r.text) for r in found] == [("who", "short summary")]
  chat = [b for p, b, _ in server.requests if p == "/v1/chat/completions"][0]
  assert chat["model"] == "local-model" and "Doc 0" in chat["messages"][1]["content"]


def test_missing_key_and_factory(monkeypatch, server):
  monkeypatch.delenv("SERPER_API_KEY", raising=False)
  with pytest.raises(ValueError, match="SERPER_API_KEY"):
    web.SerperBackend()
  monkeypatch.setenv("SERPER_API_KEY", KEY)
  backend = factory.make_backend(
    {"backend": "serper", "serper_base_url": server.url, "timeout_s": 1.0}
  )
  assert backend.text_search("q", 2)[1].title == "Doc 1"


def test_duckduckgo_backend_with_fake_ddgs(monkeypatch):
  """ddgs is optional; a stand-in module checks formatting and retries without network."""
  import sys
  import types

  calls = []

  class FakeDDGS:
    def __init__(self, timeout):
      self.timeout = timeout

    def text(self, query, max_results):
      calls.append(("text", query, max_results))
      if len(calls) == 1:
        raise RuntimeError("rate limited")
      return [{"title": "T", "href": "u", "body": "B"}] * max_results

    def images(self, query, max_results):
      return [{"title": "no image"}, {"title": "Pic", "image": "http://x/p.jpg"}]

  monkeypatch.setitem(sys.modules, "ddgs", types.SimpleNamespace(DDGS=FakeDDGS))
  backend = web.DuckDuckGoBackend(timeout_s=5, max_retries=1, backoff_s=0.0)
  assert backend.text_search("q", 2) == [
    results_lib.TextResult("T", "B", 0.0),
    results_lib.TextResult("T", "B", -1.0),
  ]
  assert len(calls) == 2
  assert [(r.name, r.url) for r in backend.image_search("q", 1)] == [("Pic", "http://x/p.jpg")]
  calls.clear()
  backend = web.DuckDuckGoBackend(max_retries=0, backoff_s=0.0)
  with pytest.raises(results_lib.SearchError, match="RuntimeError"):
    backend.text_search("q", 1)
