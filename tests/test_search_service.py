"""The retrieval service: one server process, many concurrent clients."""

import concurrent.futures
import json
import pathlib
import urllib.request

import pytest
from conftest import search_settings

from segresearch_jax.search import factory, local_kb, service
from segresearch_jax.search import results as results_lib

KB_DIR = pathlib.Path(__file__).parents[2] / "shared" / "data" / "okvos_local_kb"


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
  if (KB_DIR / "text_corpus.jsonl").is_file():
    return local_kb.LocalKnowledgeBase.from_files(
      KB_DIR / "text_corpus.jsonl", KB_DIR / "image_corpus.jsonl", method="bm25"
    )
  corpus = tmp_path_factory.mktemp("kb") / "c.jsonl"
  corpus.write_text(json.dumps({"id": 0, "contents": "Claudio Miranda\na cinematographer"}) + "\n")
  return local_kb.LocalKnowledgeBase.from_files(corpus, method="bm25")


@pytest.fixture
def server(kb):
  s = service.RetrievalServer(kb).start()
  yield s
  s.stop()


QUERIES = ["Claudio Miranda cinematographer", "Roger Federer", "Zendaya UNICEF", "Apple", "Bugatti"]


def test_eight_concurrent_clients_match_direct_calls(server, kb):
  def work(i):
    client = service.RetrievalClient(server.url, timeout_s=10)
    out = []
    for j in range(10):
      q = QUERIES[(i + j) % len(QUERIES)]
      out.append((q, client.text_search(q, 2)))
    return out

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = [a for chunk in pool.map(work, range(8)) for a in chunk]
  assert len(answers) == 80
  for query, found in answers:
    assert found == kb.text_search(query, 2)
  assert answers[0][1][0].title == "Claudio Miranda"


def test_image_search_and_health(server, kb):
  if kb.images:
    client = service.RetrievalClient(server.url)
    assert client.image_search("Apple company", 1) == kb.image_search("Apple company", 1)
  with urllib.request.urlopen(server.url + "/health") as r:
    assert json.loads(r.read())["backend"] == kb.name


def test_bad_requests_and_backend_errors(server):
  client = service.RetrievalClient(server.url, max_retries=0)
  with pytest.raises(results_lib.SearchError, match="HTTP 400"):
    client.text_search("q", 0)
  with pytest.raises(results_lib.SearchError, match="HTTP 404"):
    client._call("web_search", "q", 1)

  class Broken:
    name = "broken"

    def text_search(self, query, k):
      raise RuntimeError("bug")

    def image_search(self, query, k):
      raise results_lib.SearchError("no images")

  broken = service.RetrievalServer(Broken()).start()
  try:
    c = service.RetrievalClient(broken.url, max_retries=0)
    with pytest.raises(results_lib.SearchError, match="HTTP 500"):
      c.text_search("q", 1)
    with pytest.raises(results_lib.SearchError, match="HTTP 502"):
      c.image_search("q", 1)
  finally:
    broken.stop()


def test_factory_service_client(server):
  backend = factory.make_backend(search_settings(backend="service", service_url=server.url))
  assert isinstance(backend, service.RetrievalClient)
  assert backend.text_search("Claudio Miranda", 1)[0].title == "Claudio Miranda"
  with pytest.raises(ValueError, match="service_url"):
    factory.make_backend(search_settings(backend="service"))


# ----------------------------------------------------------------------------
# Hardening: size limit, slow bodies, token, bind address, cache identity.
# ----------------------------------------------------------------------------


def _raw_post(url, head: bytes, body: bytes = b"", read_timeout=10.0) -> bytes:
  """Sends a hand-made request and returns the raw answer (the server closes after errors)."""
  import socket

  host, port = url.removeprefix("http://").split(":")
  with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
    sock.sendall(head + body)
    answer = b""
    while chunk := sock.recv(65536):
      answer += chunk
  return answer


def test_oversized_request_is_refused_unread(kb):
  server = service.RetrievalServer(kb, max_request_bytes=1024).start()
  try:
    head = b"POST /text_search HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n"
    answer = _raw_post(server.url, head, b'{"query": "')  # the other 50 MB never come
    assert answer.startswith(b"HTTP/1.0 413") or answer.startswith(b"HTTP/1.1 413")
    client = service.RetrievalClient(server.url, max_retries=0)
    with pytest.raises(results_lib.SearchError, match="HTTP 413"):
      client.text_search("x" * 2000, 1)
    assert client.text_search("Claudio Miranda", 1)  # a normal query still works
  finally:
    server.stop()


def test_lying_content_length_gets_408_after_the_read_timeout(kb):
  server = service.RetrievalServer(kb, read_timeout_s=0.3).start()
  try:
    head = b"POST /text_search HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
    answer = _raw_post(server.url, head, b'{"query": "Roger')
    assert answer.split(b"\r\n", 1)[0].endswith(b"408 Request Timeout")
  finally:
    server.stop()


def test_token_required_when_set(kb, monkeypatch):
  server = service.RetrievalServer(kb, token="s3cret-token").start()
  try:
    monkeypatch.delenv(service.TOKEN_ENV, raising=False)
    anonymous = service.RetrievalClient(server.url, max_retries=0)
    with pytest.raises(results_lib.SearchError, match="HTTP 401"):
      anonymous.text_search("Roger Federer", 1)
    with pytest.raises(results_lib.SearchError, match="cache identity"):
      anonymous.cache_identity  # noqa: B018 (a property that asks the server)
    wrong = service.RetrievalClient(server.url, max_retries=0, token="s3cret-tokex")
    with pytest.raises(results_lib.SearchError, match="HTTP 401"):
      wrong.text_search("Roger Federer", 1)
    monkeypatch.setenv(service.TOKEN_ENV, "s3cret-token")
    client = service.RetrievalClient(server.url)  # as launched: the token from the env
    assert client.text_search("Roger Federer", 1) == kb.text_search("Roger Federer", 1)
    assert client.cache_identity == f"service:{kb.cache_identity}"
    assert "s3cret" not in repr(client)
  finally:
    server.stop()


def test_binds_localhost_by_default(kb):
  server = service.RetrievalServer(kb)
  try:
    assert server.server_address[0] == "127.0.0.1"
  finally:
    server.server_close()
  assert service.build_parser().parse_args(["--text_corpus=t.jsonl"]).host == "127.0.0.1"


def test_cached_service_client_is_keyed_by_the_served_kb(server, kb, tmp_path):
  backend = factory.make_backend(
    search_settings(backend="service", service_url=server.url), cache_path=str(tmp_path / "s.db")
  )
  backend.text_search("Roger Federer", 1)
  assert backend.identity == f"service:{kb.cache_identity}"
  assert backend.cache.get(backend.identity, "text_search", "Roger Federer", 1)
