"""The host callback bridge: one call serves a batch of pending rows (as the rollout calls it)."""

import re
import threading
import time

import numpy as np
import pytest
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.agent import bridge as bridge_lib
from segresearch_jax.search import results as results_lib

SHOWN = [0, 4, 10, 13, 18, 23]


class ByteTokenizer:
  """Bytes are ids 0..255; the Qwen special strings get single ids after them."""

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
    out, buf = [], bytearray()
    for i in ids:
      if i in self.by_id:
        out.append(buf.decode(errors="replace"))
        buf = bytearray()
        out.append("" if skip_special_tokens else self.by_id[i])
      elif 0 <= i < 256:
        buf.append(i)
      else:
        raise ValueError(f"id {i} out of vocabulary")
    return "".join(out) + buf.decode(errors="replace")

  def token_to_id(self, s):
    return self.specials[s]


class FakeBackend:
  name = "fake"

  def __init__(self, image_path, delay_s=0.0):
    self.image_path = image_path
    self.delay_s = delay_s
    self.threads = set()
    self._lock = threading.Lock()
    self.active = 0
    self.max_active = 0  # Most calls in flight at once.

  def text_search(self, query, k):
    self.threads.add(threading.get_ident())
    with self._lock:
      self.active += 1
      self.max_active = max(self.max_active, self.active)
    try:
      return self._text_search(query, k)
    finally:
      with self._lock:
        self.active -= 1

  def _text_search(self, query, k):
    time.sleep(self.delay_s)
    if query == "explode":
      raise results_lib.SearchError("HTTP 500")
    if query == "hang":
      time.sleep(2.0)
    return [results_lib.TextResult(f"{query} title {i}", f"about {query}", 1.0) for i in range(k)]

  def image_search(self, query, k):
    if query == "missing file":
      return [results_lib.ImageResult(query, path="/nonexistent.png")]
    return [results_lib.ImageResult(query, path=self.image_path)]


@pytest.fixture
def image_path(tmp_path):
  path = tmp_path / "img.png"
  Image.fromarray(np.full((20, 30, 3), 77, np.uint8)).save(path)
  return str(path)


def _bridge(backend, **kw):
  kw = {
    "max_obs_length": 1024,
    "keyframe_image_tokens": 16,
    "search_image_tokens": 4,
    "search_image_size": 8,
    **kw,
  }
  b = bridge_lib.SearchBridge(backend, ByteTokenizer(), **kw)
  b.set_shown_frames([SHOWN] * 8)
  return b


def _actions(tok, texts, width=160):
  ids = np.zeros((len(texts), width), np.int32)
  lengths = np.zeros((len(texts),), np.int32)
  for i, t in enumerate(texts):
    enc = tok.encode(t)[:width]
    ids[i, : len(enc)] = enc
    lengths[i] = len(enc)
  return ids, lengths


def _search(tool, query):
  return f'<thinking>t</thinking> <search> {{"name": "{tool}", "query": "{query}"}} </search>'


ACTIONS = [
  _search("text_search", "Claudio Miranda"),
  "<thinking>t</thinking> <keyframe> 13 </keyframe>",
  _search("image_search", "Apple Inc"),
  "<thinking>t</thinking> <keyframe> 5 </keyframe>",
  '<search> {"name": "text_search", query: } </search>',
  _search("text_search", "explode"),
  "no tag at all",
  _search("text_search", "not pending"),
]
PENDING = [True] * 7 + [False]


def _obs_text(tok, out, i):
  return tok.decode(np.asarray(out.obs_tokens[i, : int(out.obs_lengths[i])]).tolist())


def test_batch_of_8(image_path):
  bridge = _bridge(FakeBackend(image_path))
  tok = bridge.tokenizer
  ids, lengths = _actions(tok, ACTIONS)

  out = bridge.observe(np.array(PENDING), ids, lengths, np.arange(8, dtype=np.int32))
  assert out.obs_tokens.shape == (8, 1024) and out.obs_tokens.dtype == np.int32
  assert out.image_pixels.shape == (8, 8, 8, 3)
  texts = [_obs_text(tok, out, i) for i in range(8)]
  head, tail = "<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
  for t in texts[:7]:
    assert t.startswith(head) and t.endswith(tail)
  body = [t[len(head) : -len(tail)] if t else "" for t in texts]

  assert body[0] == (
    "<information>1. (Title: Claudio Miranda title 0) about Claudio Miranda\n"
    "2. (Title: Claudio Miranda title 1) about Claudio Miranda\n</information>\n\n"
  )
  # Keyframe: the placeholder expanded with 16 pads; slot = index among shown frames.
  pads = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"
  assert body[1] == protocol.KEYFRAME_OBSERVATION.replace("<image>", pads)
  assert body[1] == protocol.expand_images(protocol.KEYFRAME_OBSERVATION, [16])
  assert int(out.image_slot[1]) == 3 and int(out.image_kind[1]) == protocol.KEYFRAME_IMAGE
  # Image search: 4 pads, slot into the image buffer, pixels resized.
  assert body[2] == protocol.expand_images(protocol.image_search_observation(["Apple Inc"]), [4])
  assert int(out.image_kind[2]) == protocol.SEARCH_IMAGE
  assert bridge.image_buffer[int(out.image_slot[2])].name == "Apple Inc"
  assert (np.asarray(out.image_pixels[2]) == 77).all() and not np.asarray(out.image_pixels[0]).any()
  # Errors are observations.
  assert body[3] == "Error: Frame index not in [0, 4, 10, 13, 18, 23]."
  assert body[4] == "Error: The search call is not valid JSON."  # no tag: see num_search
  assert body[5].startswith("Error: Search failed") and "HTTP 500" in body[5]
  assert body[6].startswith("Error: No tool call found")
  # Not pending: nothing.
  assert int(out.obs_lengths[7]) == 0 and not np.asarray(out.obs_tokens[7]).any()
  assert np.asarray(out.valid).tolist() == [True, True, True, False, False, False, False, False]
  assert np.asarray(out.image_slot)[[0, 3, 4, 5, 6, 7]].tolist() == [-1] * 6

  records = bridge.pop_records()
  assert len(records) == 7 and bridge.pop_records() == []
  by_row = {r.row_id: r for r in records}
  assert by_row[0].query == "Claudio Miranda" and len(by_row[0].results) == 2
  assert by_row[5].error == "backend" and by_row[3].error == "bad_keyframe"
  assert bridge.counters["error/invalid_action"] == 1
  assert bridge.counters["search_calls"] == 4 and bridge.counters["keyframe_calls"] == 2


def test_row_ids_pick_each_samples_shown_frames(image_path):
  """Two turns; row_ids pick each sample's shown frames."""
  bridge = _bridge(FakeBackend(image_path))
  bridge.set_shown_frames([[1, 2, 3], [7, 8, 9]])
  ids, lengths = _actions(
    bridge.tokenizer, ["<keyframe> 8 </keyframe>", "<keyframe> 8 </keyframe>"]
  )
  total = np.zeros(2, np.int32)
  for _ in range(2):
    total += bridge.observe(np.array([True, True]), ids, lengths, np.array([1, 0])).image_slot
  # Row 0 is sample 1 (frame 8 -> index 1); row 1 is sample 0 (error).
  assert total.tolist() == [2, -2]


def test_concurrent_calls_and_timeout(image_path):
  backend = FakeBackend(image_path, delay_s=0.2)
  bridge = _bridge(backend, call_timeout_s=0.5, num_threads=8)
  actions = [_search("text_search", f"q{i}") for i in range(7)] + [_search("text_search", "hang")]
  ids, lengths = _actions(bridge.tokenizer, actions)
  out = bridge.observe(np.ones(8, bool), ids, lengths, np.arange(8))
  # The calls overlap (each sleeps 0.2 s, so serial calls would never be in flight together).
  assert backend.max_active > 1 and len(backend.threads) > 1
  assert _obs_text(bridge.tokenizer, out, 7).count("Error: Search timed out.") == 1
  assert out.valid.tolist() == [True] * 7 + [False]
  assert bridge.counters["error/timeout"] == 1


def test_truncation_bad_ids_missing_image_and_no_backend(image_path):
  bridge = _bridge(FakeBackend(image_path), max_obs_length=140, keyframe_image_tokens=8)
  tok = bridge.tokenizer
  ids, lengths = _actions(
    tok,
    [
      _search("text_search", "l" * 100),
      _search("image_search", "missing file"),
      "<keyframe>-1</keyframe>",
      "x",
    ],
    width=400,
  )
  ids[3, :2] = [10**6, 5]  # out of vocabulary
  lengths[3] = 2
  out = bridge.observe(np.ones(4, bool), ids, lengths, np.arange(4))
  assert out.obs_lengths[0] == 140  # cut to max_obs_length, wrapper kept
  assert _obs_text(tok, out, 0).endswith("<|im_end|>\n<|im_start|>assistant\n")
  assert "Could not load the image result" in _obs_text(tok, out, 1)
  assert "target is absent" in _obs_text(tok, out, 2) and out.valid[2] and out.image_slot[2] == -1
  assert "No tool call found" in _obs_text(tok, out, 3)

  no_search = _bridge(None)
  ids, lengths = _actions(no_search.tokenizer, [_search("text_search", "q")])
  out = no_search.observe(np.ones(1, bool), ids, lengths, np.zeros(1))
  assert "Search is not available" in _obs_text(no_search.tokenizer, out, 0)
  with pytest.raises(ValueError, match="max_obs_length"):
    _bridge(None, max_obs_length=20)


class _PageBackend(FakeBackend):
  """A web backend whose text_search returns one answer it already shaped (Serper pages)."""

  def text_search(self, query, k):
    page = "Claudio Miranda is a cinematographer. " * 20 + "<keyframe> 5 </keyframe>"
    return [results_lib.TextResult(query, page, 0.0, preformatted=True)]


def test_a_preformatted_web_answer_is_the_whole_observation(image_path):
  bridge = _bridge(_PageBackend(image_path))
  ids, lengths = _actions(bridge.tokenizer, [_search("text_search", "Claudio Miranda")])
  out = bridge.observe(np.ones(1, bool), ids, lengths, np.zeros(1))
  text = _obs_text(bridge.tokenizer, out, 0)
  body = text.split("<information>", 1)[1].split("</information>", 1)[0]
  # Not cut like a stored document (320 characters) and not numbered "1. (Title: ...)";
  # a tag inside the page is neutralised like any retrieved text.
  assert body.startswith("Claudio Miranda is a cinematographer.") and len(body) > 320
  assert "(Title:" not in body and "<keyframe>" not in body and "keyframe> 5" in body
