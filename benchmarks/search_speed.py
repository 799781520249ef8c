"""Search speed on the official OK-VOS knowledge base.

    python benchmarks/search_speed.py [--kb ../shared/data/okvos_local_kb] [--batch 128] [--rounds 10]

1. Retrieval queries/s for BM25, dense (packaged MiniLM) and hybrid, one query at a
   time; baseline BM25.
2. Bridge round trip (`SearchBridge.observe`, what the rollout's one host callback
   runs) for a batch of `--batch` pending text_search calls against the dense local KB: cold (empty search cache, every call goes to
   the retriever and is stored) vs cached (the same calls replayed from SQLite).
   Reports p50/p99 of the whole batch round trip and of single calls; baseline cold.
3. Hostile peers, each measured until the call returns: a 50 MB query to the search
   service (refused with 413 before the body is read), a request whose
   Content-Length promises more than it sends (408 after the 10 s read timeout),
   and a server that drips its answer one byte every 125 ms to a client with a 2 s
   timeout (the timeout bounds the whole call).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import tempfile
import time

import numpy as np

from segresearch_jax import protocol
from segresearch_jax.agent import bridge as bridge_lib
from segresearch_jax.search import cache as cache_lib
from segresearch_jax.search import local_kb

DEFAULT_KB = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "okvos_local_kb"


class ByteTokenizer:
  """Byte ids plus the Qwen special strings; used when no real tokenizer is available."""

  def __init__(self):
    self.specials = {s: 256 + i for i, s in enumerate(protocol.SPECIAL_TOKENS)}
    self.by_id = {v: k for k, v in self.specials.items()}
    self.vocab_size = 256 + len(self.specials)
    self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")")

  def encode(self, text):
    ids = []
    for piece in self._split.split(text):
      ids += [self.specials[piece]] if piece in self.specials else list(piece.encode())
    return ids

  def decode(self, ids, skip_special_tokens=False):
    out = bytearray()
    for i in ids:
      if i in self.by_id:
        out += b"" if skip_special_tokens else self.by_id[i].encode()
      else:
        out.append(i)
    return out.decode(errors="replace")

  def token_to_id(self, s):
    return self.specials[s]


def _tokenizer():
  try:
    from segresearch_jax.models import tokenizer  # pylint: disable=g-import-not-at-top

    return tokenizer.embedded_tokenizer(), "embedded Qwen"
  except (ImportError, AttributeError):
    return ByteTokenizer(), "byte fallback"


def _queries(kb_dir: pathlib.Path, n: int) -> list[str]:
  titles = [
    protocol.split_document(r["contents"])[0]
    for r in local_kb.read_jsonl(kb_dir / "text_corpus.jsonl", ("contents",))
  ]
  return [f"who is {titles[i % len(titles)]} ({i})" for i in range(n)]


def retrieval_qps(kb_dir: pathlib.Path, n: int, cache_dir: str) -> dict[str, float]:
  """Single-query throughput per retrieval method."""
  queries = _queries(kb_dir, n)
  out = {}
  for method in local_kb.METHODS:
    kb = local_kb.LocalKnowledgeBase.from_files(
      kb_dir / "text_corpus.jsonl", method=method, embedding_cache_dir=cache_dir
    )
    kb.text_search(queries[0], 2)  # warm-up
    start = time.perf_counter()
    for q in queries:
      kb.text_search(q, 2)
    out[method] = n / (time.perf_counter() - start)
  return out


def bridge_round_trip(kb_dir, batch, rounds, cache_dir):
  """(batch p50, batch p99, call p50, call p99) in ms for cold and cached search."""
  kb = local_kb.LocalKnowledgeBase.from_files(
    kb_dir / "text_corpus.jsonl", method="dense", embedding_cache_dir=cache_dir
  )
  tok, tok_name = _tokenizer()
  store = cache_lib.SearchCache(pathlib.Path(cache_dir) / "search.db")
  backend = cache_lib.CachedBackend(kb, store, "read_write")
  bridge = bridge_lib.SearchBridge(backend, tok, max_obs_length=2048, num_threads=16)
  width = 512
  # One round with nothing pending first, so no measured round pays for start-up.
  idle = (np.zeros(batch, bool), np.zeros((batch, width), np.int32), np.zeros(batch, np.int32))
  bridge.observe(*idle, np.arange(batch))
  results = {}
  for phase in ("cold", "cached"):
    batch_ms, call_ms = [], []
    for r in range(rounds):
      actions = [
        f'<search> {{"name": "text_search", "query": "{q}"}} </search>'
        for q in _queries(kb_dir, batch * rounds)[r * batch : (r + 1) * batch]
      ]
      ids = np.zeros((batch, width), np.int32)
      lengths = np.zeros((batch,), np.int32)
      for i, a in enumerate(actions):
        enc = tok.encode(a)[:width]
        ids[i, : len(enc)], lengths[i] = enc, len(enc)
      start = time.perf_counter()
      out = bridge.observe(np.ones(batch, bool), ids, lengths, np.arange(batch))
      batch_ms.append(1e3 * (time.perf_counter() - start))
      records = bridge.pop_records()
      call_ms += [1e3 * rec.latency_s for rec in records]
      failed = [rec for rec in records if rec.error]
      if failed or not np.asarray(out.valid).all():
        raise RuntimeError(f"Benchmark calls failed: {failed[:2]}")
    results[phase] = (
      np.percentile(batch_ms, 50),
      np.percentile(batch_ms, 99),
      np.percentile(call_ms, 50),
      np.percentile(call_ms, 99),
    )
  results["hits"] = backend.hits
  results["tokenizer"] = tok_name
  return results


def hostile_peers(kb_dir: pathlib.Path) -> dict[str, tuple[float, str]]:
  """Seconds until each hostile case returns, and what it returned."""
  import socket  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  from segresearch_jax.search import results as results_lib  # pylint: disable=g-import-not-at-top
  from segresearch_jax.search import service, web  # pylint: disable=g-import-not-at-top

  out = {}
  kb = local_kb.LocalKnowledgeBase.from_files(kb_dir / "text_corpus.jsonl", method="bm25")
  server = service.RetrievalServer(kb).start()
  try:
    client = service.RetrievalClient(server.url, max_retries=0)
    start = time.perf_counter()
    try:
      client.text_search("x" * (50 << 20), 1)
      outcome = "answered"
    except results_lib.SearchError as e:
      outcome = str(e).rsplit(": ", 1)[-1]
    out["50 MB query"] = (time.perf_counter() - start, outcome)
    with socket.create_connection(server.server_address[:2]) as sock:
      start = time.perf_counter()
      sock.sendall(b"POST /text_search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
      status = sock.recv(100).split(b"\r\n")[0].decode()
      out["lying Content-Length"] = (time.perf_counter() - start, status)
  finally:
    server.stop()

  listener = socket.create_server(("127.0.0.1", 0))

  def drip():
    conn, _ = listener.accept()
    with conn:
      conn.recv(65536)
      conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
      for _ in range(400):  # 50 s of answer unless the client hangs up.
        try:
          conn.sendall(b"1")
        except OSError:
          break
        time.sleep(0.125)

  threading.Thread(target=drip, daemon=True).start()
  start = time.perf_counter()
  try:
    web.post_json(
      f"http://127.0.0.1:{listener.getsockname()[1]}/", {}, timeout_s=2.0, max_retries=0
    )
    outcome = "answered"
  except results_lib.SearchError as e:
    outcome = str(e).rsplit(": ", 1)[-1]
  out["slow drip, 2 s timeout"] = (time.perf_counter() - start, outcome)
  listener.close()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kb", type=pathlib.Path, default=DEFAULT_KB)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--queries", type=int, default=200)
  args = parser.parse_args()
  if not (args.kb / "text_corpus.jsonl").is_file():
    raise SystemExit(f"Knowledge base not found: {args.kb}/text_corpus.jsonl")
  with tempfile.TemporaryDirectory() as tmp:
    qps = retrieval_qps(args.kb, args.queries, tmp)
    rt = bridge_round_trip(args.kb, args.batch, args.rounds, tmp)

  print(f"\nRetrieval on {args.kb.name} ({args.queries} single queries, top-2)")
  print(f"{'method':<8} {'queries/s':>10} {'vs bm25':>8}")
  for method, value in qps.items():
    print(f"{method:<8} {value:>10.1f} {value / qps['bm25']:>7.2f}x")

  print(
    f"\nBridge round trip (host side), batch {args.batch} text_search, "
    f"dense KB, {args.rounds} rounds, tokenizer: {rt['tokenizer']}"
  )
  print(
    f"{'search':<8} {'batch p50 ms':>13} {'batch p99 ms':>13} {'call p50 ms':>12} {'call p99 ms':>12} {'p50 speedup':>12}"
  )
  for phase in ("cold", "cached"):
    b50, b99, c50, c99 = rt[phase]
    print(
      f"{phase:<8} {b50:>13.1f} {b99:>13.1f} {c50:>12.2f} {c99:>12.2f} {rt['cold'][0] / b50:>11.1f}x"
    )
  print(f"cache hits in the cached phase: {rt['hits']}")

  print("\nHostile peers (time until the call returns)")
  for case, (seconds, outcome) in hostile_peers(args.kb).items():
    print(f"{case:<24} {seconds:>7.2f} s  {outcome}")


if __name__ == "__main__":
  main()
