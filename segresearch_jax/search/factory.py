"""Builds the configured search backend from `config.search` (a dict or ConfigDict).

Fields read (defaults in `DEFAULTS`):
  backend: local | service | serper | ddgs.
  text_corpus, image_corpus, images_dir: local knowledge base files (backend=local);
    image files are found in images_dir, else the `images/` folder next to the image
    corpus, else at each row's `image_path`; a missing one fails at startup.
  method: bm25 | dense | hybrid; dense_model: local model dir (None = packaged MiniLM);
    dense_prefixes: the e5 `query: ` / `passage: ` prefixes (needs dense_model);
    hybrid_alpha; embedding_cache_dir (None = ~/.cache/segresearch_jax/embeddings).
  service_url: the retrieval service root (backend=service); its token comes from
    SEGRESEARCH_SEARCH_TOKEN in the environment.
  web_top_k: text results per web search (official 3; 0 = the caller's k).
  fetch_pages: serper fetches each result page and answers with the context around
    the best-matching sentence, 960 characters in all (official); False = snippets.
  serper_base_url, image_dir: Serper root and where downloaded images go.
  timeout_s, max_retries, backoff_s: per request (web and service backends); the
    timeout bounds each request as a whole.
  summarizer_url, summarizer_model: OpenAI-compatible summariser of the fetched pages
    (serper; the official "web browsing"); summarizer_retries, summarizer_timeout_s.
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
  "dense_prefixes": False,
  "hybrid_alpha": 0.5,
  "embedding_cache_dir": None,
  "service_url": None,
  "web_top_k": web.WEB_TOP_K,
  "fetch_pages": True,
  "serper_base_url": web.SERPER_URL,
  "image_dir": None,
  "timeout_s": 30.0,
  "max_retries": 2,
  "backoff_s": 1.0,
  "summarizer_url": None,
  "summarizer_model": None,
  "summarizer_retries": 10,
  "summarizer_timeout_s": 120.0,
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
      dense_prefixes=bool(c["dense_prefixes"]),
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
    if c["summarizer_url"] or c["summarizer_model"]:
      summariser = web.Summariser(
        c["summarizer_url"],
        c["summarizer_model"],
        timeout_s=c["summarizer_timeout_s"],
        max_retries=c["summarizer_retries"],
      )
    backend = web.SerperBackend(
      base_url=c["serper_base_url"],
      timeout_s=c["timeout_s"],
      max_retries=c["max_retries"],
      backoff_s=c["backoff_s"],
      top_k=c["web_top_k"] or None,
      fetch_pages=bool(c["fetch_pages"]),
      image_dir=c["image_dir"],
      summariser=summariser,
    )
  elif kind == "ddgs":
    backend = web.DuckDuckGoBackend(
      timeout_s=c["timeout_s"],
      max_retries=c["max_retries"],
      backoff_s=c["backoff_s"],
      top_k=c["web_top_k"] or None,
    )
  else:
    raise ValueError(f"Unknown search backend {kind!r}; expected one of {BACKENDS}.")
  if c["cache_path"] and c["cache_mode"] != "off":
    backend = cache_lib.CachedBackend(
      backend, cache_lib.SearchCache(c["cache_path"]), c["cache_mode"]
    )
  return backend
