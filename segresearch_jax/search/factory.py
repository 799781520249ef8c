"""Builds the configured search backend from `config.search` (a dict or ConfigDict).

Fields read (defaults in `DEFAULTS`):
  backend: local | service | serper | ddgs.
  text_corpus, image_corpus, images_dir: local knowledge base files (backend=local).
  method: bm25 | dense | hybrid; dense_model: local model dir (None = packaged MiniLM);
    hybrid_alpha; embedding_cache_dir (None = ~/.cache/segresearch_jax/embeddings).
  service_url: the retrieval service root (backend=service).
  serper_base_url, image_dir: Serper root and where downloaded images go.
  timeout_s, max_retries, backoff_s: per request (web and service backends).
  summariser_url, summariser_model: optional OpenAI-compatible summariser (serper).
  cache_path: SQLite search cache file (None = no cache); cache_mode: off |
    read_write | replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from segresearch_jax.search import cache as cache_lib
from segresearch_jax.search import local_kb, service, web
from segresearch_jax.search import results as results_lib

BACKENDS = ("local", "service", "serper", "ddgs")
DEFAULTS: dict[str, Any] = {
  "backend": "local",
  "text_corpus": None,
  "image_corpus": None,
  "images_dir": None,
  "method": "dense",
  "dense_model": None,
  "hybrid_alpha": 0.5,
  "embedding_cache_dir": None,
  "service_url": None,
  "serper_base_url": web.SERPER_URL,
  "image_dir": None,
  "timeout_s": 30.0,
  "max_retries": 2,
  "backoff_s": 1.0,
  "summariser_url": None,
  "summariser_model": None,
  "cache_path": None,
  "cache_mode": "read_write",
}


def make_backend(config: Mapping[str, Any] | Any) -> results_lib.Backend:
  """A backend per `config` (see the module docstring), wrapped in the cache if set."""
  unknown = set(dict(config)) - set(DEFAULTS) - {"text_top_k", "image_top_k"}
  if unknown:
    raise ValueError(f"Unknown search config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}.")
  c = {**DEFAULTS, **dict(config)}
  kind = c["backend"]
  if kind == "local":
    if not c["text_corpus"]:
      raise ValueError("search.backend=local needs search.text_corpus.")
    backend = local_kb.LocalKnowledgeBase.from_files(
      c["text_corpus"],
      c["image_corpus"],
      c["images_dir"],
      method=c["method"],
      dense_model=c["dense_model"],
      hybrid_alpha=c["hybrid_alpha"],
      embedding_cache_dir=c["embedding_cache_dir"] or local_kb.DEFAULT_CACHE_DIR,
    )
  elif kind == "service":
    if not c["service_url"]:
      raise ValueError("search.backend=service needs search.service_url.")
    backend = service.RetrievalClient(
      c["service_url"],
      timeout_s=c["timeout_s"],
      max_retries=c["max_retries"],
      backoff_s=c["backoff_s"],
    )
  elif kind == "serper":
    summariser = None
    if c["summariser_url"] or c["summariser_model"]:
      summariser = web.Summariser(
        c["summariser_url"], c["summariser_model"], timeout_s=c["timeout_s"]
      )
    backend = web.SerperBackend(
      base_url=c["serper_base_url"],
      timeout_s=c["timeout_s"],
      max_retries=c["max_retries"],
      backoff_s=c["backoff_s"],
      image_dir=c["image_dir"],
      summariser=summariser,
    )
  elif kind == "ddgs":
    backend = web.DuckDuckGoBackend(
      timeout_s=c["timeout_s"], max_retries=c["max_retries"], backoff_s=c["backoff_s"]
    )
  else:
    raise ValueError(f"Unknown search backend {kind!r}; expected one of {BACKENDS}.")
  if c["cache_path"] and c["cache_mode"] != "off":
    backend = cache_lib.CachedBackend(
      backend, cache_lib.SearchCache(c["cache_path"]), c["cache_mode"]
    )
  return backend
