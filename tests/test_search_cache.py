"""The persistent search cache: keys, modes, persistence across processes."""

import pytest

from segresearch_jax.search import cache as cache_lib
from segresearch_jax.search import results as results_lib


class CountingBackend:
  name = "counting"

  def __init__(self):
    self.calls = []

  def text_search(self, query, k):
    self.calls.append(("text_search", query, k))
    return [results_lib.TextResult(f"T{i} {query}", "body", float(-i)) for i in range(k)]

  def image_search(self, query, k):
    self.calls.append(("image_search", query, k))
    return [results_lib.ImageResult(query, path="/x.png", score=1.0)]


def test_read_write_then_replay_offline(tmp_path):
  path = tmp_path / "search.db"
  backend = CountingBackend()
  cached = cache_lib.CachedBackend(backend, cache_lib.SearchCache(path), "read_write")
  first = cached.text_search("Claudio  Miranda", 2)
  assert cached.text_search(" claudio miranda ", 2) == first  # normalised key
  cached.text_search("Claudio Miranda", 1)  # k is part of the key
  cached.image_search("Claudio Miranda", 1)  # so is the tool
  assert len(backend.calls) == 3 and (cached.hits, cached.misses) == (1, 3)
  cached.cache.close()

  # A new cache object on the same file, as a later run would open it.
  offline = CountingBackend()
  replay = cache_lib.CachedBackend(offline, cache_lib.SearchCache(path), "replay")
  assert replay.text_search("Claudio Miranda", 2) == first
  assert replay.image_search("claudio miranda", 1)[0].path == "/x.png"
  with pytest.raises(cache_lib.CacheMiss, match="query='unseen' k=2"):
    replay.text_search("unseen", 2)
  assert offline.calls == []
  assert isinstance(cache_lib.CacheMiss("x"), results_lib.SearchError)


def test_off_mode_and_backend_names_separate(tmp_path):
  store = cache_lib.SearchCache(tmp_path / "s.db")
  backend = CountingBackend()
  off = cache_lib.CachedBackend(backend, store, "off")
  off.text_search("q", 1)
  off.text_search("q", 1)
  assert len(backend.calls) == 2 and len(store) == 0
  store.put("other", "text_search", "q", 1, [{"title": "O", "text": "", "score": 0}])
  assert store.get("counting", "text_search", "q", 1) is None
  with pytest.raises(ValueError, match="Unknown search cache mode"):
    cache_lib.CachedBackend(backend, store, "record")


def test_backend_errors_are_not_cached(tmp_path):
  class Failing(CountingBackend):
    def text_search(self, query, k):
      raise results_lib.SearchError("down")

  cached = cache_lib.CachedBackend(Failing(), cache_lib.SearchCache(tmp_path / "s.db"))
  with pytest.raises(results_lib.SearchError):
    cached.text_search("q", 1)
  assert len(cached.cache) == 0
