"""Builds the configured search backend from the run config's `search` block.

    settings = factory.SearchConfig.from_config(config.search)
    backend = factory.make_backend(settings, text_corpus=..., cache_path=...)

`SearchConfig` holds the backend settings (their defaults and meaning live in
configs/okvos.py, once); what a run derives from its folders (the knowledge-base files,
the cache file) is passed to `make_backend` as arguments. For backend=local the image
files are found in `images_dir`, else the `images/` folder next to the image corpus,
else at each row's `image_path`; a missing one fails at startup. The service token
comes from SEGRESEARCH_SEARCH_TOKEN in the environment.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from segresearch_jax.search import cache as cache_lib
from segresearch_jax.search import local_kb, service, web
from segresearch_jax.search import results as results_lib

BACKENDS = ("local", "service", "serper", "ddgs")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The search settings of `config.search` (configs/okvos.py documents each field).

  Attributes:
    backend: local | service | serper | ddgs.
    method, dense_model, dense_prefixes, hybrid_alpha, embedding_cache_dir: the local
      retriever (bm25 | dense | hybrid; "" = the packaged MiniLM / the default cache).
    service_url: the retrieval service root (backend=service).
    web_top_k, fetch_pages, serper_base_url: web search (serper | ddgs); image_dir:
      where serper downloads image results ("" = keep their URLs only).
    summarizer_url, summarizer_model, summarizer_retries, summarizer_timeout_s: the
      OpenAI-compatible summariser of the fetched pages (serper; "" = off).
    timeout_s, max_retries, backoff_s: per request (web and service backends).
    cache_mode: off | read_write | replay.
  """

  backend: str
  method: str
  dense_model: str
  dense_prefixes: bool
  hybrid_alpha: float
  embedding_cache_dir: str
  service_url: str
  web_top_k: int
  fetch_pages: bool
  serper_base_url: str
  image_dir: str
  summarizer_url: str
  summarizer_model: str
  summarizer_retries: int
  summarizer_timeout_s: float
  timeout_s: float
  max_retries: int
  backoff_s: float
  cache_mode: str

  @classmethod
  def from_config(cls, search: Any) -> SearchConfig:
    """Every field from `config.search` (a ConfigDict)."""
    return cls(**{f.name: search[f.name] for f in dataclasses.fields(cls)})

  def call_budget_s(self) -> float:
    """The longest one tool call may legitimately take: the bridge's wall-clock limit.

    A web call can be a search request with its retries, then the result pages (fetched
    together), then the summariser with its own retries; an image search may try up to
    6 downloads one after another. Local and service calls keep twice the request timeout.
    """
    floor = 2 * self.timeout_s
    if self.backend not in ("serper", "ddgs"):
      return floor
    request = (self.max_retries + 1) * self.timeout_s + self.max_retries * self.backoff_s
    text = request + (self.timeout_s if self.fetch_pages else 0.0)
    if self.summarizer_url:
      text += (self.summarizer_retries + 1) * (self.summarizer_timeout_s + 1.0)
    image = request + 6 * self.timeout_s
    return max(floor, text, image)


def make_backend(
  settings: SearchConfig,
  *,
  text_corpus: str | os.PathLike | None = None,
  image_corpus: str | os.PathLike | None = None,
  images_dir: str | os.PathLike | None = None,
  cache_path: str | os.PathLike | None = None,
) -> results_lib.Backend:
  """The backend of `settings`, wrapped in the search cache at `cache_path` unless
  `settings.cache_mode` is off.

  Args:
    settings: the search settings (`SearchConfig.from_config(config.search)`).
    text_corpus, image_corpus, images_dir: the knowledge base (backend=local).
    cache_path: the SQLite search cache file (None = no cache).
  """
  c = settings
  kind = c.backend
  if kind == "local":
    if not text_corpus:
      raise ValueError("backend=local needs text_corpus (the knowledge base's text_corpus.jsonl).")
    backend = local_kb.LocalKnowledgeBase.from_files(
      text_corpus,
      image_corpus,
      images_dir,
      method=c.method,
      dense_model=c.dense_model or None,
      dense_prefixes=c.dense_prefixes,
      hybrid_alpha=c.hybrid_alpha,
      embedding_cache_dir=c.embedding_cache_dir or local_kb.DEFAULT_CACHE_DIR,
    )
  elif kind == "service":
    if not c.service_url:
      raise ValueError("search.backend=service needs search.service_url.")
    backend = service.RetrievalClient(
      c.service_url,
      timeout_s=c.timeout_s,
      max_retries=c.max_retries,
      backoff_s=c.backoff_s,
    )
  elif kind == "serper":
    summariser = None
    if c.summarizer_url or c.summarizer_model:
      summariser = web.Summariser(
        c.summarizer_url,
        c.summarizer_model,
        timeout_s=c.summarizer_timeout_s,
        max_retries=c.summarizer_retries,
      )
    backend = web.SerperBackend(
      base_url=c.serper_base_url,
      timeout_s=c.timeout_s,
      max_retries=c.max_retries,
      backoff_s=c.backoff_s,
      top_k=c.web_top_k or None,
      fetch_pages=c.fetch_pages,
      image_dir=c.image_dir or None,
      summariser=summariser,
    )
  elif kind == "ddgs":
    backend = web.DuckDuckGoBackend(
      timeout_s=c.timeout_s,
      max_retries=c.max_retries,
      backoff_s=c.backoff_s,
      top_k=c.web_top_k or None,
    )
  else:
    raise ValueError(f"Unknown search backend {kind!r}; expected one of {BACKENDS}.")
  if cache_path and c.cache_mode != "off":
    backend = cache_lib.CachedBackend(backend, cache_lib.SearchCache(cache_path), c.cache_mode)
  return backend
