"""The local knowledge base served over HTTP, and its client backend.

One retrieval process (on one host, or a CPU box next to the pod) holds the index
and the dense model; every training host or worker uses `RetrievalClient`, so the
index is not loaded once per host. Protocol: POST `/text_search` or
`/image_search` with `{"query": str, "k": int}` -> `{"results": [...]}`; GET
`/health` -> `{"backend": name}`. Errors come back as `{"error": message}` with an
HTTP 4xx/5xx status.

Run a server: `python -m segresearch_jax.search.service --text_corpus=... --port=8765`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import threading

from segresearch_jax.search import results as results_lib
from segresearch_jax.search import web

_TOOLS = ("text_search", "image_search")
_MAX_K = 100


class _Handler(http.server.BaseHTTPRequestHandler):
  server: RetrievalServer

  def log_message(self, fmt, *args):  # Per-request logs would flood training output.
    logging.debug("retrieval service: " + fmt, *args)

  def _reply(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):  # noqa: N802 (http.server naming)
    if self.path == "/health":
      self._reply(200, {"backend": self.server.backend.name})
    else:
      self._reply(404, {"error": f"Unknown path {self.path}."})

  def do_POST(self):  # noqa: N802
    tool = self.path.strip("/")
    if tool not in _TOOLS:
      self._reply(
        404, {"error": f"Unknown tool path {self.path}; use /text_search or /image_search."}
      )
      return
    try:
      length = int(self.headers.get("Content-Length", "0"))
      request = json.loads(self.rfile.read(length))
      query, k = request["query"], int(request.get("k", 1))
      if not isinstance(query, str) or not 1 <= k <= _MAX_K:
        raise ValueError
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
      self._reply(400, {"error": 'Body must be JSON {"query": str, "k": int in [1, 100]}.'})
      return
    try:
      found = getattr(self.server.backend, tool)(query, k)
    except results_lib.SearchError as e:
      self._reply(502, {"error": str(e)})
      return
    except Exception as e:  # pylint: disable=broad-except
      # The service must survive any backend bug; the client sees an error.
      logging.exception("retrieval service: %s failed", tool)
      self._reply(500, {"error": f"{type(e).__name__} in {tool}."})
      return
    self._reply(200, {"results": [r.to_json() for r in found]})


class RetrievalServer(http.server.ThreadingHTTPServer):
  """Serves a backend's `text_search` / `image_search` on (host, port).

  Use `start()` to serve from a daemon thread (tests, one-process setups) or
  `serve_forever()` in a dedicated process. Port 0 picks a free port (see `.url`).
  """

  daemon_threads = True

  def __init__(self, backend: results_lib.Backend, host: str = "127.0.0.1", port: int = 0):
    super().__init__((host, port), _Handler)
    self.backend = backend
    self._thread = None

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> RetrievalServer:
    self._thread = threading.Thread(target=self.serve_forever, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self.shutdown()
    self.server_close()
    if self._thread is not None:
      self._thread.join()


class RetrievalClient:
  """A backend that forwards calls to a `RetrievalServer`."""

  def __init__(
    self, url: str, *, timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 0.5
  ):
    self.url = url.rstrip("/")
    self.name = f"service:{self.url}"
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s

  def _call(self, tool: str, query: str, k: int) -> list[dict]:
    answer = web.post_json(
      f"{self.url}/{tool}",
      {"query": query, "k": int(k)},
      timeout_s=self.timeout_s,
      max_retries=self.max_retries,
      backoff_s=self.backoff_s,
    )
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
      raise results_lib.SearchError(f"Malformed answer from the retrieval service {self.url}.")
    return answer["results"]

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    return [results_lib.TextResult.from_json(r) for r in self._call("text_search", query, k)]

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    return [results_lib.ImageResult.from_json(r) for r in self._call("image_search", query, k)]


def main(argv: list[str] | None = None) -> None:
  """Serves a local knowledge base until interrupted."""
  from segresearch_jax.search import local_kb  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--text_corpus", required=True)
  parser.add_argument("--image_corpus", default=None)
  parser.add_argument("--images_dir", default=None)
  parser.add_argument("--method", default="dense", choices=local_kb.METHODS)
  parser.add_argument("--dense_model", default=None)
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8765)
  args = parser.parse_args(argv)
  kb = local_kb.LocalKnowledgeBase.from_files(
    args.text_corpus,
    args.image_corpus,
    args.images_dir,
    method=args.method,
    dense_model=args.dense_model,
  )
  server = RetrievalServer(kb, args.host, args.port)
  logging.warning("Retrieval service (%s) listening on %s", kb.name, server.url)
  try:
    server.serve_forever()
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
