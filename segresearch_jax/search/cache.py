"""A persistent search cache that makes runs replayable offline (docs/method.md §2.2).

Search results change from day to day (the seed paper names this as its main
limitation); recording every answer in SQLite, keyed by (backend identity, tool,
normalised query, k), lets a later run replay exactly the same observations.

The backend identity is the backend's `cache_identity` when it has one (the local KB:
its name plus a fingerprint of the corpus and the encoder; web backends: their
settings; the service client: the served KB's identity), else its `name`. Pointing a
workdir at another knowledge base therefore never serves the old one's documents.
Only answers are stored: an error raises past the cache, and an empty answer (how a
momentary failure such as every image download failing can look) is not stored, so a
later call asks again.

Modes:
  off: every call goes to the backend; nothing is read or written.
  read_write: hits are served from the cache; misses go to the backend and are stored.
  replay: hits are served from the cache; a miss raises `CacheMiss` (offline runs).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sqlite3
import threading

from segresearch_jax.search import results as results_lib

MODES = ("off", "read_write", "replay")


class CacheMiss(results_lib.SearchError):
  """A replay-only cache has no entry for the requested call."""


def normalise_query(query: str) -> str:
  """Case-folded, whitespace-collapsed query: trivially different spellings share a key."""
  return re.sub(r"\s+", " ", query).strip().casefold()


class SearchCache:
  """(backend identity, tool, normalised query, k) -> JSON results, in one SQLite file.

  Thread-safe: one connection guarded by a lock (SQLite writes are serialised anyway).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()
    self._db = sqlite3.connect(str(self.path), check_same_thread=False)
    with self._lock, self._db:
      self._db.execute(
        "CREATE TABLE IF NOT EXISTS search ("
        " backend TEXT, tool TEXT, query TEXT, k INTEGER, results TEXT,"
        " PRIMARY KEY (backend, tool, query, k))"
      )

  def get(self, backend: str, tool: str, query: str, k: int) -> list[dict] | None:
    """The stored results, or None on a miss."""
    with self._lock:
      row = self._db.execute(
        "SELECT results FROM search WHERE backend=? AND tool=? AND query=? AND k=?",
        (backend, tool, normalise_query(query), int(k)),
      ).fetchone()
    return None if row is None else json.loads(row[0])

  def put(self, backend: str, tool: str, query: str, k: int, results: list[dict]) -> None:
    """Stores (or replaces) the results of one call."""
    with self._lock, self._db:
      self._db.execute(
        "INSERT OR REPLACE INTO search VALUES (?, ?, ?, ?, ?)",
        (backend, tool, normalise_query(query), int(k), json.dumps(results)),
      )

  def __len__(self) -> int:
    with self._lock:
      return self._db.execute("SELECT COUNT(*) FROM search").fetchone()[0]

  def close(self) -> None:
    with self._lock:
      self._db.close()


class CachedBackend:
  """Wraps a backend with a `SearchCache` in one of the modes above.

  Attributes:
    hits: calls answered from the cache.
    misses: calls that went to the backend (or failed, in replay mode).
  """

  def __init__(self, backend: results_lib.Backend, cache: SearchCache, mode: str = "read_write"):
    if mode not in MODES:
      raise ValueError(f"Unknown search cache mode {mode!r}; expected one of {MODES}.")
    self.backend = backend
    self.cache = cache
    self.mode = mode
    self.name = backend.name
    self.hits = 0
    self.misses = 0
    self._lock = threading.Lock()
    self._identity: str | None = None

  @property
  def identity(self) -> str:
    """The cache key's backend part (read once: a service client asks its server)."""
    if self._identity is None:
      self._identity = str(getattr(self.backend, "cache_identity", None) or self.backend.name)
    return self._identity

  def _call(self, tool: str, query: str, k: int, result_cls):
    if self.mode != "off":
      stored = self.cache.get(self.identity, tool, query, k)
      if stored is not None:
        with self._lock:
          self.hits += 1
        return [result_cls.from_json(r) for r in stored]
    with self._lock:
      self.misses += 1
    if self.mode == "replay":
      raise CacheMiss(
        f"Search cache {self.cache.path} has no entry for {self.identity}/{tool} "
        f"query={query!r} k={k} (replay mode never calls the backend)."
      )
    found = getattr(self.backend, tool)(query, k)
    if self.mode == "read_write" and found:
      self.cache.put(self.identity, tool, query, k, [r.to_json() for r in found])
    return found

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    return self._call("text_search", query, k, results_lib.TextResult)

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    return self._call("image_search", query, k, results_lib.ImageResult)
