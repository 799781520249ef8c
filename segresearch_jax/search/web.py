"""Web search backends: Serper (Google) and DuckDuckGo, plus the optional summariser.

Official settings (docs/method.md §2.2): 30 s timeout, 2 retries with backoff on
HTTP 429, top-3 text results, the first valid of 6 image results. Serper with page
processing on (the official default) fetches each result page, keeps the text around
the sentence that best matches the result's snippet, and returns the three pages as
one document cut to 960 characters; with the summariser (the official "web
browsing") an OpenAI-compatible chat model condenses the pages for the query
instead. Every failure ends in a `SearchError` with a short message; the bridge turns
it into an error observation. API keys come from the environment and never appear in
messages or logs.

Every request is bounded as a whole by its timeout (connect, headers and body
together), not per socket read, so a server that drips bytes cannot hold a call.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import html.parser
import http.client
import io
import json
import logging
import os
import pathlib
import re
import socket
import string
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

from segresearch_jax.search import results as results_lib

SERPER_URL = "https://google.serper.dev"
RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_RESPONSE_BYTES = 8 << 20  # An API answer, a page or an image; more is refused.
WEB_TOP_K = 3  # Official text results per web search.
PAGE_CONTEXT_CHARS = 320  # Official context each side of the best sentence (no summariser).
SUMMARY_CONTEXT_CHARS = 3000  # The same with the summariser, which reads longer pages.
MAX_PAGE_CHARS = 50_000  # Of each fetched page's text, as official.
_REDIRECTS = (301, 302, 303, 307, 308)


class _Deadline:
  """Shuts a connection's socket down when the whole request's time is up."""

  def __init__(self, conn: http.client.HTTPConnection, seconds: float):
    self.fired = False
    self._conn = conn
    self._timer = threading.Timer(max(seconds, 0.0), self._fire)
    self._timer.daemon = True
    self._timer.start()

  def _fire(self) -> None:
    self.fired = True
    sock = self._conn.sock
    if sock is not None:
      try:
        sock.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def cancel(self) -> None:
    self._timer.cancel()


def _connection(
  parts: urllib.parse.SplitResult, timeout_s: float
) -> tuple[http.client.HTTPConnection, str]:
  """A connection for the URL and the request target, through the environment's proxy.

  Honours `https_proxy` / `http_proxy` / `no_proxy` as urllib does (an HTTPS URL is
  tunnelled with CONNECT; an HTTP one is sent to the proxy in absolute form).
  """
  https = parts.scheme == "https"
  target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if https:
      conn = http.client.HTTPSConnection(via.hostname, via.port or 8080, timeout=timeout_s)
      conn.set_tunnel(parts.hostname, parts.port or 443)
      return conn, target
    conn = http.client.HTTPConnection(via.hostname, via.port or 8080, timeout=timeout_s)
    return conn, urllib.parse.urlunsplit(parts._replace(fragment=""))
  conn_cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
  return conn_cls(parts.hostname, parts.port, timeout=timeout_s), target


def http_request(
  method: str,
  url: str,
  *,
  data: bytes | None = None,
  headers: dict[str, str] | None = None,
  timeout_s: float = 30.0,
  max_bytes: int = MAX_RESPONSE_BYTES,
  max_redirects: int = 5,
) -> tuple[int, http.client.HTTPMessage, bytes]:
  """One HTTP(S) request whose total time (redirects included) is at most `timeout_s`.

  Returns:
    (status, headers, body) of the final response, whatever its status.

  Raises:
    TimeoutError: the deadline passed.
    OSError, http.client.HTTPException: connection failures.
    ValueError: a URL that is not http(s), too many redirects, or a body over
      `max_bytes`.
  """
  deadline = time.monotonic() + timeout_s
  for _ in range(max_redirects + 1):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise ValueError(f"Not an http(s) URL: {url[:200]!r}.")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise TimeoutError("deadline passed")
    conn, target = _connection(parts, remaining)
    guard = _Deadline(conn, remaining)
    try:
      conn.request(method, target, body=data, headers=headers or {})
      response = conn.getresponse()
      location = response.getheader("Location")
      if response.status in _REDIRECTS and location:
        url = urllib.parse.urljoin(url, location)
        if urllib.parse.urlsplit(url).netloc != parts.netloc:
          # Another host never gets this one's credentials (an API key header).
          headers = {k: v for k, v in (headers or {}).items() if k.lower() == "user-agent"}
        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
          method, data = "GET", None
        continue
      body = response.read(max_bytes + 1)
      if guard.fired:
        raise TimeoutError("deadline passed")
      if len(body) > max_bytes:
        raise ValueError(f"Response larger than {max_bytes} bytes.")
      return response.status, response.headers, body
    except (OSError, http.client.HTTPException) as e:
      if guard.fired:
        raise TimeoutError("deadline passed") from e
      raise
    finally:
      guard.cancel()
      conn.close()
  raise ValueError(f"More than {max_redirects} redirects.")


def post_json(
  url: str,
  body: dict[str, Any],
  *,
  headers: dict[str, str] | None = None,
  timeout_s: float = 30.0,
  max_retries: int = 2,
  backoff_s: float = 1.0,
  max_backoff_s: float = 60.0,
) -> Any:
  """POSTs JSON and returns the decoded JSON answer, retrying transient failures.

  Each attempt is bounded as a whole by `timeout_s`. Retries (up to `max_retries`
  times, waiting min(backoff_s * 2**attempt, max_backoff_s), or the server's
  Retry-After when it sends one) on HTTP 429/5xx, timeouts and dropped connections.
  Other HTTP errors and malformed JSON fail at once.

  Raises:
    SearchError: naming the URL and the cause (never the headers, which hold keys).
  """
  data = json.dumps(body).encode()
  all_headers = {"Content-Type": "application/json", **(headers or {})}
  last_error = "no attempt"
  wait_s = None
  for attempt in range(max_retries + 1):
    if attempt:
      backoff = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
      time.sleep(wait_s if wait_s is not None else backoff)
    wait_s = None
    try:
      status, response_headers, payload = http_request(
        "POST", url, data=data, headers=all_headers, timeout_s=timeout_s
      )
    except TimeoutError:
      last_error = "timeout"
      continue
    except ValueError as e:
      raise results_lib.SearchError(f"Request to {url} failed: {e}") from e
    except (OSError, http.client.HTTPException) as e:
      last_error = type(e).__name__
      continue
    if status >= 400:
      last_error = f"HTTP {status}"
      if status not in RETRY_STATUS:
        break
      retry_after = response_headers.get("Retry-After")
      if retry_after and retry_after.strip().isdigit():
        wait_s = min(float(retry_after), 60.0)
      continue
    try:
      return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise results_lib.SearchError(f"Malformed JSON from {url}.") from e
  raise results_lib.SearchError(
    f"Request to {url} failed after {attempt + 1} attempt(s): {last_error}."
  )


def _api_key(env_var: str, explicit: str | None) -> str:
  key = explicit or os.environ.get(env_var)
  if not key:
    raise ValueError(f"Web search needs an API key: set the {env_var} environment variable.")
  return key


def cut(text: str, limit: int) -> str:
  """`text` when it fits in `limit` characters, else its first limit-1 and `…`."""
  return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------
# Page processing: the text around the sentence that best matches the snippet.
# ----------------------------------------------------------------------------


class _TextExtractor(html.parser.HTMLParser):
  """Visible text of an HTML page, pieces joined by single spaces."""

  _SKIP = {"script", "style", "noscript", "template", "head"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skipping = 0

  def handle_starttag(self, tag, attrs):
    if tag in self._SKIP:
      self._skipping += 1

  def handle_endtag(self, tag):
    if tag in self._SKIP and self._skipping:
      self._skipping -= 1

  def handle_data(self, data):
    if not self._skipping and data.strip():
      self.parts.append(data.strip())


def page_text(body: bytes, content_type: str = "") -> str:
  """The readable text of a fetched page (HTML tags dropped; plain text kept)."""
  charset = "utf-8"
  match = re.search(r"charset=([\w-]+)", content_type or "", re.IGNORECASE)
  if match:
    charset = match.group(1)
  try:
    text = body.decode(charset, errors="replace")
  except LookupError:
    text = body.decode("utf-8", errors="replace")
  if "html" not in (content_type or "").lower() and "<" not in text[:1000]:
    return " ".join(text.split())
  parser = _TextExtractor()
  parser.feed(text)
  parser.close()
  return " ".join(parser.parts)


_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _words(text: str) -> set[str]:
  return set(text.lower().translate(_PUNCTUATION).split())


def snippet_context(full_text: str, snippet: str, context_chars: int) -> tuple[bool, str]:
  """The best-matching sentence of `full_text` with `context_chars` either side.

  The sentence whose word set has the highest F1 with the snippet's (above 0.2)
  wins, as officially; sentences are split at `.`, `!` or `?` followed by space
  (the official code uses nltk's tokenizer, not available offline here).

  Returns:
    (True, context) on a match; (False, the page's first 2 * context_chars
    characters) otherwise.
  """
  full_text = full_text[:MAX_PAGE_CHARS]
  snippet_words = _words(snippet)
  best_f1, best_start, best_end = 0.2, -1, -1
  position = 0
  for sentence in _SENTENCE_END.split(full_text):
    start = full_text.find(sentence, position)
    position = max(position, start + len(sentence)) if start >= 0 else position
    sentence_words = _words(sentence)
    common = len(snippet_words & sentence_words)
    if not common:
      continue
    precision, recall = common / len(sentence_words), common / len(snippet_words)
    f1 = 2 * precision * recall / (precision + recall)
    if f1 > best_f1:
      best_f1, best_start, best_end = f1, start, start + len(sentence)
  if best_start < 0:
    return False, full_text[: 2 * context_chars]
  lo, hi = max(0, best_start - context_chars), min(len(full_text), best_end + context_chars)
  return True, full_text[lo:hi]


def _fetch_page(url: str, timeout_s: float) -> str:
  status, headers, body = http_request(
    "GET", url, headers={"User-Agent": "Mozilla/5.0"}, timeout_s=timeout_s
  )
  if status >= 400:
    raise OSError(f"HTTP {status}")
  return page_text(body, headers.get("Content-Type", ""))


# ----------------------------------------------------------------------------
# The summariser (official "web browsing").
# ----------------------------------------------------------------------------

_SUMMARY_MARKER = "**Final Information**"


def summary_prompt(query: str, pages: str, previous_steps: str = "") -> str:
  """The extraction instruction the summariser model gets (official wording's content)."""
  return (
    "Role\nYou are a strict information extractor for a reasoning agent.\n\n"
    "# Task \nAnalyze the <searched_web_pages> to find specific evidence that answers "
    "the <current_search_query>.\n\n"
    "# Constraints\n"
    "1. Read the web pages and formulate a clear, concise, and direct answer to the "
    "<current_search_query>.\n"
    "2. Your answer must be based *only* on the <searched_web_pages>. Do not use outside "
    "knowledge.\n"
    '3. If the pages contain no relevant info, output "No helpful information found."\n\n'
    "# Output Format\nYou must output the answer inside the following block:\n"
    f"{_SUMMARY_MARKER}: Your synthesized answer here\n\n---\n**Input Data:**\n\n"
    f"<Previous Reasoning Steps> (For context only):\n{previous_steps}\n\n"
    f"<Current Search Query> (The question you need to answer):\n{query}\n\n"
    f"<Searched Web Pages> (The source material):\n{pages}\n"
  )


class Summariser:
  """Condenses fetched pages for a query with an OpenAI-compatible chat endpoint.

  The official "web browsing" setting: temperature 0.6, top_p 0.95, up to 8192
  new tokens, retried up to 10 times one second apart. Reads `SUMM_MODEL_URL` and
  `SUMM_MODEL_PATH` (the served model's name) when not given.
  """

  def __init__(
    self,
    url: str | None = None,
    model: str | None = None,
    *,
    timeout_s: float = 60.0,
    max_retries: int = 10,
    backoff_s: float = 1.0,
    max_tokens: int = 8192,
    temperature: float = 0.6,
    top_p: float = 0.95,
  ):
    self.url = (url or os.environ.get("SUMM_MODEL_URL", "")).rstrip("/")
    self.model = model or os.environ.get("SUMM_MODEL_PATH", "")
    if not self.url or not self.model:
      raise ValueError(
        "The summariser needs an endpoint and a model: set search.summarizer_url and "
        "search.summarizer_model (or SUMM_MODEL_URL and SUMM_MODEL_PATH)."
      )
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_tokens = max_tokens
    self.temperature = temperature
    self.top_p = top_p

  @property
  def endpoint(self) -> str:
    if self.url.endswith("/chat/completions"):
      return self.url
    return self.url + ("/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions")

  @property
  def cache_identity(self) -> str:
    return f"{self.endpoint}|{self.model}|{self.temperature}|{self.top_p}|{self.max_tokens}"

  def summarise(self, query: str, pages: str) -> str:
    """What the pages say about the query: the model's text after its marker."""
    body = {
      "model": self.model,
      "max_tokens": self.max_tokens,
      "temperature": self.temperature,
      "top_p": self.top_p,
      "messages": [{"role": "user", "content": summary_prompt(query, pages)}],
    }
    answer = post_json(
      self.endpoint,
      body,
      timeout_s=self.timeout_s,
      max_retries=self.max_retries,
      backoff_s=self.backoff_s,
      max_backoff_s=self.backoff_s,
    )
    try:
      text = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
      raise results_lib.SearchError(f"Malformed summariser response from {self.endpoint}.") from e
    if not isinstance(text, str) or not text.strip():
      raise results_lib.SearchError(f"Empty summariser response from {self.endpoint}.")
    if _SUMMARY_MARKER in text:
      # As officially: the text after the last marker (its ": " kept), newlines dropped.
      return text.split(_SUMMARY_MARKER)[-1].replace("\n", "").strip("`").strip()
    return text


# ----------------------------------------------------------------------------
# Serper.
# ----------------------------------------------------------------------------


def _image_is_valid(url: str, timeout_s: float, download_dir: pathlib.Path | None) -> str | None:
  """Downloads an image; returns its local path (or the URL) when PIL can read it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    status, _, data = http_request(
      "GET", url, headers={"User-Agent": "Mozilla/5.0"}, timeout_s=timeout_s
    )
    if status >= 400:
      return None
    Image.open(io.BytesIO(data)).verify()
  except Exception:  # pylint: disable=broad-except
    # Any unreadable image is simply skipped; the next candidate is tried.
    return None
  if download_dir is None:
    return url
  download_dir.mkdir(parents=True, exist_ok=True)
  path = download_dir / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".img")
  path.write_bytes(data)
  return str(path)


class SerperBackend:
  """Google search through serper.dev: POST `/search` and `/images`."""

  def __init__(
    self,
    api_key: str | None = None,
    *,
    base_url: str = SERPER_URL,
    timeout_s: float = 30.0,
    max_retries: int = 2,
    backoff_s: float = 1.0,
    hl: str = "en",
    gl: str = "us",
    top_k: int | None = WEB_TOP_K,
    fetch_pages: bool = True,
    image_candidates: int = 6,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    summariser: Summariser | None = None,
  ):
    """Configures the client.

    Args:
      api_key: defaults to the SERPER_API_KEY environment variable.
      base_url: the API root (a fake server in tests).
      timeout_s: bound on each request as a whole.
      max_retries: retries after the first attempt.
      backoff_s: first backoff wait, doubled per retry.
      hl: interface language.
      gl: country.
      top_k: text results per search (official 3) whatever the caller asks; None
        follows the caller's k.
      fetch_pages: fetch each result page and answer with the context around its
        best-matching sentence (official); False answers with Serper's snippets.
      image_candidates: image results requested; the first valid ones are kept.
      image_dir: where downloaded images are stored (None keeps URLs only).
      check_images: download each candidate and keep it only if it decodes.
      summariser: optional; condenses the fetched pages into one answer (needs
        fetch_pages).
    """
    if summariser is not None and not fetch_pages:
      raise ValueError("The summariser reads fetched pages: it needs fetch_pages=True.")
    self._api_key = _api_key("SERPER_API_KEY", api_key)
    self.name = "serper"
    self.base_url = base_url.rstrip("/")
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.hl, self.gl = hl, gl
    self.top_k = top_k
    self.fetch_pages = fetch_pages
    self.image_candidates = image_candidates
    self.image_dir = None if image_dir is None else pathlib.Path(image_dir)
    self.check_images = check_images
    self.summariser = summariser
    summary = self.summariser.cache_identity if self.summariser is not None else ""
    self.cache_identity = (
      f"serper|{self.base_url}|{hl}|{gl}|top{top_k}|pages{int(fetch_pages)}|{summary}"
    )

  def __repr__(self) -> str:  # Never show the key.
    return f"SerperBackend(base_url={self.base_url!r})"

  def _search(self, endpoint: str, query: str, num: int, key: str) -> list:
    answer = post_json(
      f"{self.base_url}/{endpoint}",
      {"q": query, "hl": self.hl, "gl": self.gl, "num": num},
      headers={"X-API-KEY": self._api_key},
      timeout_s=self.timeout_s,
      max_retries=self.max_retries,
      backoff_s=self.backoff_s,
    )
    if not isinstance(answer, dict):
      raise results_lib.SearchError(f"Malformed Serper response from /{endpoint}.")
    if key not in answer:
      # Serper reports some failures (no credits, a bad key) as a 200 with a message.
      message = answer.get("message") or answer.get("error")
      if message:
        raise results_lib.SearchError(f"Serper error from /{endpoint}: {str(message)[:200]}")
      return []
    found = answer[key]
    if not isinstance(found, list):
      raise results_lib.SearchError(f"Malformed Serper response: {key!r} is not a list.")
    return found

  def _page_document(self, organic: list[dict], context_chars: int) -> str:
    """The official page-processing document: one JSON block per result page."""
    infos = [
      {
        "id": i + 1,
        "title": str(r.get("title", "")),
        "url": str(r.get("link", "")),
        "site_name": urllib.parse.urlsplit(str(r.get("link", ""))).netloc,
        "date": str(r.get("date", "")),
        "snippet": str(r.get("snippet", "")),
        "context": "",
      }
      for i, r in enumerate(organic)
    ]

    def fill(info: dict) -> None:
      try:
        text = _fetch_page(info["url"], self.timeout_s)
      except Exception as e:  # pylint: disable=broad-except
        # A dead page is reported inside the document, as officially; the rest stay.
        info["context"] = f"Failed to fetch content: {type(e).__name__}"
        return
      found, context = snippet_context(text, info["snippet"], context_chars)
      if found:
        info["context"] = context
      else:
        info["context"] = (
          f"Could not extract context. First {context_chars} chars: {text[:context_chars]}"
        )

    with concurrent.futures.ThreadPoolExecutor(max(1, len(infos))) as pool:
      list(pool.map(fill, infos))
    return "".join(
      f"**Web Page {i + 1}:**\n" + json.dumps(info, ensure_ascii=False, indent=2) + "\n"
      for i, info in enumerate(infos)
    )

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    """The top results: snippets, or (fetch_pages) one document built from the pages."""
    top_k = self.top_k or k
    organic = [
      r
      for r in self._search("search", query, top_k, "organic")
      if isinstance(r, dict) and (r.get("title") or r.get("snippet"))
    ][:top_k]
    if not organic:
      return []
    limit = PAGE_CONTEXT_CHARS * top_k  # 960 with the official top-3.
    if self.fetch_pages:
      if self.summariser is not None:
        pages = self._page_document(organic, SUMMARY_CONTEXT_CHARS)
        text = cut(self.summariser.summarise(query, pages), limit)
      else:
        text = cut(self._page_document(organic, PAGE_CONTEXT_CHARS), limit)
      return [results_lib.TextResult(query, text, 0.0, preformatted=True)]
    found, seen = [], set()
    for i, r in enumerate(organic):
      snippet = str(r.get("snippet", r.get("description", ""))).strip()
      if snippet and snippet in seen:  # Officially, a repeated snippet is listed once.
        continue
      seen.add(snippet)
      found.append(results_lib.TextResult(str(r.get("title", "")).strip(), snippet, -float(i)))
    return found

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    """The first k valid images among `image_candidates` results.

    Raises:
      SearchError: when there were candidates but none could be downloaded (often
        momentary: it must not be remembered as "no image").
    """
    images = self._search("images", query, self.image_candidates, "images")
    found, candidates = [], 0
    for i, r in enumerate(images[: self.image_candidates]):
      if not isinstance(r, dict) or not r.get("imageUrl"):
        continue
      candidates += 1
      url = str(r["imageUrl"])
      local = url
      if self.check_images:
        local = _image_is_valid(url, self.timeout_s, self.image_dir)
        if local is None:
          continue
      path = local if local != url else None
      found.append(results_lib.ImageResult(str(r.get("title", query)), path, url, -float(i)))
      if len(found) == k:
        break
    if candidates and not found:
      raise results_lib.SearchError(f"None of {candidates} image results could be downloaded.")
    return found


class DuckDuckGoBackend:
  """DuckDuckGo through the `ddgs` package (no API key); official top-3 text results."""

  def __init__(
    self,
    *,
    timeout_s: float = 30.0,
    max_retries: int = 2,
    backoff_s: float = 1.0,
    top_k: int | None = WEB_TOP_K,
  ):
    try:
      import ddgs  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("DuckDuckGo search needs the `ddgs` package: pip install ddgs") from e
    self._ddgs = ddgs
    self.name = "ddgs"
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.top_k = top_k
    self.cache_identity = f"ddgs|top{top_k}"

  def _with_retries(self, fn):
    last = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      try:
        return fn(self._ddgs.DDGS(timeout=int(self.timeout_s)))
      except Exception as e:  # pylint: disable=broad-except
        # ddgs raises its own exception types (rate limit, timeout); all retry.
        last = e
        logging.info("ddgs attempt %d failed: %s", attempt + 1, type(e).__name__)
    raise results_lib.SearchError(f"DuckDuckGo search failed: {type(last).__name__}.")

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    top_k = self.top_k or k
    rows = self._with_retries(lambda d: list(d.text(query, max_results=top_k)))
    return [
      results_lib.TextResult(str(r.get("title", "")), str(r.get("body", "")), -float(i))
      for i, r in enumerate(rows)
    ][:top_k]

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    rows = self._with_retries(lambda d: list(d.images(query, max_results=max(k, 6))))
    return [
      results_lib.ImageResult(str(r.get("title", query)), None, str(r["image"]), -float(i))
      for i, r in enumerate(rows)
      if r.get("image")
    ][:k]
