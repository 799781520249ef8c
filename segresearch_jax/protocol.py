"""The agent protocol (docs/method.md §1): the single home of every tag, template and string.

Data, rollout, rewards and evaluation all call this module; nothing else hard-codes a
tag. Rendering lives here; parsing of model actions and observation strings are
added alongside (same module) so the two never drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

# Qwen chat special tokens (docs/method.md §5). The embedded tokenizer carries the same strings.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)

# Placeholder for one image in user/observation text, expanded at tokenisation.
IMAGE_PLACEHOLDER = "<image>"

SEARCH_ABILITIES = ("one-hop", "multi-hop", "relational")
ABILITIES = ("in-video",) + SEARCH_ABILITIES


def uses_search(ability: str) -> bool:
  """Whether a sample of this ability gets the search prompt (docs/method.md §1.1)."""
  if ability not in ABILITIES:
    raise ValueError(f"Unknown ability {ability!r}; expected one of {ABILITIES}.")
  return ability != "in-video"


def user_content(frame_numbers: Sequence[int], question: str) -> str:
  """One `frame {fid} <image>` line per shown frame, a blank line, then the question.

  Args:
    frame_numbers: the frames' numbers in the video (file stems as ints), in order.
    question: the raw question text.
  """
  lines = [f"frame {int(fid)} {IMAGE_PLACEHOLDER}" for fid in frame_numbers]
  return "\n".join(lines) + "\n\n" + question


def chat_prompt(system: str, user: str) -> str:
  """The Qwen chat template for one system and one user message, ready for generation."""
  return (
    f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
  )


def expand_images(text: str, tokens_per_image: Sequence[int]) -> str:
  """Replaces the i-th `<image>` with vision_start + tokens_per_image[i] pads + vision_end."""
  parts = text.split(IMAGE_PLACEHOLDER)
  if len(parts) - 1 != len(tokens_per_image):
    raise ValueError(
      f"Text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but "
      f"{len(tokens_per_image)} images were given."
    )
  out = [parts[0]]
  for n, part in zip(tokens_per_image, parts[1:]):
    out.append(VISION_START + IMAGE_PAD * int(n) + VISION_END + part)
  return "".join(out)


# ----------------------------------------------------------------------------
# Episode outcomes (docs/method.md §1): the rollout writes these ids, records, rewards
# and reports read them.
# ----------------------------------------------------------------------------

# Why an episode stopped; `STOP_REASONS[i]` names stop-reason id i.
STOP_REASONS = ("finished", "max_turns", "max_length", "empty")
FINISHED, MAX_TURNS, MAX_LENGTH, EMPTY = range(4)
# The image an observation inserts (the host bridge's `image_kind`, the rollout's `obs_kind`).
NO_IMAGE, KEYFRAME_IMAGE, SEARCH_IMAGE = 0, 1, 2


# ----------------------------------------------------------------------------
# System prompts.
# ----------------------------------------------------------------------------

_TEMPLATE_DIR = pathlib.Path(__file__).parent / "templates"
SEARCH_TEMPLATE = "system_search.txt"
NO_SEARCH_TEMPLATE = "system_no_search.txt"


# Built-in prompt sets: "default" (the full wording) and "compact" (the same protocol in
# a third of the tokens, for the small CPU runs that train a policy from scratch).
BUILTIN_TEMPLATES = ("default", "compact")


def template_directory(template_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of a built-in template set (by name) or a user folder (by path)."""
  if not template_dir or str(template_dir) == "default":
    return _TEMPLATE_DIR
  if str(template_dir) in BUILTIN_TEMPLATES:
    return _TEMPLATE_DIR / str(template_dir)
  return pathlib.Path(template_dir)


def system_prompt(ability: str, template_dir: str | os.PathLike | None = None) -> str:
  """The system text for a sample's ability (docs/method.md §1.1).

  Args:
    ability: in-video | one-hop | multi-hop | relational.
    template_dir: optional folder holding `system_search.txt` and
      `system_no_search.txt`, e.g. the exact text a released checkpoint was trained
      with, or the name of a built-in set (`BUILTIN_TEMPLATES`). Defaults to the
      project's own wording.
  """
  name = SEARCH_TEMPLATE if uses_search(ability) else NO_SEARCH_TEMPLATE
  path = template_directory(template_dir) / name
  if not path.is_file():
    raise FileNotFoundError(f"System prompt template not found: {path}")
  return _read_template(str(path))


@functools.lru_cache(maxsize=16)
def _read_template(path: str) -> str:
  # Byte for byte: the official system text ends with a blank line, and a checkpoint
  # trained on it must see it (docs/method.md §1.1). The shipped files carry no
  # trailing newline for the same reason.
  with open(path, encoding="utf-8", newline="") as f:
    return f.read()


# ----------------------------------------------------------------------------
# Parsing model actions (docs/method.md §1.1, §1.3).
# ----------------------------------------------------------------------------

TOOLS = ("text_search", "image_search")
SEARCH_STOP = "</search>"
KEYFRAME_STOP = "</keyframe>"
STOP_STRINGS = (SEARCH_STOP, KEYFRAME_STOP)

# Frame number the model names when the target is absent (docs/differences.md).
NO_TARGET_KEYFRAME = -1
NO_TARGET_BOX = (0, 0, 0, 0)
NO_TARGET_POINT = (0, 0)

MAX_QUERY_CHARS = 500
_SURROGATE_RE = re.compile("[\ud800-\udfff]")

# Keyframe tags as evaluation reads them: the reward's digit rule plus the "no target"
# -1. Linear: `\s*` and `\d+` cannot overlap, so a failed start backtracks only over
# its own whitespace and digits.
_KEYFRAME_TAG_RE = re.compile(r"<keyframe>\s*(-?\d+)\s*</keyframe>")
# A frame number exactly as `str(n)` writes it, ASCII digits only.
_FRAME_NUMBER_RE = re.compile(r"0|-?[1-9][0-9]*", re.ASCII)
# Longer digit strings are no frame of any video; bounding them keeps `int` cheap and
# below Python's 4,300-digit conversion limit.
_MAX_FRAME_CHARS = 18
# How much of a malformed action an error message quotes back.
_QUOTE_CHARS = 40


def first_tag(text: str, tags: Sequence[str]) -> tuple[str, str] | None:
  """The first complete `<tag>…</tag>` of any of `tags`, as (tag, content).

  The same result as `re.search(r"<(tag1|tag2…)>(.*?)</\1>", text, re.DOTALL)`, in
  linear time: the regex restarts its `.*?` scan at every opening tag, which is
  quadratic on a turn full of unclosed tags. An opening tag matches exactly when its
  closing tag occurs after it, so for each tag only its first opening needs a look.

  Returns:
    (tag, content) of the leftmost opening tag that is closed later, or None.
  """
  best: tuple[int, str, str] | None = None
  for tag in tags:
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = text.find(opening)
    if start < 0 or (best is not None and start > best[0]):
      continue
    end = text.find(closing, start + len(opening))
    if end >= 0:
      best = (start, tag, text[start + len(opening) : end])
  return None if best is None else (best[1], best[2])


@dataclasses.dataclass(frozen=True)
class Action:
  """One parsed turn of the model.

  Attributes:
    kind: "search", "keyframe", "answer", or "none" (no complete tag: a plain
      end of turn, or the generation ran out).
    content: the raw text between the tags ("" for "none").
    tool: the tool name, for a well-formed search.
    query: the cleaned query, for a well-formed search.
    keyframe: the frame number, for a well-formed keyframe (may be -1).
    error: why the action cannot be executed, or None when it can.
  """

  kind: str
  content: str = ""
  tool: str | None = None
  query: str | None = None
  keyframe: int | None = None
  error: str | None = None


def clean_query(query: object) -> str:
  """Cleans a search query per docs/method.md §2.1: strip, drop double quotes, bound length.

  Raises:
    ValueError: with the message the model sees, for a non-string, empty or
      over-long query.
  """
  if not isinstance(query, str):
    raise ValueError(f"Search query must be a string, got {type(query).__name__}.")
  # A JSON `\\ud800` escape decodes to a lone surrogate, which no backend, cache or
  # record file can encode as UTF-8.
  query = _SURROGATE_RE.sub("\ufffd", query.replace('"', "")).strip()
  if not query:
    raise ValueError("Search query is empty.")
  if len(query) > MAX_QUERY_CHARS:
    raise ValueError(f"Search query is too long ({len(query)} characters, max {MAX_QUERY_CHARS}).")
  return query


def iter_tags(text: str, tag: str) -> Iterator[tuple[int, str]]:
  """Every complete `<tag>…</tag>` in order, as (end of the closing tag, content).

  The matches of `re.finditer(r"<tag>(.*?)</tag>", text, re.DOTALL)`, in linear time
  (see `first_tag`): after the first opening tag with no closing tag, there are none.
  """
  opening, closing = f"<{tag}>", f"</{tag}>"
  pos = 0
  while (start := text.find(opening, pos)) >= 0:
    end = text.find(closing, start + len(opening))
    if end < 0:
      return
    pos = end + len(closing)
    yield pos, text[start + len(opening) : end]


def parse_search(content: str) -> Action:
  """Parses the JSON inside `<search>…</search>` into a tool call or an error."""
  # No protocol tag in any message: the reward counts `<search>` over the whole
  # response, observations included (docs/method.md §3.1).
  call = json_value(content.strip())
  if call is INVALID_JSON:
    return Action("search", content, error="The search call is not valid JSON.")
  if not isinstance(call, dict):
    return Action("search", content, error="The search call must be a JSON object.")
  if "name" not in call:
    return Action("search", content, error='The search call has no "name".')
  if "query" not in call:
    return Action("search", content, error='The search call has no "query".')
  tool = call["name"]
  if not isinstance(tool, str) or tool not in TOOLS:
    return Action(
      "search", content, error=f"Unknown tool {_quote(tool)}; use one of {list(TOOLS)}."
    )
  try:
    query = clean_query(call["query"])
  except ValueError as e:
    return Action("search", content, tool=tool, error=str(e))
  return Action("search", content, tool=tool, query=query)


def keyframe_number(text: str) -> int | None:
  """The one reading of a keyframe tag's content as a frame number.

  The text, stripped of whitespace, must be a frame number exactly as `str(n)` writes
  it: ASCII digits, no sign but the "no target" `-`, no leading zero, no `_`. So `13`
  and `-1` are numbers; `05`, `+5`, `1_0` and the Arabic-Indic `٥` are not (Python's
  `int` would accept all four). This is the reward's rule seen from the other side:
  the reward compares the tag's digit string with the ground-truth keys, which are
  `str(frame)` (docs/method.md §3.1), so a text this function rejects can never earn
  the keyframe term. The bridge (which frame to show), the reward's frame slot and
  evaluation (which frame to segment) all read keyframes through here, so a frame is
  shown, scored and segmented on the same terms.

  Returns:
    The frame number, or None when the text is not one.
  """
  text = text.strip()
  if len(text) > _MAX_FRAME_CHARS or _FRAME_NUMBER_RE.fullmatch(text) is None:
    return None
  return int(text)


def parse_keyframe(content: str, shown_frames: Sequence[int] | None = None) -> Action:
  """Parses `<keyframe> N </keyframe>`; N must be a shown frame number or -1.

  Args:
    content: the text between the tags (read by `keyframe_number`).
    shown_frames: the frame numbers shown to the model. None skips the check.
  """
  frame = keyframe_number(content)
  if frame is None:
    return Action(
      "keyframe", content, error=f"Keyframe {_quote(content.strip())} is not a frame number."
    )
  if frame == NO_TARGET_KEYFRAME:
    return Action("keyframe", content, keyframe=frame)
  if shown_frames is not None and frame not in [int(f) for f in shown_frames]:
    return Action("keyframe", content, keyframe=frame, error=frame_not_shown_message(shown_frames))
  return Action("keyframe", content, keyframe=frame)


def frame_not_shown_message(shown_frames: Sequence[int]) -> str:
  """The error text for a keyframe outside the shown frames (docs/method.md §1.3)."""
  return f"Frame index not in {[int(f) for f in shown_frames]}."


def parse_action(text: str, shown_frames: Sequence[int] | None = None) -> Action:
  """Parses the FIRST complete action tag of a generated turn.

  Generation stops at `</search>` / `</keyframe>`, so a turn holds at most one
  executable action; the first tag is the one the model meant.
  """
  found = first_tag(text, ("search", "keyframe", "answer"))
  if found is None:
    return Action("none")
  kind, content = found
  if kind == "search":
    return parse_search(content)
  if kind == "keyframe":
    return parse_keyframe(content, shown_frames)
  return Action("answer", content)


@dataclasses.dataclass(frozen=True)
class Answer:
  """A parsed `<answer>`: box [x1,y1,x2,y2] and point [x,y] in the policy convention."""

  bbox_2d: tuple[float, float, float, float]
  point_2d: tuple[float, float]

  @property
  def is_no_target(self) -> bool:
    """The "no target" answer: all-zero box and point (docs/differences.md)."""
    return tuple(self.bbox_2d) == NO_TARGET_BOX and tuple(self.point_2d) == NO_TARGET_POINT


def parse_answer_json(content: str) -> Answer | None:
  """Parses answer JSON with exactly the keys bbox_2d (4 numbers) and point_2d (2).

  Returns None for anything else, including JSON too deep or too long to read and
  coordinates that are not finite floats (NaN, Infinity, a 400-digit integer): no
  frame has such a pixel. The reward and evaluation code decide what a missing answer
  costs.
  """
  obj = json_value(content.strip())
  if not isinstance(obj, dict) or set(obj) != {"bbox_2d", "point_2d"}:
    return None
  box, point = _finite_floats(obj["bbox_2d"], 4), _finite_floats(obj["point_2d"], 2)
  if box is None or point is None:
    return None
  return Answer(box, point)


def _finite_floats(value: Any, n: int) -> tuple[float, ...] | None:
  if not isinstance(value, list) or len(value) != n:
    return None
  out = []
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return None
    try:
      v = float(v)
    except OverflowError:
      return None
    if not math.isfinite(v):
      return None
    out.append(v)
  return tuple(out)


def parse_answer(response: str) -> Answer | None:
  """The first `<answer>` of a response, multi-line accepted (evaluation, docs/differences.md)."""
  found = first_tag(response, ("answer",))
  return None if found is None else parse_answer_json(found[1])


def first_keyframe(response: str) -> int | None:
  """The frame number of the first keyframe tag, the one the reward scores.

  Tags are found as the reward finds them (whitespace around a digit string; `-1` is
  also found here, for the "no target" answer), so `+5` and `1_0` are skipped like the
  reward skips them; the digits are read by `keyframe_number`, so `05` and `٥`, which
  the reward finds but can never score, give None.
  """
  match = _KEYFRAME_TAG_RE.search(response)
  return None if match is None else keyframe_number(match.group(1))


# What `json_value` returns for text that is not JSON (`None` is JSON's null).
INVALID_JSON = object()


def json_value(text: str) -> Any:
  """`json.loads(text)`, or `INVALID_JSON` for anything it refuses or cannot finish.

  Model output is hostile: beside malformed JSON, ~1,000 nested brackets raise
  RecursionError and an integer of more than 4,300 digits raises ValueError.
  """
  try:
    return json.loads(text)
  except (ValueError, RecursionError):
    return INVALID_JSON


def _quote(value: object) -> str:
  """`repr(value)`, cut short: an error message quotes a malformed action, not all of it."""
  text = repr(value)
  return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 1] + ELLIPSIS


# ----------------------------------------------------------------------------
# Observations (docs/method.md §1.3).
# ----------------------------------------------------------------------------

KEYFRAME_OBSERVATION = f"Here is the high-res version of your selected frame: {IMAGE_PLACEHOLDER}"
# After `<keyframe> -1 </keyframe>` there is no frame to show (docs/differences.md).
NO_TARGET_OBSERVATION = "No frame selected: the target is absent from the video."
MAX_DOC_CHARS = 320
DOC_CUT_CHARS = 319
ELLIPSIS = "…"


def split_document(contents: str) -> tuple[str, str]:
  """Splits a corpus document into (title, text): the first line and the rest.

  Both exactly as stored, spaces included: a body that starts with a space renders
  `(Title: T)  text` and moves the 319-character cut, as in the official observations
  (docs/method.md §1.3).
  """
  title, _, text = contents.partition("\n")
  return title, text


def truncate_text(text: str) -> str:
  """Cuts a document body to 319 characters + `…` when longer than 320."""
  if len(text) > MAX_DOC_CHARS:
    return text[:DOC_CUT_CHARS] + ELLIPSIS
  return text


# Tag names of the protocol. In observation text their `<` becomes `‹` (U+2039, kept
# by byte-level tokenizers and NFC), which no reward regex and no parser reads as a tag.
PROTOCOL_TAGS = ("thinking", "search", "keyframe", "answer", "information")
TAG_LOOKALIKE = "\u2039"
_TAG_START_RE = re.compile(r"<(?=/?(?:" + "|".join(PROTOCOL_TAGS) + "))", re.IGNORECASE)
# IGR reads the first `{"name": "text_search" … "query": "…"}` of the whole response;
# a retrieved copy of one must not stand in for the model's own query.
_TOOL_CALL_RE = re.compile(r'\{(?="name":)')
BRACE_LOOKALIKE = "\uff5b"


def sanitize(text: str) -> str:
  """Makes untrusted text safe to put in an observation.

  Every observation's variable text (document titles and bodies, web results, image
  names, error messages) passes through here. Retrieved text is untrusted:

  - a literal `<|im_end|>` would end the turn and a literal `<image>` would be
    expanded into an image run, so both are removed;
  - a protocol tag (`<keyframe> 5 </keyframe>`, `<answer>…`, `<search>`) would be read
    by the reward, which scans the whole response, observations included
    (docs/method.md §3.1); the tag's `<` becomes `‹`, and the `{` of a tool-call JSON
    becomes `｛`. Official observations hold neither, so the reward stays exact.
  """
  for token in SPECIAL_TOKENS + (IMAGE_PLACEHOLDER,):
    text = text.replace(token, "")
  text = _TAG_START_RE.sub(TAG_LOOKALIKE, text)
  return _TOOL_CALL_RE.sub(BRACE_LOOKALIKE, text)


def text_search_observation(documents: Sequence[tuple[str, str]]) -> str:
  """`<information>1. (Title: T) text\\n…</information>\\n\\n` for (title, text) pairs."""
  lines = [
    f"{i}. (Title: {sanitize(title)}) {truncate_text(sanitize(text))}\n"
    for i, (title, text) in enumerate(documents, start=1)
  ]
  return "<information>" + "".join(lines) + "</information>\n\n"


def preformatted_observation(text: str) -> str:
  """`<information>TEXT</information>\\n\\n` for a web result the backend already shaped and
  cut (page context around the best sentence, or the summariser's answer, docs/method.md §2.2)."""
  return "<information>" + sanitize(text) + "</information>\n\n"


def image_search_observation(names: Sequence[str]) -> str:
  """`<information>1. (Title: NAME) <image>\\n</information>\\n\\n`, one line an image."""
  lines = [
    f"{i}. (Title: {sanitize(name)}) {IMAGE_PLACEHOLDER}\n" for i, name in enumerate(names, start=1)
  ]
  return "<information>" + "".join(lines) + "</information>\n\n"


def error_observation(message: str) -> str:
  """A short plain-text observation for a failed action; the trajectory goes on.

  The message is sanitised like retrieved text: it may quote the model's action or a
  backend's reply.
  """
  return f"Error: {sanitize(message)}"


def wrap_observation(observation: str) -> str:
  """The tokens appended after an action (docs/method.md §1.3); all are masked from the loss."""
  return f"{IM_END}\n{IM_START}user\n{observation}{IM_END}\n{IM_START}assistant\n"
