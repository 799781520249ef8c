"""Retrieval backends and the search cache.

results: result types, `SearchError`, the `Backend` interface.
local_kb: BM25 / dense / hybrid retrieval over the official-format local KB.
web: Serper and DuckDuckGo clients, the optional summariser.
service: the local KB served over HTTP, and its client backend.
cache: the persistent SQLite search cache (off / read_write / replay).
factory: `make_backend(SearchConfig.from_config(config.search), text_corpus=...)`.
"""
