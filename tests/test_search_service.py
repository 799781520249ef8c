"""The retrieval service: one server process, many concurrent clients."""

import concurrent.futures
import json
import pathlib
import urllib.request

import pytest

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
  backend = factory.make_backend({"backend": "service", "service_url": server.url})
  assert isinstance(backend, service.RetrievalClient)
  assert backend.text_search("Claudio Miranda", 1)[0].title == "Claudio Miranda"
  with pytest.raises(ValueError, match="service_url"):
    factory.make_backend({"backend": "service"})
