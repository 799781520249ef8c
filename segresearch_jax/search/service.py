"""The local knowledge base served over HTTP, and its client backend.

One retrieval process (on one host, or a CPU box next to the pod) holds the index
and the dense model; every training host or worker uses `RetrievalClient`, so the
index is not loaded once per host. Protocol: POST `/text_search` or
`/image_search` with `{"query": str, "k": int}` -> `{"results": [...]}`; GET
`/health` -> `{"backend": name}` (plus `cache_identity` for an authorised caller).
Errors come back as `{"error": message}` with an HTTP 4xx/5xx status.

Hardening: the server binds 127.0.0.1 unless told otherwise; with a shared secret
(`SEGRESEARCH_SEARCH_TOKEN` in the server's and the clients' environment, never on a
command line) every search must carry it in the `X-Search-Token` header; request
bodies over `max_request_bytes` are refused with 413 before being read, and a body
must arrive within `read_timeout_s` as a whole (a client that promises more bytes
than it sends gets 408 instead of pinning a thread).

Run a server: `python -m segresearch_jax.search.service --text_corpus=... --port=8765`.
"""

from __future__ import annotations

import argparse
import hmac
import http.client
import http.server
import json
import logging
import os
import threading
import time

from segresearch_jax.search import results as results_lib
from segresearch_jax.search import web

_TOOLS = ("text_search", "image_search")
_MAX_K = 100
TOKEN_ENV = "SEGRESEARCH_SEARCH_TOKEN"
TOKEN_HEADER = "X-Search-Token"
# A query is at most 500 characters (docs/method.md §2.1); 64 KiB leaves room for any
# JSON escaping while a 50 MB body is refused unread.
MAX_REQUEST_BYTES = 64 << 10


class _Handler(http.server.BaseHTTPRequestHandler):
  server: RetrievalServer

  def setup(self):
    # Bounds each read of the request line and headers (the body has its own deadline).
    self.timeout = self.server.read_timeout_s
    super().setup()

  def log_message(self, fmt, *args):  # Per-request logs would flood training output.
    logging.debug("retrieval service: " + fmt, *args)

  def _reply(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    if status >= 400:
      self.send_header("Connection", "close")
      self.close_connection = True
    try:
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      # A client that gave up (or sent garbage and left) needs no answer.
      self.close_connection = True

  def _authorised(self) -> bool:
    token = self.server.token
    if not token:
      return True
    given = self.headers.get(TOKEN_HEADER, "")
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())

  def _read_body(self) -> bytes | None:
    """The request body, or None after replying 411/413/408 (too big, or too slow)."""
    length_header = self.headers.get("Content-Length")
    if length_header is None or not length_header.strip().isdigit():
      self._reply(411, {"error": "A Content-Length header is required."})
      return None
    length = int(length_header)
    if length > self.server.max_request_bytes:
      self._reply(413, {"error": f"Request body over {self.server.max_request_bytes} bytes."})
      return None
    deadline = time.monotonic() + self.server.read_timeout_s
    chunks, left = [], length
    try:
      while left > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          raise TimeoutError
        self.connection.settimeout(remaining)
        chunk = self.rfile.read1(left)
        if not chunk:
          break
        chunks.append(chunk)
        left -= len(chunk)
    except TimeoutError:
      self._reply(408, {"error": "Request body not received in time."})
      return None
    finally:
      self.connection.settimeout(self.server.read_timeout_s)
    if left:
      self.close_connection = True
      return None
    return b"".join(chunks)

  def do_GET(self):  # noqa: N802 (http.server naming)
    if self.path == "/health":
      answer = {"backend": self.server.backend.name}
      if self._authorised():
        answer["cache_identity"] = self.server.cache_identity
      self._reply(200, answer)
    else:
      self._reply(404, {"error": f"Unknown path {self.path}."})

  def do_POST(self):  # noqa: N802
    tool = self.path.strip("/")
    if tool not in _TOOLS:
      self._reply(
        404, {"error": f"Unknown tool path {self.path}; use /text_search or /image_search."}
      )
      return
    if not self._authorised():
      self._reply(401, {"error": f"Missing or wrong {TOKEN_HEADER} header."})
      return
    raw = self._read_body()
    if raw is None:
      return
    try:
      request = json.loads(raw)
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

  def __init__(
    self,
    backend: results_lib.Backend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    read_timeout_s: float = 10.0,
  ):
    """Binds the server (it serves after `start()` or `serve_forever()`).

    Args:
      backend: what answers the searches.
      host: the address to bind; 127.0.0.1 unless other hosts must reach it.
      port: 0 picks a free one.
      token: the shared secret every search must carry (None or "" = none).
      max_request_bytes: larger request bodies get 413 without being read.
      read_timeout_s: the whole request body must arrive within this time.
    """
    super().__init__((host, port), _Handler)
    self.backend = backend
    self.token = token or None
    self.max_request_bytes = max_request_bytes
    self.read_timeout_s = read_timeout_s
    self.cache_identity = str(getattr(backend, "cache_identity", None) or backend.name)
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
  """A backend that forwards calls to a `RetrievalServer`.

  The token defaults to `SEGRESEARCH_SEARCH_TOKEN` from the environment, so launchers
  pass it without a command line. `cache_identity` is the served KB's own (asked
  once from `/health`): a search cache in front of the client is keyed by the KB, not
  by the URL.
  """

  def __init__(
    self,
    url: str,
    *,
    timeout_s: float = 30.0,
    max_retries: int = 2,
    backoff_s: float = 0.5,
    token: str | None = None,
  ):
    self.url = url.rstrip("/")
    self.name = f"service:{self.url}"
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self._token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    self._identity: str | None = None

  def __repr__(self) -> str:  # Never show the token.
    return f"RetrievalClient(url={self.url!r})"

  def _headers(self) -> dict[str, str]:
    return {TOKEN_HEADER: self._token} if self._token else {}

  @property
  def cache_identity(self) -> str:
    """`service:<served KB identity>`, read from the server once.

    Raises:
      SearchError: the server does not answer or does not say (no identity is
        guessed: a wrong one would serve another KB's cached documents).
    """
    if self._identity is None:
      try:
        status, _, body = web.http_request(
          "GET", f"{self.url}/health", headers=self._headers(), timeout_s=self.timeout_s
        )
        identity = json.loads(body).get("cache_identity") if status == 200 else None
      except (OSError, ValueError, AttributeError, http.client.HTTPException) as e:
        raise results_lib.SearchError(f"Retrieval service {self.url} health failed.") from e
      if not isinstance(identity, str) or not identity:
        raise results_lib.SearchError(
          f"Retrieval service {self.url} did not give its cache identity (HTTP {status}); "
          f"is {TOKEN_ENV} the same on both sides?"
        )
      self._identity = f"service:{identity}"
    return self._identity

  def _call(self, tool: str, query: str, k: int) -> list[dict]:
    answer = web.post_json(
      f"{self.url}/{tool}",
      {"query": query, "k": int(k)},
      headers=self._headers(),
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


def build_parser() -> argparse.ArgumentParser:
  """The service's command line (the token is read from the environment, never here)."""
  from segresearch_jax.search import local_kb  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--text_corpus", required=True)
  parser.add_argument("--image_corpus", default=None)
  parser.add_argument("--images_dir", default=None)
  parser.add_argument("--method", default="dense", choices=local_kb.METHODS)
  parser.add_argument("--dense_model", default=None)
  parser.add_argument(
    "--dense_prefixes",
    action="store_true",
    help="Embed with the e5 `query: ` / `passage: ` prefixes (needs --dense_model).",
  )
  parser.add_argument(
    "--host",
    default="127.0.0.1",
    help="Address to bind; give an internal one only when other hosts must connect.",
  )
  parser.add_argument("--port", type=int, default=8765)
  parser.add_argument("--max_request_bytes", type=int, default=MAX_REQUEST_BYTES)
  return parser


def main(argv: list[str] | None = None) -> None:
  """Serves a local knowledge base until interrupted."""
  from segresearch_jax.search import local_kb  # pylint: disable=g-import-not-at-top

  args = build_parser().parse_args(argv)
  kb = local_kb.LocalKnowledgeBase.from_files(
    args.text_corpus,
    args.image_corpus,
    args.images_dir,
    method=args.method,
    dense_model=args.dense_model,
    dense_prefixes=args.dense_prefixes,
  )
  token = os.environ.get(TOKEN_ENV, "")
  server = RetrievalServer(
    kb, args.host, args.port, token=token, max_request_bytes=args.max_request_bytes
  )
  if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning(
      "Serving on %s without %s: anyone who can reach it may query.", args.host, TOKEN_ENV
    )
  logging.warning("Retrieval service (%s) listening on %s", kb.name, server.url)
  try:
    server.serve_forever()
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
