"""The agent protocol (SPEC §1): the single home of every tag, template and string.

Data, rollout, rewards and evaluation all call this module; nothing else hard-codes a
tag. Rendering lives here; parsing of model actions and observation strings are
added alongside (same module) so the two never drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Sequence

# Qwen chat special tokens (SPEC §5). The embedded tokenizer carries the same strings.
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
  """Whether a sample of this ability gets the search prompt (SPEC §1.1)."""
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
  """The system text for a sample's ability (SPEC §1.1).

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
  return pathlib.Path(path).read_text(encoding="utf-8").strip()


# ----------------------------------------------------------------------------
# Parsing model actions (SPEC §1.1, §1.3).
# ----------------------------------------------------------------------------

TOOLS = ("text_search", "image_search")
SEARCH_STOP = "</search>"
KEYFRAME_STOP = "</keyframe>"
STOP_STRINGS = (SEARCH_STOP, KEYFRAME_STOP)

# Frame number the model names when the target is absent (SPEC §9).
NO_TARGET_KEYFRAME = -1
NO_TARGET_BOX = (0, 0, 0, 0)
NO_TARGET_POINT = (0, 0)

MAX_QUERY_CHARS = 500

_ACTION_RE = re.compile(r"<(search|keyframe|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


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
  """Cleans a search query per SPEC §2.1: strip, drop double quotes, bound length.

  Raises:
    ValueError: with the message the model sees, for a non-string, empty or
      over-long query.
  """
  if not isinstance(query, str):
    raise ValueError(f"Search query must be a string, got {type(query).__name__}.")
  query = query.replace('"', "").strip()
  if not query:
    raise ValueError("Search query is empty.")
  if len(query) > MAX_QUERY_CHARS:
    raise ValueError(f"Search query is too long ({len(query)} characters, max {MAX_QUERY_CHARS}).")
  return query


def parse_search(content: str) -> Action:
  """Parses the JSON inside `<search>…</search>` into a tool call or an error."""
  try:
    call = json.loads(content.strip())
  except json.JSONDecodeError:
    return Action("search", content, error="Invalid JSON in <search>.")
  if not isinstance(call, dict):
    return Action("search", content, error="The <search> JSON must be an object.")
  if "name" not in call:
    return Action("search", content, error='Missing "name" in <search>.')
  if "query" not in call:
    return Action("search", content, error='Missing "query" in <search>.')
  tool = call["name"]
  if tool not in TOOLS:
    return Action("search", content, error=f"Unknown tool {tool!r}; use one of {list(TOOLS)}.")
  try:
    query = clean_query(call["query"])
  except ValueError as e:
    return Action("search", content, tool=tool, error=str(e))
  return Action("search", content, tool=tool, query=query)


def parse_keyframe(content: str, shown_frames: Sequence[int] | None = None) -> Action:
  """Parses `<keyframe> N </keyframe>`; N must be a shown frame number or -1.

  Args:
    content: the text between the tags.
    shown_frames: the frame numbers shown to the model. None skips the check.
  """
  text = content.strip()
  try:
    frame = int(text)
  except ValueError:
    return Action("keyframe", content, error=f"Keyframe {text!r} is not an integer.")
  if frame == NO_TARGET_KEYFRAME:
    return Action("keyframe", content, keyframe=frame)
  if shown_frames is not None and frame not in [int(f) for f in shown_frames]:
    return Action("keyframe", content, keyframe=frame, error=frame_not_shown_message(shown_frames))
  return Action("keyframe", content, keyframe=frame)


def frame_not_shown_message(shown_frames: Sequence[int]) -> str:
  """The error text for a keyframe outside the shown frames (SPEC §1.3)."""
  return f"Frame index not in {[int(f) for f in shown_frames]}."


def parse_action(text: str, shown_frames: Sequence[int] | None = None) -> Action:
  """Parses the FIRST complete action tag of a generated turn.

  Generation stops at `</search>` / `</keyframe>`, so a turn holds at most one
  executable action; the first tag is the one the model meant.
  """
  match = _ACTION_RE.search(text)
  if match is None:
    return Action("none")
  kind, content = match.group(1), match.group(2)
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
    """The "no target" answer: all-zero box and point (SPEC §9)."""
    return tuple(self.bbox_2d) == NO_TARGET_BOX and tuple(self.point_2d) == NO_TARGET_POINT


def parse_answer_json(content: str) -> Answer | None:
  """Parses answer JSON with exactly the keys bbox_2d (4 numbers) and point_2d (2).

  Returns None for anything else; the reward and evaluation code decide what a
  missing answer costs.
  """
  try:
    obj = json.loads(content.strip())
  except json.JSONDecodeError:
    return None
  if not isinstance(obj, dict) or set(obj) != {"bbox_2d", "point_2d"}:
    return None
  box, point = obj["bbox_2d"], obj["point_2d"]

  def numbers(v, n):
    return (
      isinstance(v, list)
      and len(v) == n
      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )

  if not (numbers(box, 4) and numbers(point, 2)):
    return None
  return Answer(tuple(box), tuple(point))


def parse_answer(response: str) -> Answer | None:
  """The first `<answer>` of a response, multi-line accepted (evaluation, SPEC §9)."""
  match = _ANSWER_RE.search(response)
  return None if match is None else parse_answer_json(match.group(1))


def first_keyframe(response: str) -> int | None:
  """The first `<keyframe>` number of a response (-1 accepted), or None."""
  match = re.search(r"<keyframe>\s*(-?\d+)\s*</keyframe>", response)
  return None if match is None else int(match.group(1))


# ----------------------------------------------------------------------------
# Observations (SPEC §1.3).
# ----------------------------------------------------------------------------

KEYFRAME_OBSERVATION = f"Here is the high-res version of your selected frame: {IMAGE_PLACEHOLDER}"
# After `<keyframe> -1 </keyframe>` there is no frame to show (SPEC §9).
NO_TARGET_OBSERVATION = "No frame selected: the target is absent from the video."
MAX_DOC_CHARS = 320
DOC_CUT_CHARS = 319
ELLIPSIS = "…"


def split_document(contents: str) -> tuple[str, str]:
  """Splits a corpus document into (title, text): the first line and the rest."""
  title, _, text = contents.partition("\n")
  return title.strip(), text.strip()


def truncate_text(text: str) -> str:
  """Cuts a document body to 319 characters + `…` when longer than 320."""
  if len(text) > MAX_DOC_CHARS:
    return text[:DOC_CUT_CHARS] + ELLIPSIS
  return text


def sanitize(text: str) -> str:
  """Removes chat special tokens and image placeholders from retrieved text.

  Retrieved documents are untrusted: a literal `<|im_end|>` would end the turn and
  a literal `<image>` would be expanded into an image run.
  """
  for token in SPECIAL_TOKENS + (IMAGE_PLACEHOLDER,):
    text = text.replace(token, "")
  return text


def text_search_observation(documents: Sequence[tuple[str, str]]) -> str:
  """`<information>1. (Title: T) text\\n…</information>\\n\\n` for (title, text) pairs."""
  lines = [
    f"{i}. (Title: {sanitize(title)}) {truncate_text(sanitize(text))}\n"
    for i, (title, text) in enumerate(documents, start=1)
  ]
  return "<information>" + "".join(lines) + "</information>\n\n"


def image_search_observation(names: Sequence[str]) -> str:
  """`<information>1. (Title: NAME) <image>\\n</information>\\n\\n`, one line an image."""
  lines = [
    f"{i}. (Title: {sanitize(name)}) {IMAGE_PLACEHOLDER}\n" for i, name in enumerate(names, start=1)
  ]
  return "<information>" + "".join(lines) + "</information>\n\n"


def error_observation(message: str) -> str:
  """A short plain-text observation for a failed action; the trajectory goes on."""
  return f"Error: {message}"


def wrap_observation(observation: str) -> str:
  """The tokens appended after an action (SPEC §1.3); all are masked from the loss."""
  return f"{IM_END}\n{IM_START}user\n{observation}{IM_END}\n{IM_START}assistant\n"
