"""The persistent search cache: keys, modes, persistence across processes."""

import pytest
from conftest import search_settings

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


def _kb(root, docs):
  import json

  root.mkdir(parents=True, exist_ok=True)
  corpus = root / "text_corpus.jsonl"
  corpus.write_text(
    "".join(json.dumps({"id": i, "contents": d}) + "\n" for i, d in enumerate(docs))
  )
  return corpus


def test_switching_kb_in_one_workdir_never_serves_the_old_kb(tmp_path):
  from segresearch_jax.search import factory

  db = str(tmp_path / "run" / "search_cache.sqlite")  # one workdir, one cache file
  old = _kb(tmp_path / "old", ["Horse\nan old brown horse", "Car\nan old red car"])
  new = _kb(tmp_path / "new", ["Horse\na new white horse", "Boat\na new blue boat"])
  settings = search_settings(method="bm25")
  first = factory.make_backend(settings, text_corpus=str(old), cache_path=db)
  assert first.text_search("horse", 1)[0].text == "an old brown horse"
  second = factory.make_backend(settings, text_corpus=str(new), cache_path=db)
  assert second.text_search("horse", 1)[0].text == "a new white horse"
  assert (second.hits, second.misses) == (0, 1)
  # The same KB again (even from a copy elsewhere) is served from the cache.
  copy = _kb(tmp_path / "copy", ["Horse\nan old brown horse", "Car\nan old red car"])
  again = factory.make_backend(settings, text_corpus=str(copy), cache_path=db)
  assert again.text_search("horse", 1)[0].text == "an old brown horse"
  assert again.hits == 1


def test_empty_answers_are_not_cached(tmp_path):
  class Flaky(CountingBackend):
    """Answers nothing the first time (a momentary failure that looks like no result)."""

    def image_search(self, query, k):
      self.calls.append(("image_search", query, k))
      return [] if len(self.calls) == 1 else [results_lib.ImageResult(query, path="/x.png")]

  backend = Flaky()
  cached = cache_lib.CachedBackend(backend, cache_lib.SearchCache(tmp_path / "s.db"))
  assert cached.image_search("q", 1) == []
  assert len(cached.cache) == 0
  assert cached.image_search("q", 1)[0].path == "/x.png"  # asked again, now stored
  assert cached.image_search("q", 1)[0].path == "/x.png"
  assert len(backend.calls) == 2 and len(cached.cache) == 1


def test_identity_keys_the_cache(tmp_path):
  class Named(CountingBackend):
    def __init__(self, identity):
      super().__init__()
      self.cache_identity = identity

  store = cache_lib.SearchCache(tmp_path / "s.db")
  a = cache_lib.CachedBackend(Named("counting:kb-a"), store)
  b = cache_lib.CachedBackend(Named("counting:kb-b"), store)
  a.text_search("q", 1)
  b.text_search("q", 1)
  assert (a.misses, b.misses, b.hits) == (1, 1, 0) and len(store) == 2
