"""The official OK-VOS training reward (docs/method.md §3.1), exactly, and its jittable split.

`score_response` is the reference: one decoded response (special tokens removed,
observations included) against the sample's ground truth and reference search
steps. The same numbers come out of two halves that the trainer uses instead:
`parse_responses` (host: regexes, JSON, sentence embeddings for IGR) turns a batch
into fixed arrays, and `reward_terms` (`jnp`, jittable) does all the arithmetic.
The official quirks are kept on purpose: the FIRST keyframe tag, `<answer>` matched
WITHOUT DOTALL, all four accuracy terms gated on a keyframe AND a parsed answer, each
box/point term scored on its own, the +1 pixel IoU convention, the point tested
against the PREDICTED box, and a score that is not gated by format
(docs/method.md §3.1).

Model output is hostile, so reading it never raises and takes linear time: the
official regexes are kept below as the definition, and `read_response`,
`format_reward`, `search_turns` and `first_text_query` find exactly their matches
without the quadratic rescans their `.*?` makes on degenerate text (tests compare
both on generated responses; `benchmarks/parse_speed.py` times them).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from segresearch_jax import protocol

# The official regexes: the definition of what the reward reads. Only `_KEYFRAME` runs
# as is (it is linear: `\s*` and `\d+` cannot overlap, so a failed start backtracks
# only over its own whitespace and digits); the others restart a `.*?` scan at every
# `<thinking>` / `<answer>`, quadratic on degenerate text, and are replaced by the
# linear scanners below, which give the same matches.
_FORMAT_KEYFRAME = re.compile(
  r"<thinking>.*?</thinking>\s*<keyframe>\s*(\d+)\s*</keyframe>", re.DOTALL
)
_FORMAT_ANSWER = re.compile(r"<thinking>.*?</thinking>\s*<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_KEYFRAME = re.compile(r"<keyframe>\s*(\d+)\s*</keyframe>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: a multi-line answer scores 0
_SEARCH_TURN = re.compile(r"<thinking>.*?</thinking>\s*<search>.*?</search>", re.DOTALL)
_TEXT_QUERY = re.compile(r'\{"name":\s*"text_search".*?"query":\s*"(.*?)"\}', re.DOTALL)

# Pieces of those regexes that anchor on a literal and so search in linear time.
_THINKING = "<thinking>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_SEARCH_CLOSE = "</search>"
_KEYFRAME_AFTER_THINKING = re.compile(r"</thinking>\s*<keyframe>\s*\d+\s*</keyframe>")
_ANSWER_AFTER_THINKING = re.compile(r"</thinking>\s*<answer>\s*")
_SEARCH_AFTER_THINKING = re.compile(r"</thinking>\s*<search>")
_TEXT_QUERY_HEAD = re.compile(r'\{"name":\s*"text_search"')
_TEXT_QUERY_KEY = re.compile(r'"query":\s*"')
_TEXT_QUERY_END = '"}'

TERMS = ("iou_score", "box_l1_score", "point_l1_score", "keyframe_score", "process_score")
# The accuracy terms of TERMS (the rest is the process term); their sum is "outcome".
OUTCOME_TERMS = TERMS[:4]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The reward's settings: the process term's from `config.reward` (`from_config`, no
  default here), the accuracy thresholds and term weights the official constants."""

  tpr_p: float
  tpr_budget: int
  igr_threshold: float
  iou_threshold: float = 0.5
  box_l1_threshold: float = 10.0
  point_distance_threshold: float = 100.0
  weights: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)  # TERMS order

  @classmethod
  def from_config(cls, reward: Any) -> RewardConfig:
    """The process-term settings of `config.reward` (tpr_p, tpr_budget, igr_threshold); the
    accuracy thresholds and weights stay the official constants."""
    return cls(
      tpr_p=reward.tpr_p, tpr_budget=int(reward.tpr_budget), igr_threshold=reward.igr_threshold
    )


EmbedFn = Callable[[Sequence[str]], np.ndarray]  # texts -> L2-normalised [N, D]


class CachedEmbedder:
  """An `EmbedFn` that embeds each distinct text once: duplicates within a call are
  embedded together once, and results are memoised across calls (least recently used
  dropped beyond `max_size`).

  Rollouts of one prompt often issue the same first query, so a batch holds far fewer
  distinct queries than responses; the model is deterministic, so memoising changes
  nothing but time.
  """

  def __init__(self, embed_fn: EmbedFn, max_size: int = 65536):
    if max_size < 1:
      raise ValueError(f"max_size must be >= 1, got {max_size}.")
    self.embed_fn = embed_fn
    self.max_size = max_size
    self._memo: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    found: dict[str, np.ndarray] = {}
    for t in texts:
      if t in self._memo and t not in found:
        self._memo.move_to_end(t)
        found[t] = self._memo[t]
    missing = [t for t in dict.fromkeys(texts) if t not in found]
    if missing:
      for t, v in zip(missing, np.asarray(self.embed_fn(missing))):
        found[t] = self._memo[t] = v
      while len(self._memo) > self.max_size:
        self._memo.popitem(last=False)
    if not texts:
      return np.asarray(self.embed_fn([]))
    return np.stack([found[t] for t in texts])

  def clear(self) -> None:
    """Forgets every memoised embedding."""
    self._memo.clear()


def minilm_embedder(model_path: str | None = None, *, cache_size: int = 65536) -> EmbedFn:
  """all-MiniLM-L6-v2 (the packaged copy by default) as normalised embeddings.

  Args:
    model_path: a local sentence-transformers model; default the packaged MiniLM.
    cache_size: texts memoised by a `CachedEmbedder`; 0 embeds every text every time.
  """
  from sentence_transformers import SentenceTransformer

  from segresearch_jax.search import local_kb

  model = SentenceTransformer(model_path or local_kb.default_dense_model(), device="cpu")

  def embed(texts: Sequence[str]) -> np.ndarray:
    return model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)

  return CachedEmbedder(embed, cache_size) if cache_size > 0 else embed


def _ground_truth(ground_truth: str | Mapping) -> dict:
  return json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)


def _is_number_list(value: Any, n: int) -> bool:
  return (
    isinstance(value, list)
    and len(value) == n
    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
  )


def _as_float(v: int | float) -> float:
  # JSON integers are unbounded; one beyond the float range compares like +-inf, which
  # is what Python's exact integer arithmetic in the official code makes of it.
  try:
    return float(v)
  except OverflowError:
    return math.inf if v > 0 else -math.inf


def _numbers(value: Any, n: int) -> list[float] | None:
  """`value` as n floats when it is a list of n JSON numbers (not booleans), else None."""
  return [_as_float(v) for v in value] if _is_number_list(value, n) else None


def format_reward(response: str) -> float:
  r"""1 when a thinking+keyframe turn and a thinking+answer turn exist and the answer is
  JSON with exactly {bbox_2d: 4 numbers, point_2d: 2 numbers}.

  Same result as searching `_FORMAT_KEYFRAME` and `_FORMAT_ANSWER`, in linear time.
  Both start with `<thinking>.*?</thinking>`, so a match exists exactly when a
  `</thinking>` followed by the rest lies after the FIRST `<thinking>`; the answer
  group is then the text after the first `</thinking>\s*<answer>\s*` up to the next
  `</answer>`, trailing whitespace dropped (the lazy group stops at the first close).
  """
  start = response.find(_THINKING)
  if start < 0:
    return 0.0
  body = start + len(_THINKING)
  if _KEYFRAME_AFTER_THINKING.search(response, body) is None:
    return 0.0
  head = _ANSWER_AFTER_THINKING.search(response, body)
  if head is None:
    return 0.0
  end = response.find(_ANSWER_CLOSE, head.end())
  if end < 0:
    return 0.0
  parsed = protocol.json_value(response[head.end() : end].rstrip())
  ok = (
    isinstance(parsed, dict)
    and set(parsed) == {"bbox_2d", "point_2d"}
    and _is_number_list(parsed["bbox_2d"], 4)
    and _is_number_list(parsed["point_2d"], 2)
  )
  return 1.0 if ok else 0.0


def search_turns(response: str) -> int:
  r"""`len(_SEARCH_TURN.findall(response))` in linear time: the thinking+search turns.

  Each match starts at the first `<thinking>` after the previous match and ends at the
  first `</search>` after the first `</thinking>\s*<search>` that follows it.
  """
  count, pos = 0, 0
  while (start := response.find(_THINKING, pos)) >= 0:
    head = _SEARCH_AFTER_THINKING.search(response, start + len(_THINKING))
    if head is None:
      break
    end = response.find(_SEARCH_CLOSE, head.end())
    if end < 0:
      break
    count += 1
    pos = end + len(_SEARCH_CLOSE)
  return count


def first_text_query(response: str) -> str | None:
  """`_TEXT_QUERY.search(response).group(1)` in linear time (the query IGR embeds).

  The leftmost `{"name": "text_search"` wins when any match exists; its query is the
  first `"query": "` after it, up to the next `"}`.
  """
  head = _TEXT_QUERY_HEAD.search(response)
  if head is None:
    return None
  key = _TEXT_QUERY_KEY.search(response, head.end())
  if key is None:
    return None
  end = response.find(_TEXT_QUERY_END, key.end())
  return None if end < 0 else response[key.end() : end]


def first_keyframe_tag(response: str) -> str | None:
  r"""The digit string of the FIRST `<keyframe>\s*(\d+)\s*</keyframe>` (official `\d`,
  so Unicode digits such as `٥` count), or None. The reward compares it with the
  ground-truth keys as a string: `05` is not `5`."""
  match = _KEYFRAME.search(response)
  return None if match is None else match.group(1)


def first_line_answer(response: str) -> str | None:
  """`_ANSWER.search(response).group(1)` in linear time: the FIRST `<answer>…</answer>`
  on one line (`.` without DOTALL stops only at `\n`).

  An `<answer>` whose next `</answer>` lies beyond a newline fails, and so does every
  other `<answer>` before that newline, so the scan resumes after it.
  """
  pos, close = 0, -1
  while (start := response.find(_ANSWER_OPEN, pos)) >= 0:
    start += len(_ANSWER_OPEN)
    if close < start:
      close = response.find(_ANSWER_CLOSE, start)
      if close < 0:
        return None
    newline = response.find("\n", start, close)
    if newline < 0:
      return response[start:close]
    pos = newline + 1
  return None


@dataclasses.dataclass(frozen=True)
class Reading:
  """What the accuracy terms read from one response (docs/method.md §3.1, steps 1-2).

  Attributes:
    keyframe: the digit string of the first keyframe tag, or None.
    answered: a single-line `<answer>` exists and its stripped text is JSON (any value).
    box: the answer's `bbox_2d` as 4 floats, or None (missing, wrong length, not
      numbers, or the answer is not an object).
    point: the answer's `point_2d` as 2 floats, or None.
  """

  keyframe: str | None
  answered: bool
  box: list[float] | None = None
  point: list[float] | None = None

  def target(self, gt: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ground-truth entry the accuracy terms score against, or None when all
    four are 0: no keyframe, no parsed answer, or a keyframe that is no GT key."""
    if self.keyframe is None or not self.answered:
      return None
    return gt.get(self.keyframe)


def read_response(response: str) -> Reading:
  """Reads the keyframe tag and the answer the accuracy terms score; never raises."""
  keyframe = first_keyframe_tag(response)
  text = first_line_answer(response)
  pred = protocol.INVALID_JSON if text is None else protocol.json_value(text.strip())
  if pred is protocol.INVALID_JSON:
    return Reading(keyframe, answered=False)
  if not isinstance(pred, dict):
    return Reading(keyframe, answered=True)
  return Reading(
    keyframe,
    answered=True,
    box=_numbers(pred.get("bbox_2d"), 4),
    point=_numbers(pred.get("point_2d"), 2),
  )


def box_iou_plus_one(a: Sequence[float], b: Sequence[float]) -> float:
  """Box IoU with the +1 pixel convention (inclusive integer boxes); 0 when the union
  is not positive (inverted or NaN boxes)."""
  ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
  inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0.0
  area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
  area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
  union = area_a + area_b - inter
  return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------
# The reference: one response at a time.
# ----------------------------------------------------------------------------


def score_response(
  response: str,
  ground_truth: str | Mapping,
  steps: Sequence[str] | None = None,
  *,
  config: RewardConfig,
  embed_fn: EmbedFn | None = None,
) -> dict[str, float]:
  """The official reward of one response (docs/method.md §3.1).

  Args:
    response: the decoded response, special tokens removed.
    ground_truth: {frame_number: {bbox_2d, point_2d, area, max_conn_area}} (or its JSON).
    steps: the sample's reference search queries; None or empty = no process reward.
    config: constants and weights.
    embed_fn: sentence embedder for IGR (MiniLM by default, loaded on first need).

  Returns:
    iou_score, box_l1_score, point_l1_score, keyframe_score, process_score,
    format_score, tpr, igr, num_search and score.
  """
  gt = _ground_truth(ground_truth)
  fmt = format_reward(response)
  iou = box_l1 = point_l1 = keyframe = 0.0
  reading = read_response(response)
  target = reading.target(gt)
  if target is not None:
    keyframe = float(target.get("max_conn_area", 0))
    gt_box = [float(v) for v in target["bbox_2d"]]
    gt_point = [float(v) for v in target["point_2d"]]
    box, point = reading.box, reading.point
    if box is not None:
      iou = float(box_iou_plus_one(box, gt_box) > config.iou_threshold)
      box_l1 = float(sum(abs(p - g) for p, g in zip(box, gt_box)) / 4 < config.box_l1_threshold)
    if box is not None and point is not None:
      inside = box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]
      dist = math.hypot(point[0] - gt_point[0], point[1] - gt_point[1])
      point_l1 = float(inside and dist < config.point_distance_threshold)
  tpr = igr = 0.0
  if steps:
    k = min(search_turns(response), config.tpr_budget) + fmt
    tpr = 1.0 - (1.0 - config.tpr_p) ** k
    query = first_text_query(response)
    if query is not None:
      embed_fn = embed_fn or _default_embedder()
      vectors = embed_fn([query, *steps])
      igr = float(np.max(vectors[1:] @ vectors[0]) > config.igr_threshold)
    process = 0.5 * (igr + tpr)
  else:
    process = fmt
  terms = dict(
    iou_score=iou,
    box_l1_score=box_l1,
    point_l1_score=point_l1,
    keyframe_score=keyframe,
    process_score=process,
  )
  score = float(sum(w * terms[t] for w, t in zip(config.weights, TERMS)))
  return dict(
    terms,
    format_score=fmt,
    tpr=tpr,
    igr=igr,
    num_search=float(response.count("<search>")),
    score=score,
  )


def validation_reward(response: str, ground_truth: str | Mapping[str, Any]) -> float:
  r"""The official validation reward: continuous box IoU on the LAST keyframe tag.

  The IoU (+1 pixel convention, `box_iou_plus_one`) between the answer's `bbox_2d`
  and the ground-truth `bbox_2d` of the frame named by the last
  `<keyframe>\s*(\d+)\s*</keyframe>`; the answer is the one the training reward
  reads (the first single-line `<answer>`). 0.0 when the keyframe, the answer, the
  box or the ground-truth entry is missing or invalid; never raises.

  Args:
    response: the decoded response, special tokens removed.
    ground_truth: {frame_number: {bbox_2d, ...}} (or its JSON).
  """
  try:
    gt = _ground_truth(ground_truth)
  except (ValueError, TypeError, RecursionError):
    return 0.0
  if not isinstance(gt, Mapping):
    return 0.0
  keyframe = None
  for match in _KEYFRAME.finditer(response):
    keyframe = match.group(1)
  box = read_response(response).box
  target = gt.get(keyframe) if keyframe is not None else None
  gt_box = _numbers(target.get("bbox_2d"), 4) if isinstance(target, Mapping) else None
  if box is None or gt_box is None:
    return 0.0
  iou = box_iou_plus_one(box, gt_box)
  return float(iou) if math.isfinite(iou) else 0.0


_EMBEDDER: list[EmbedFn] = []


def _default_embedder() -> EmbedFn:
  if not _EMBEDDER:
    _EMBEDDER.append(minilm_embedder())
  return _EMBEDDER[0]


# ----------------------------------------------------------------------------
# The jittable split: host parsing into arrays, then jnp arithmetic.
# ----------------------------------------------------------------------------


def parse_responses(
  responses: Sequence[str],
  ground_truths: Sequence[str | Mapping],
  steps: Sequence[Sequence[str] | None],
  *,
  config: RewardConfig,
  embed_fn: EmbedFn | None = None,
  step_cache: dict[tuple[str, ...], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Everything non-numeric of a batch, as fixed arrays for `reward_terms`.

  The gating of docs/method.md §3.1 is decided here, once, by `read_response`:
  `keyframe_ok` (keyframe, parsed answer and a GT key: the keyframe term and the gate
  of the other three), `box_ok` (the answer's box is valid: iou and box_l1) and
  `answer_ok` (box and point valid: point_l1). `reward_terms` only does arithmetic.

  IGR needs sentence embeddings, so it is computed here: all first text_search
  queries of the batch are embedded in one call, and the embeddings of each sample's
  reference steps are cached across calls in `step_cache`.
  """
  b = len(responses)
  out = dict(
    format=np.zeros(b, np.float32),
    keyframe_ok=np.zeros(b, bool),
    box_ok=np.zeros(b, bool),
    answer_ok=np.zeros(b, bool),
    pred_box=np.zeros((b, 4), np.float32),
    pred_point=np.zeros((b, 2), np.float32),
    gt_box=np.zeros((b, 4), np.float32),
    gt_point=np.zeros((b, 2), np.float32),
    max_conn_area=np.zeros(b, np.float32),
    search_turns=np.zeros(b, np.float32),
    has_steps=np.zeros(b, bool),
    igr=np.zeros(b, np.float32),
    num_search=np.zeros(b, np.float32),
  )
  queries: dict[int, str] = {}
  parsed_gts: dict[str, dict] = {}  # Rollouts of one prompt share its ground-truth JSON.
  for i, (response, gt, st) in enumerate(zip(responses, ground_truths, steps)):
    if isinstance(gt, str):
      if gt not in parsed_gts:
        parsed_gts[gt] = json.loads(gt)
      gt = parsed_gts[gt]
    else:
      gt = _ground_truth(gt)
    out["format"][i] = format_reward(response)
    out["num_search"][i] = response.count("<search>")
    reading = read_response(response)
    target = reading.target(gt)
    if target is not None:
      out["keyframe_ok"][i] = True
      out["max_conn_area"][i] = float(target.get("max_conn_area", 0))
      out["gt_box"][i] = target["bbox_2d"]
      out["gt_point"][i] = target["point_2d"]
      if reading.box is not None:
        out["box_ok"][i] = True
        out["pred_box"][i] = reading.box
        if reading.point is not None:
          out["answer_ok"][i] = True
          out["pred_point"][i] = reading.point
    if st:
      out["has_steps"][i] = True
      out["search_turns"][i] = search_turns(response)
      query = first_text_query(response)
      if query is not None:
        queries[i] = query
  if queries:
    embed_fn = embed_fn or _default_embedder()
    step_cache = {} if step_cache is None else step_cache
    missing = sorted({tuple(steps[i]) for i in queries} - set(step_cache))
    if missing:
      flat = embed_fn([s for group in missing for s in group])
      offset = 0
      for group in missing:
        step_cache[group] = flat[offset : offset + len(group)]
        offset += len(group)
    rows = sorted(queries)
    query_vectors = embed_fn([queries[i] for i in rows])
    for i, q in zip(rows, query_vectors):
      out["igr"][i] = float(np.max(step_cache[tuple(steps[i])] @ q) > config.igr_threshold)
  return out


def reward_terms(parsed: Mapping[str, Any], config: RewardConfig) -> dict[str, Any]:
  """The reward arithmetic in `jnp` (jittable); arrays [B] in, [B] out."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pb, gb = f32(parsed["pred_box"]), f32(parsed["gt_box"])  # [B, 4]
  pp, gp = f32(parsed["pred_point"]), f32(parsed["gt_point"])  # [B, 2]
  keyframe_ok = jnp.asarray(parsed["keyframe_ok"])
  box_scored = keyframe_ok & jnp.asarray(parsed["box_ok"])  # iou and box_l1
  point_scored = keyframe_ok & jnp.asarray(parsed["answer_ok"])  # also needs the point
  # 1. Box IoU with the +1 convention.
  lo, hi = jnp.maximum(pb[:, :2], gb[:, :2]), jnp.minimum(pb[:, 2:], gb[:, 2:])
  overlap = jnp.all(lo < hi, axis=-1)
  inter = jnp.where(overlap, jnp.prod(hi - lo + 1, axis=-1), 0.0)
  area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)
  union = area(pb) + area(gb) - inter
  iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  iou_score = box_scored & (iou > config.iou_threshold)
  # 2. Mean L1 of the box corners.
  box_l1_score = box_scored & (jnp.mean(jnp.abs(pb - gb), axis=-1) < config.box_l1_threshold)
  # 3. Point inside its own box and near the GT point.
  inside = jnp.all((pp >= pb[:, :2]) & (pp <= pb[:, 2:]), axis=-1)
  dist = jnp.sqrt(jnp.sum((pp - gp) ** 2, axis=-1))
  point_score = point_scored & inside & (dist < config.point_distance_threshold)
  keyframe_score = jnp.where(keyframe_ok, f32(parsed["max_conn_area"]), 0.0)
  # 4. Process: tapering search reward + initial guidance, or format without steps.
  fmt = f32(parsed["format"])
  k = jnp.minimum(f32(parsed["search_turns"]), config.tpr_budget) + fmt
  tpr = 1.0 - (1.0 - config.tpr_p) ** k
  has_steps = jnp.asarray(parsed["has_steps"])
  process = jnp.where(has_steps, 0.5 * (f32(parsed["igr"]) + tpr), fmt)
  terms = dict(
    iou_score=f32(iou_score),
    box_l1_score=f32(box_l1_score),
    point_l1_score=f32(point_score),
    keyframe_score=keyframe_score,
    process_score=process,
  )
  score = sum(w * terms[t] for w, t in zip(config.weights, TERMS))
  return dict(
    terms,
    format_score=fmt,
    tpr=jnp.where(has_steps, tpr, 0.0),
    igr=f32(parsed["igr"]),
    num_search=f32(parsed["num_search"]),
    score=score,
  )


def score_batch(
  responses: Sequence[str],
  ground_truths: Sequence[str | Mapping],
  steps: Sequence[Sequence[str] | None],
  *,
  config: RewardConfig,
  embed_fn: EmbedFn | None = None,
  step_cache: dict | None = None,
) -> dict[str, np.ndarray]:
  """The batched reward: host parse + the `jnp` arithmetic, as numpy arrays."""
  parsed = parse_responses(
    responses, ground_truths, steps, config=config, embed_fn=embed_fn, step_cache=step_cache
  )
  return {k: np.asarray(v) for k, v in reward_terms(parsed, config).items()}
