"""The host callback bridge: the only crossing from the jitted rollout to the tools.

The rollout runs inside `jax.jit` (a `lax.while_loop` over turns); search runs on
the host. Once a turn, the rollout's one `io_callback` (`rollout.bridge_host_fn`)
hands every sequence's action tokens to `SearchBridge.observe`, which decodes each
pending action, parses it (docs/method.md §1), runs the tool calls
concurrently in a thread pool, formats the observation (docs/method.md §1.3), tokenises it
wrapped in the chat turn, expands its image placeholder and pads everything back to
fixed shapes. Every failure (malformed action, unknown tool, keyframe not shown,
timeout, backend error) becomes a short error observation and a counter; nothing
raises into jitted code. Every call is recorded for the trajectory records.

Shapes (B = batch rows, A = padded action length, L = max_obs_length):
  in:  pending bool[B], action_tokens int32[B, A], action_lengths int32[B],
       row_ids int32[B] (index into the shown frames set by `set_shown_frames`).
  out: `BridgeOutput` below.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from segresearch_jax import protocol
from segresearch_jax.search import results as results_lib


class Tokenizer(Protocol):
  """The run's tokenizer (segresearch_jax.models.tokenizer implements it)."""

  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

  def token_to_id(self, s: str) -> int: ...


class BridgeOutput(NamedTuple):
  """What one bridge call returns, per row (numpy arrays).

  Attributes:
    obs_tokens: int32[B, L] the wrapped observation
      `<|im_end|>\\n<|im_start|>user\\n{obs}<|im_end|>\\n<|im_start|>assistant\\n`
      with image pad runs expanded, right-padded with `pad_id`.
    obs_lengths: int32[B] tokens used in obs_tokens; 0 for rows not pending.
    image_slot: int32[B] -1 when the observation has no image; for a keyframe the
      index of that frame among the row's shown frames; for an image_search result
      the index of the (first) returned image in `SearchBridge.image_buffer`
      (several images take consecutive slots).
    image_kind: int32[B] protocol.NO_IMAGE, KEYFRAME_IMAGE or SEARCH_IMAGE.
    image_pixels: uint8[B, S, S, 3] the first image_search result resized to
      `search_image_size` (zeros otherwise), so the rollout can embed it.
    valid: bool[B] the action ran and returned a real observation (False for
      rows not pending and for error observations).
  """

  obs_tokens: Any
  obs_lengths: Any
  image_slot: Any
  image_kind: Any
  image_pixels: Any
  valid: Any


@dataclasses.dataclass
class CallRecord:
  """One executed action, for the trajectory records."""

  row_id: int
  action: str
  tool: str | None
  query: str | None
  keyframe: int | None
  results: list[dict]
  observation: str
  error: str | None
  latency_s: float


@dataclasses.dataclass
class _Outcome:
  observation: str
  image_kind: int = protocol.NO_IMAGE
  keyframe_index: int = -1
  images: list[results_lib.ImageResult] = dataclasses.field(default_factory=list)
  pixels: np.ndarray | None = None
  error_kind: str | None = None  # counter name; None for a real observation


def load_image(result: results_lib.ImageResult, size: int, timeout_s: float = 30.0) -> np.ndarray:
  """Reads an image result (local path, else URL) as uint8 [size, size, 3], aspect not kept."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if result.path:
    image = Image.open(result.path)
  elif result.url:
    with urllib.request.urlopen(result.url, timeout=timeout_s) as response:
      image = Image.open(io.BytesIO(response.read()))
  else:
    raise ValueError(f"Image result {result.name!r} has neither a path nor a URL.")
  image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


class SearchBridge:
  """Executes the model's tool calls on the host for a jitted rollout.

  Attributes:
    records: every executed call since the last `pop_records`.
    counters: calls and errors by kind (e.g. "search_calls", "error/timeout").
    image_buffer: image_search results, indexed by `BridgeOutput.image_slot`;
      cleared by `reset`.
  """

  def __init__(
    self,
    backend: results_lib.Backend | None,
    tokenizer: Tokenizer,
    *,
    max_obs_length: int = 4096,
    text_top_k: int = 2,
    image_top_k: int = 1,
    keyframe_image_tokens: int = 729,
    search_image_tokens: int = 64,
    search_image_size: int = 256,
    call_timeout_s: float = 60.0,
    num_threads: int = 16,
    pad_id: int = 0,
  ):
    """Configures the bridge.

    Args:
      backend: the search backend; None for no-search runs (search errors out).
      tokenizer: the run's tokenizer.
      max_obs_length: L, the padded observation length (docs/method.md §1.3).
      text_top_k: documents per text_search (official 2).
      image_top_k: images per image_search (official 1).
      keyframe_image_tokens: pad tokens of the high-res keyframe (729 Qwen3-VL 864²).
      search_image_tokens: pad tokens of a search image (64 Qwen3-VL 256²).
      search_image_size: side of the returned search-image pixels.
      call_timeout_s: wall-clock limit of one tool call, on top of the backend's own.
      num_threads: concurrent tool calls.
      pad_id: token id padding obs_tokens.
    """
    self.backend = backend
    self.tokenizer = tokenizer
    self.max_obs_length = max_obs_length
    self.text_top_k = text_top_k
    self.image_top_k = image_top_k
    self.keyframe_image_tokens = keyframe_image_tokens
    self.search_image_tokens = search_image_tokens
    self.search_image_size = search_image_size
    self.call_timeout_s = call_timeout_s
    self.pad_id = pad_id
    # Rows are executed on one pool and backend calls on another, so a row waiting
    # on its (time-limited) backend call never starves the calls of a thread.
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="bridge")
    self._tool_pool = concurrent.futures.ThreadPoolExecutor(
      num_threads, thread_name_prefix="bridge-tool"
    )
    self._lock = threading.Lock()
    self._shown_frames: list[list[int]] = []
    self.records: list[CallRecord] = []
    self.counters: collections.Counter[str] = collections.Counter()
    self.image_buffer: list[results_lib.ImageResult] = []
    wrap_head, wrap_tail = protocol.wrap_observation("\0").split("\0")
    self._head_ids = list(tokenizer.encode(wrap_head))
    self._tail_ids = list(tokenizer.encode(wrap_tail))
    self._vision_start = tokenizer.token_to_id(protocol.VISION_START)
    self._vision_end = tokenizer.token_to_id(protocol.VISION_END)
    self._image_pad = tokenizer.token_to_id(protocol.IMAGE_PAD)
    min_length = len(self._head_ids) + len(self._tail_ids) + keyframe_image_tokens + 32
    if max_obs_length < min_length:
      raise ValueError(
        f"max_obs_length={max_obs_length} cannot hold a keyframe observation "
        f"(needs at least {min_length} tokens)."
      )

  # --------------------------------------------------------------------------
  # Host side.
  # --------------------------------------------------------------------------

  def set_shown_frames(self, shown_frames: Sequence[Sequence[int]]) -> None:
    """The frame numbers shown to each sample; `row_ids` index this list."""
    self._shown_frames = [[int(f) for f in frames] for frames in shown_frames]

  def reset(self) -> None:
    """Clears the image buffer (call between rollouts)."""
    with self._lock:
      self.image_buffer.clear()

  def pop_records(self) -> list[CallRecord]:
    """Returns and clears the call records."""
    with self._lock:
      out, self.records = self.records, []
    return out

  def _search(self, tool: str, query: str) -> tuple[_Outcome, list]:
    if self.backend is None:
      return _Outcome(
        protocol.error_observation("Search is not available."), error_kind="no_backend"
      ), []
    future = self._tool_pool.submit(
      getattr(self.backend, tool),
      query,
      self.text_top_k if tool == "text_search" else self.image_top_k,
    )
    try:
      found = future.result(timeout=self.call_timeout_s)
    except concurrent.futures.TimeoutError:
      return _Outcome(protocol.error_observation("Search timed out."), error_kind="timeout"), []
    except results_lib.SearchError as e:
      return _Outcome(protocol.error_observation(f"Search failed ({e})."), error_kind="backend"), []
    if tool == "text_search":
      if len(found) == 1 and found[0].preformatted:
        # A web backend that already shaped and cut its answer (page context, summary).
        return _Outcome(protocol.preformatted_observation(found[0].text)), found
      obs = protocol.text_search_observation([(r.title, r.text) for r in found])
      return _Outcome(obs), found
    if not found:
      return _Outcome(protocol.error_observation("No image found."), error_kind="no_image"), found
    try:
      pixels = load_image(found[0], self.search_image_size)
    except Exception as e:  # pylint: disable=broad-except
      # A broken file or dead URL is the backend's failure, reported to the model.
      msg = f"Could not load the image result ({type(e).__name__})."
      return _Outcome(protocol.error_observation(msg), error_kind="image_load"), found
    obs = protocol.image_search_observation([r.name for r in found])
    return _Outcome(obs, protocol.SEARCH_IMAGE, images=list(found), pixels=pixels), found

  def _execute(self, row_id: int, text: str) -> tuple[_Outcome, CallRecord]:
    start = time.perf_counter()
    shown = self._shown_frames[row_id] if 0 <= row_id < len(self._shown_frames) else None
    action = protocol.parse_action(text, shown)
    found: list = []
    if action.kind in ("none", "answer"):
      # No literal tags here: the reward counts `<search>` in the whole response,
      # observations included, so an error message must not contain one.
      msg = "No tool call found: end the turn with a search, a keyframe or an answer."
      outcome = _Outcome(protocol.error_observation(msg), error_kind="invalid_action")
    elif action.error is not None:
      kind = "bad_keyframe" if action.kind == "keyframe" else "bad_search"
      outcome = _Outcome(protocol.error_observation(action.error), error_kind=kind)
    elif action.kind == "keyframe":
      if action.keyframe == protocol.NO_TARGET_KEYFRAME:
        outcome = _Outcome(protocol.NO_TARGET_OBSERVATION)
      elif shown is None:
        outcome = _Outcome(
          protocol.error_observation("Shown frames unknown for this sample."),
          error_kind="unknown_row",
        )
      else:
        outcome = _Outcome(
          protocol.KEYFRAME_OBSERVATION,
          protocol.KEYFRAME_IMAGE,
          keyframe_index=shown.index(action.keyframe),
        )
    else:
      outcome, found = self._search(action.tool, action.query)
    record = CallRecord(
      row_id=row_id,
      action=action.kind,
      tool=action.tool,
      query=action.query,
      keyframe=action.keyframe,
      results=[r.to_json() for r in found],
      observation=outcome.observation,
      error=outcome.error_kind,
      latency_s=time.perf_counter() - start,
    )
    return outcome, record

  def _tokens(self, outcome: _Outcome) -> list[int] | None:
    """Wrapped observation ids with expanded images; None when it cannot fit."""
    n_image = (
      self.keyframe_image_tokens
      if outcome.image_kind == protocol.KEYFRAME_IMAGE
      else self.search_image_tokens
    )
    body: list[int] = []
    pieces = [outcome.observation]
    if outcome.image_kind != protocol.NO_IMAGE:
      pieces = outcome.observation.split(protocol.IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
      if i:
        body += [self._vision_start] + [self._image_pad] * n_image + [self._vision_end]
      body += self.tokenizer.encode(piece) if piece else []
    room = self.max_obs_length - len(self._head_ids) - len(self._tail_ids)
    if len(body) > room:
      if outcome.image_kind != protocol.NO_IMAGE:
        return None  # An image run cannot be cut.
      body = body[:room]  # docs/method.md §1.3: long observations are truncated.
    return self._head_ids + body + self._tail_ids

  def observe(
    self,
    pending: np.ndarray,
    action_tokens: np.ndarray,
    action_lengths: np.ndarray,
    row_ids: np.ndarray,
  ) -> BridgeOutput:
    """Runs every pending row's action; the host side of the rollout's `io_callback`."""
    pending = np.asarray(pending, bool)
    action_tokens = np.asarray(action_tokens)
    action_lengths = np.asarray(action_lengths)
    row_ids = np.asarray(row_ids)
    b = pending.shape[0]
    s = self.search_image_size
    out = BridgeOutput(
      obs_tokens=np.full((b, self.max_obs_length), self.pad_id, np.int32),
      obs_lengths=np.zeros((b,), np.int32),
      image_slot=np.full((b,), -1, np.int32),
      image_kind=np.zeros((b,), np.int32),
      image_pixels=np.zeros((b, s, s, 3), np.uint8),
      valid=np.zeros((b,), bool),
    )
    rows = [int(i) for i in np.flatnonzero(pending)]
    texts = {}
    for i in rows:
      n = int(np.clip(action_lengths[i], 0, action_tokens.shape[1]))
      try:
        texts[i] = self.tokenizer.decode(
          [int(t) for t in action_tokens[i, :n]], skip_special_tokens=False
        )
      except Exception:  # pylint: disable=broad-except
        # Ids outside the vocabulary: an invalid action like any other.
        texts[i] = ""
    futures = {i: self._pool.submit(self._safe_execute, int(row_ids[i]), texts[i]) for i in rows}
    for i in rows:
      outcome, record = futures[i].result()
      ids = self._tokens(outcome)
      if ids is None:
        outcome = _Outcome(
          protocol.error_observation("Observation too long."), error_kind="too_long"
        )
        record.error, record.observation = outcome.error_kind, outcome.observation
        ids = self._tokens(outcome)
      out.obs_tokens[i, : len(ids)] = ids
      out.obs_lengths[i] = len(ids)
      out.image_kind[i] = outcome.image_kind
      out.valid[i] = outcome.error_kind is None
      if outcome.image_kind == protocol.KEYFRAME_IMAGE:
        out.image_slot[i] = outcome.keyframe_index
      elif outcome.image_kind == protocol.SEARCH_IMAGE:
        out.image_pixels[i] = outcome.pixels
        with self._lock:
          out.image_slot[i] = len(self.image_buffer)
          self.image_buffer.extend(outcome.images)
      with self._lock:
        self.records.append(record)
        self.counters[f"{record.action}_calls"] += 1
        if record.error:
          self.counters[f"error/{record.error}"] += 1
    return out

  def _safe_execute(self, row_id: int, text: str) -> tuple[_Outcome, CallRecord]:
    try:
      return self._execute(row_id, text)
    except Exception as e:  # pylint: disable=broad-except
      # Last line of defence: a bug here must not crash the jitted rollout.
      obs = protocol.error_observation(f"Tool execution failed ({type(e).__name__}).")
      outcome = _Outcome(obs, error_kind="internal")
      return outcome, CallRecord(row_id, "unknown", None, None, None, [], obs, "internal", 0.0)
