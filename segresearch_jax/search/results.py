"""Search results shared by every backend, and the error they raise.

All backends answer `text_search(query, k) -> list[TextResult]` and
`image_search(query, k) -> list[ImageResult]` so the bridge, the cache and the
retrieval service never look at which backend produced a result.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


class SearchError(RuntimeError):
  """A backend could not answer (timeout, HTTP error, malformed response)."""


@dataclasses.dataclass(frozen=True)
class TextResult:
  """One retrieved document: title (first line), text (the rest) and score.

  Attributes:
    title: the document title (for a preformatted result, the query).
    text: the document body.
    score: the retrieval score.
    preformatted: the backend already shaped and cut `text` as the whole observation
      body (official Serper page processing: up to 960 characters); it is shown as
      is, not numbered or cut to one document's length.
  """

  title: str
  text: str
  score: float = 0.0
  preformatted: bool = False

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> TextResult:
    return cls(
      title=str(d["title"]),
      text=str(d["text"]),
      score=float(d.get("score", 0.0)),
      preformatted=bool(d.get("preformatted", False)),
    )


@dataclasses.dataclass(frozen=True)
class ImageResult:
  """One retrieved image: its entity name and where its pixels are.

  Attributes:
    name: the entity name shown to the model as the title.
    path: a local file with the image, when there is one.
    url: the remote address, for web results.
    score: the retrieval score.
  """

  name: str
  path: str | None = None
  url: str | None = None
  score: float = 0.0

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> ImageResult:
    return cls(
      name=str(d["name"]),
      path=d.get("path"),
      url=d.get("url"),
      score=float(d.get("score", 0.0)),
    )


class Backend(Protocol):
  """What the bridge needs from a search backend."""

  name: str

  def text_search(self, query: str, k: int) -> list[TextResult]: ...

  def image_search(self, query: str, k: int) -> list[ImageResult]: ...
