"""Web search backends: Serper (Google) and DuckDuckGo, plus an optional summariser.

Official settings (SPEC §2.2): 30 s timeout, 2 retries with backoff on HTTP 429,
top-3 text results, the first valid of 6 image results. Every failure ends in a
`SearchError` with a short message; the bridge turns it into an error observation.
API keys come from the environment and never appear in messages or logs.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import pathlib
import time
import urllib.error
import urllib.request
from typing import Any

from segresearch_jax.search import results as results_lib

SERPER_URL = "https://google.serper.dev"
RETRY_STATUS = (429, 500, 502, 503, 504)


def post_json(
  url: str,
  body: dict[str, Any],
  *,
  headers: dict[str, str] | None = None,
  timeout_s: float = 30.0,
  max_retries: int = 2,
  backoff_s: float = 1.0,
) -> Any:
  """POSTs JSON and returns the decoded JSON answer, retrying transient failures.

  Retries (up to `max_retries` times, waiting backoff_s * 2**attempt, or the
  server's Retry-After when it sends one) on HTTP 429/5xx, timeouts and dropped
  connections. Other HTTP errors and malformed JSON fail at once.

  Raises:
    SearchError: naming the URL and the cause (never the headers, which hold keys).
  """
  data = json.dumps(body).encode()
  all_headers = {"Content-Type": "application/json", **(headers or {})}
  last_error = "no attempt"
  wait_s = None
  for attempt in range(max_retries + 1):
    if attempt:
      time.sleep(wait_s if wait_s is not None else backoff_s * 2 ** (attempt - 1))
    wait_s = None
    request = urllib.request.Request(url, data=data, headers=all_headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=timeout_s) as response:
        payload = response.read()
    except urllib.error.HTTPError as e:
      last_error = f"HTTP {e.code}"
      if e.code not in RETRY_STATUS:
        break
      retry_after = e.headers.get("Retry-After") if e.headers else None
      if retry_after and retry_after.strip().isdigit():
        wait_s = min(float(retry_after), 60.0)
      continue
    except (TimeoutError, OSError, http.client.HTTPException) as e:
      reason = getattr(e, "reason", e)
      last_error = "timeout" if isinstance(reason, TimeoutError) else type(reason).__name__
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


class Summariser:
  """Condenses search results for a query with an OpenAI-compatible chat endpoint.

  The official "web browsing" setting; reads `SUMM_MODEL_URL` and
  `SUMM_MODEL_PATH` (the served model's name) when not given.
  """

  def __init__(
    self,
    url: str | None = None,
    model: str | None = None,
    *,
    timeout_s: float = 60.0,
    max_retries: int = 1,
    max_tokens: int = 512,
  ):
    self.url = (url or os.environ.get("SUMM_MODEL_URL", "")).rstrip("/")
    self.model = model or os.environ.get("SUMM_MODEL_PATH", "")
    if not self.url or not self.model:
      raise ValueError("The summariser needs SUMM_MODEL_URL and SUMM_MODEL_PATH.")
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.max_tokens = max_tokens

  def summarise(self, query: str, text: str) -> str:
    """A short summary of `text` focused on what the query asks."""
    endpoint = (
      self.url if self.url.endswith("/chat/completions") else self.url + "/v1/chat/completions"
    )
    body = {
      "model": self.model,
      "max_tokens": self.max_tokens,
      "temperature": 0.0,
      "messages": [
        {
          "role": "system",
          "content": "Summarise the passages below, keeping only facts relevant to the query.",
        },
        {"role": "user", "content": f"Query: {query}\n\nPassages:\n{text}"},
      ],
    }
    answer = post_json(endpoint, body, timeout_s=self.timeout_s, max_retries=self.max_retries)
    try:
      return str(answer["choices"][0]["message"]["content"]).strip()
    except (KeyError, IndexError, TypeError) as e:
      raise results_lib.SearchError(f"Malformed summariser response from {endpoint}.") from e


def _image_is_valid(url: str, timeout_s: float, download_dir: pathlib.Path | None) -> str | None:
  """Downloads an image; returns its local path (or the URL) when PIL can read it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    request = urllib.request.Request(url, headers={"User-Agent": "Mozilla/5.0"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      data = response.read()
    Image.open(io.BytesIO(data)).verify()
  except Exception:  # pylint: disable=broad-except
    # Any unreadable image is simply skipped; the next candidate is tried.
    return None
  if download_dir is None:
    return url
  import hashlib  # pylint: disable=g-import-not-at-top

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
    image_candidates: int = 6,
    image_dir: str | os.PathLike | None = None,
    check_images: bool = True,
    summariser: Summariser | None = None,
  ):
    """Configures the client.

    Args:
      api_key: defaults to the SERPER_API_KEY environment variable.
      base_url: the API root (a fake server in tests).
      timeout_s: per request.
      max_retries: retries after the first attempt.
      backoff_s: first backoff wait, doubled per retry.
      hl: interface language.
      gl: country.
      image_candidates: image results requested; the first valid ones are kept.
      image_dir: where downloaded images are stored (None keeps URLs only).
      check_images: download each candidate and keep it only if it decodes.
      summariser: optional; condenses the text results into one document.
    """
    self._api_key = _api_key("SERPER_API_KEY", api_key)
    self.name = "serper"
    self.base_url = base_url.rstrip("/")
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.hl, self.gl = hl, gl
    self.image_candidates = image_candidates
    self.image_dir = None if image_dir is None else pathlib.Path(image_dir)
    self.check_images = check_images
    self.summariser = summariser

  def __repr__(self) -> str:  # Never show the key.
    return f"SerperBackend(base_url={self.base_url!r})"

  def _search(self, endpoint: str, query: str, num: int) -> dict:
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
    return answer

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    """The top-k organic results as (title, snippet)."""
    organic = self._search("search", query, max(k, 10)).get("organic", [])
    if not isinstance(organic, list):
      raise results_lib.SearchError("Malformed Serper response: 'organic' is not a list.")
    found = [
      results_lib.TextResult(str(r.get("title", "")), str(r.get("snippet", "")), -float(i))
      for i, r in enumerate(organic)
      if isinstance(r, dict) and (r.get("title") or r.get("snippet"))
    ][:k]
    if self.summariser is not None and found:
      joined = "\n".join(f"{r.title}: {r.text}" for r in found)
      return [results_lib.TextResult(query, self.summariser.summarise(query, joined), 0.0)]
    return found

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    """The first k valid images among `image_candidates` results."""
    images = self._search("images", query, self.image_candidates).get("images", [])
    if not isinstance(images, list):
      raise results_lib.SearchError("Malformed Serper response: 'images' is not a list.")
    found = []
    for i, r in enumerate(images[: self.image_candidates]):
      if not isinstance(r, dict) or not r.get("imageUrl"):
        continue
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
    return found


class DuckDuckGoBackend:
  """DuckDuckGo through the `ddgs` package (no API key)."""

  def __init__(self, *, timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 1.0):
    try:
      import ddgs  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("DuckDuckGo search needs the `ddgs` package: pip install ddgs") from e
    self._ddgs = ddgs
    self.name = "ddgs"
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s

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
    rows = self._with_retries(lambda d: list(d.text(query, max_results=k)))
    return [
      results_lib.TextResult(str(r.get("title", "")), str(r.get("body", "")), -float(i))
      for i, r in enumerate(rows)
    ][:k]

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    rows = self._with_retries(lambda d: list(d.images(query, max_results=max(k, 6))))
    return [
      results_lib.ImageResult(str(r.get("title", query)), None, str(r["image"]), -float(i))
      for i, r in enumerate(rows)
      if r.get("image")
    ][:k]
