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
from conftest import search_settings
from PIL import Image

from segresearch_jax.search import factory, web
from segresearch_jax.search import results as results_lib

KEY = "test-secret-key"
_SNIPPETS = [
  "Claudio Miranda is a Chilean cinematographer who won an Academy Award.",
  "The film Life of Pi was shot in Taiwan.",
  "A page that no longer exists.",
  "Snippet three with nothing on the page.",
  "Snippet four.",
]
_FILLER = "Unrelated words about weather and trains fill this part of the page. " * 12


def _page(i: int) -> str:
  """Page i: filler, the sentence its snippet quotes (pages 0 and 1), more filler."""
  quoted = {0: _SNIPPETS[0].replace("who", "who famously"), 1: _SNIPPETS[1]}.get(i, "")
  return (
    "<html><head><title>t</title><script>var hidden = 'x';</script></head><body>"
    f"<p>{_FILLER}</p><p>{quoted}</p><div>{_FILLER}</div></body></html>"
  )


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
    with self.server.lock:
      self.server.requests.append((self.path, None, self.headers.get("X-API-KEY")))
      fault = (
        self.server.faults.pop(0) if self.server.faults and self.path.startswith("/img") else "ok"
      )
    if self.path.startswith("/redirect"):  # to the same server under another host name
      where = f"http://localhost:{self.server.server_address[1]}/img/good.png"
      return self._send(302, b"", "text/plain", headers=[("Location", where)])
    if self.path.startswith("/page/"):
      return self._send(
        200, _page(int(self.path.rsplit("/", 1)[1])).encode(), "text/html; charset=utf-8"
      )
    if self.path == "/page-missing":
      return self._send(404, b"gone", "text/html")
    good = self.path == "/img/good.png" and fault == "ok"
    self._send(200, _png() if good else b"not an image", "image/png")

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with self.server.lock:
      self.server.requests.append((self.path, body, self.headers.get("X-API-KEY")))
      fault = self.server.faults.pop(0) if self.server.faults else "ok"
    if fault == "slow":
      time.sleep(1.0)
    elif fault == "down":
      pass
    elif fault == "500":
      return self._send(500, b"{}")
    elif fault == "429":
      return self._send(429, b"{}", headers=[("Retry-After", "0")])
    elif fault == "403":
      return self._send(403, b"{}")
    elif fault == "malformed":
      return self._send(200, b"{not json")
    elif fault == "error_body":  # How Serper reports e.g. an exhausted account.
      return self._send(
        200, json.dumps({"message": "Not enough credits", "statusCode": 400}).encode()
      )
    elif fault == "reset":
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
      self.close_connection = True
      return
    if self.path == "/search":
      organic = [
        {"title": f"Doc {i}", "link": f"{self.server.url}/page/{i}", "snippet": _SNIPPETS[i]}
        for i in range(5)
      ]
      organic[2]["link"] = f"{self.server.url}/page-missing"
      return self._send(200, json.dumps({"organic": organic}).encode())
    if self.path == "/images":
      images = [
        {"title": "no url"},
        {"title": "Broken", "imageUrl": f"{self.server.url}/img/bad.png"},
        {"title": "Good", "imageUrl": f"{self.server.url}/img/good.png"},
      ]
      return self._send(200, json.dumps({"images": images}).encode())
    if self.path == "/v1/chat/completions":
      content = "Let me read.\n**Final Information**: Claudio Miranda is a\ncinematographer.\n"
      return self._send(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())
    self._send(404, b"{}")


@pytest.fixture
def server():
  s = FakeSerper()
  yield s
  s.shutdown()
  s.server_close()


def _client(server, **kw):
  """A client that returns snippets for the caller's k unless told otherwise."""
  kw = {"timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.01, "top_k": None, **kw}
  kw.setdefault("fetch_pages", False)
  return web.SerperBackend(KEY, base_url=server.url, **kw)


def test_text_search_request_and_formatting(server):
  found = _client(server).text_search("Claudio Miranda", 3)
  assert [r.title for r in found] == ["Doc 0", "Doc 1", "Doc 2"]
  assert found[0].text == _SNIPPETS[0] and not found[0].preformatted
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


def test_missing_key_and_factory(monkeypatch, server):
  monkeypatch.delenv("SERPER_API_KEY", raising=False)
  with pytest.raises(ValueError, match="SERPER_API_KEY"):
    web.SerperBackend()
  monkeypatch.setenv("SERPER_API_KEY", KEY)
  backend = factory.make_backend(
    search_settings(backend="serper", serper_base_url=server.url, timeout_s=1.0, fetch_pages=False)
  )
  assert [r.title for r in backend.text_search("q", 2)] == ["Doc 0", "Doc 1", "Doc 2"]  # top-3


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
  assert backend.text_search("q", 2) == [  # official top-3, whatever the caller's k
    results_lib.TextResult("T", "B", 0.0),
    results_lib.TextResult("T", "B", -1.0),
    results_lib.TextResult("T", "B", -2.0),
  ]
  assert calls == [("text", "q", 3)] * 2
  assert [(r.name, r.url) for r in backend.image_search("q", 1)] == [("Pic", "http://x/p.jpg")]
  calls.clear()
  backend = web.DuckDuckGoBackend(max_retries=0, backoff_s=0.0)
  with pytest.raises(results_lib.SearchError, match="RuntimeError"):
    backend.text_search("q", 1)


# ----------------------------------------------------------------------------
# Official page processing, the summariser, whole-call timeouts, failures not cached.
# ----------------------------------------------------------------------------


def test_snippet_context_best_sentence_and_fallback():
  text = "Alpha beta gamma. " * 40 + "Claudio Miranda shot Life of Pi in Taiwan. " + "Delta. " * 80
  found, context = web.snippet_context(text, "Life of Pi was shot in Taiwan", 50)
  start = text.index("Claudio Miranda")
  end = start + len("Claudio Miranda shot Life of Pi in Taiwan.")
  assert found and context == text[start - 50 : end + 50]
  assert web.snippet_context(text, "zebra xylophone", 30) == (False, text[:60])
  assert web.cut("x" * 961, 960) == "x" * 959 + "…" and web.cut("x" * 960, 960) == "x" * 960


def _official_document(server, contexts):
  pages = []
  for i in range(3):
    url = f"{server.url}/page/{i}" if i != 2 else f"{server.url}/page-missing"
    info = {
      "id": i + 1,
      "title": f"Doc {i}",
      "url": url,
      "site_name": url.split("/")[2],
      "date": "",
      "snippet": _SNIPPETS[i],
      "context": contexts[i],
    }
    pages.append(f"**Web Page {i + 1}:**\n" + json.dumps(info, ensure_ascii=False, indent=2) + "\n")
  return "".join(pages)


def test_serper_fetches_pages_like_the_official_default(server):
  backend = _client(server, top_k=web.WEB_TOP_K, fetch_pages=True)
  (found,) = backend.text_search("Claudio Miranda", 2)
  assert server.requests[0][1]["num"] == 3  # official top-3 asked of Serper
  fetched = sorted(p for p, _, _ in server.requests if p.startswith("/page"))
  assert fetched == ["/page-missing", "/page/0", "/page/1"]
  texts = [web.page_text(_page(i).encode(), "text/html") for i in range(2)]
  assert "hidden" not in texts[0] and texts[0].startswith("Unrelated words")
  contexts = [web.snippet_context(t, _SNIPPETS[i], 320)[1] for i, t in enumerate(texts)]
  contexts.append("Failed to fetch content: OSError")
  assert "Claudio Miranda is a Chilean cinematographer who famously" in contexts[0]
  expected = web.cut(_official_document(server, contexts), 960)
  assert len(expected) == 960 and expected.endswith("…")
  assert found.text == expected and found.title == "Claudio Miranda" and found.preformatted


def test_summariser_official_settings_and_retries(server):
  server.faults = ["ok", "500"]  # Serper answers; the summariser fails once, then answers.
  summariser = web.Summariser(server.url, "local-model", timeout_s=2.0, backoff_s=0.01)
  backend = _client(server, top_k=3, fetch_pages=True, summariser=summariser)
  (found,) = backend.text_search("who shot Life of Pi", 2)
  assert found.text == ": Claudio Miranda is acinematographer."  # official extraction
  chats = [b for p, b, _ in server.requests if p == "/v1/chat/completions"]
  assert len(chats) == 2
  body = chats[-1]
  assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 8192)
  (message,) = body["messages"]
  assert message["role"] == "user"
  assert (
    "<Current Search Query> (The question you need to answer):\nwho shot Life of Pi"
    in (message["content"])
  )
  assert "**Web Page 1:**" in message["content"] and "who famously" in message["content"]
  assert summariser.max_retries == 10
  with pytest.raises(ValueError, match="fetch_pages"):
    _client(server, fetch_pages=False, summariser=summariser)


def test_summariser_switchable_from_the_run_config(server, monkeypatch, tmp_path):
  from configs import okvos as okvos_config
  from segresearch_jax import components

  monkeypatch.setenv("SERPER_API_KEY", KEY)
  config = okvos_config.get_config()
  config.search.serper_base_url = server.url
  config.workdir = str(tmp_path)
  config.search.backend = "serper"
  config.search.timeout_s = 2.0
  config.search.summarizer_url = server.url
  config.search.summarizer_model = "local-model"
  backend = components.make_search_backend(config, "")
  assert backend.backend.summariser.model == "local-model"
  assert backend.backend.top_k == 3 and backend.backend.fetch_pages
  assert any(p == "/v1/chat/completions" for p, _, _ in server.requests)  # health check


def test_serper_error_body_and_failed_downloads_are_errors_not_cached(server, tmp_path):
  from segresearch_jax.search import cache as cache_lib

  store = cache_lib.SearchCache(tmp_path / "s.db")
  cached = cache_lib.CachedBackend(_client(server, max_retries=0), store)
  server.faults = ["error_body"]
  with pytest.raises(results_lib.SearchError, match="Not enough credits"):
    cached.text_search("q", 2)
  server.faults = ["ok", "down", "down"]  # Both image candidates fail to download.
  with pytest.raises(results_lib.SearchError, match="None of 2 image results"):
    cached.image_search("Apple Inc", 1)
  assert len(store) == 0
  assert cached.text_search("q", 2)[0].title == "Doc 0"
  assert cached.image_search("Apple Inc", 1)[0].name == "Good"
  assert len(store) == 2


class _DripServer(threading.Thread):
  """Accepts one connection, then sends a 200 answer one byte every 0.2 s."""

  def __init__(self, total=60):
    super().__init__(daemon=True)
    self.sock = socket.create_server(("127.0.0.1", 0))
    self.sock.settimeout(10)
    self.total, self.sent = total, 0
    self.start()

  @property
  def url(self):
    return f"http://127.0.0.1:{self.sock.getsockname()[1]}/search"

  def run(self):
    try:
      conn, _ = self.sock.accept()
    except OSError:
      return
    with conn:
      conn.recv(65536)
      conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.total}\r\n\r\n".encode())
      for _ in range(self.total):  # Bounded: stops when the client hangs up, or after 12 s.
        try:
          conn.sendall(b"1")
        except OSError:
          break
        self.sent += 1
        time.sleep(0.2)
    self.sock.close()


def test_timeout_bounds_the_whole_call_not_each_read():
  drip = _DripServer()
  with pytest.raises(results_lib.SearchError, match="timeout"):
    web.post_json(drip.url, {"q": "x"}, timeout_s=1.0, max_retries=0)
  drip.join(timeout=15)
  assert not drip.is_alive()
  assert drip.sent < drip.total  # the client hung up long before the answer was complete


def test_requests_go_through_the_environments_proxy(server, monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("http_proxy", server.url)
  status, _, body = web.http_request("GET", "http://search.example/img/good.png", timeout_s=2.0)
  assert status == 200 and body == b"not an image"  # the fake answered as the proxy
  assert server.requests[-1][0] == "http://search.example/img/good.png"  # absolute form


def test_redirect_to_another_host_drops_the_api_key(server):
  status, _, _ = web.http_request(
    "GET", f"{server.url}/redirect", headers={"X-API-KEY": KEY, "User-Agent": "t"}, timeout_s=2.0
  )
  assert status == 200
  assert server.requests[-2] == ("/redirect", None, KEY)
  assert server.requests[-1] == ("/img/good.png", None, None)
