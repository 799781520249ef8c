"""Tokenizers behind one small interface: a local HF directory or the embedded BPE.

The embedded tokenizer needs no download: a byte-level BPE trained with `tokenizers`
on text this module generates (the protocol's templates and tags, JSON answers,
numbers, English words), with the Qwen special tokens, so protocol code is the same
for it and for the real Qwen tokenizer. It is deterministic and cached on disk under
`$SEGRESEARCH_CACHE` (default `~/.cache/segresearch_jax`), keyed by a hash of its
corpus and settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from segresearch_jax import protocol

EMBEDDED_VOCAB_SIZE = 4096
# Protocol tags become single tokens in the embedded vocabulary (ordinary tokens, so
# decoding keeps them); the Qwen tokenizer splits them, which the protocol code handles.
_TAGS = (
  "<thinking>",
  "</thinking>",
  "<search>",
  "</search>",
  "<keyframe>",
  "</keyframe>",
  "<answer>",
  "</answer>",
  "<information>",
  "</information>",
  protocol.IMAGE_PLACEHOLDER,
)


class Tokenizer:
  """`encode` / `decode` / `token_to_id` over a `tokenizers.Tokenizer` or a HF tokenizer."""

  def __init__(self, backend: Any, name: str):
    self._backend = backend
    self.name = name
    self._fast = hasattr(backend, "encode_batch")  # a `tokenizers.Tokenizer`
    for token in protocol.SPECIAL_TOKENS:
      if self.token_to_id(token) is None:
        raise ValueError(f"Tokenizer {name} has no {token} token; it cannot render the protocol.")

  @property
  def backend(self) -> Any:
    """The underlying `tokenizers.Tokenizer` or transformers tokenizer (e.g. to save it)."""
    return self._backend

  @property
  def vocab_size(self) -> int:
    if self._fast:
      return self._backend.get_vocab_size(with_added_tokens=True)
    return len(self._backend)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; special-token strings map to their single ids, nothing is added."""
    if self._fast:
      return self._backend.encode(text, add_special_tokens=False).ids
    return self._backend.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    if self._fast:
      return self._backend.token_to_id(token)
    tid = self._backend.convert_tokens_to_ids(token)
    return None if tid == getattr(self._backend, "unk_token_id", -1) else tid

  def _id(self, token: str) -> int:
    return int(self.token_to_id(token))

  pad_id = property(lambda self: self._id(protocol.ENDOFTEXT))
  im_start_id = property(lambda self: self._id(protocol.IM_START))
  im_end_id = property(lambda self: self._id(protocol.IM_END))
  image_pad_id = property(lambda self: self._id(protocol.IMAGE_PAD))
  vision_start_id = property(lambda self: self._id(protocol.VISION_START))
  vision_end_id = property(lambda self: self._id(protocol.VISION_END))

  def __repr__(self) -> str:
    return f"Tokenizer({self.name}, vocab {self.vocab_size})"


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
  """A HF tokenizer from a local directory, or the embedded one when `path` is None."""
  if path is None or str(path) == "":
    return embedded_tokenizer()
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"Tokenizer directory not found: {path}")
  from transformers import AutoTokenizer

  return Tokenizer(AutoTokenizer.from_pretrained(str(path)), str(path))


# ----------------------------------------------------------------------------
# The embedded tokenizer.
# ----------------------------------------------------------------------------

_WORDS = """
the a an of in on at to for with by from and or not is are was were be been has have had
who what which where when why how this that these those it its his her their team cup won
winner winning founder founded coach coached player players captain emblem logo colour color
shape object video frame frames find provided please left right above below next near beside
red green blue yellow purple orange cyan white black circle square triangle diamond cross star
institute university company club league season year award prize champion championship final
born city country president director film actor actress singer song album band car race grand
prix search text image query information document title result results answer keyframe bbox
point select selected high res version your frame index not number target box one two three
first second third last moving small large person woman man hugs holds wears stands sits
""".split()


def _embedded_corpus() -> list[str]:
  """Deterministic training text covering everything the protocol writes."""
  rng = np.random.default_rng(0)
  lines = [
    protocol.system_prompt(ability, templates)
    for templates in protocol.BUILTIN_TEMPLATES
    for ability in ("one-hop", "in-video")
  ]
  lines += list(protocol.SPECIAL_TOKENS) + list(_TAGS)
  for i in range(0, 1001):
    lines.append(f"{i} [{i}, {(i * 7) % 1000}] frame {i}")
  for _ in range(3000):
    words = rng.choice(_WORDS, size=rng.integers(4, 14))
    lines.append(" ".join(words).capitalize() + rng.choice([".", "?", ",", "!"]))
  for _ in range(800):
    x1, y1, x2, y2, px, py = (int(v) for v in rng.integers(0, 1000, 6))
    q = " ".join(rng.choice(_WORDS, size=3))
    lines.append(
      f'<thinking> {q} </thinking> <search> {{"name": "text_search", "query": "{q}"}} </search>'
    )
    lines.append(f"<thinking> {q} </thinking> <keyframe> {x1 % 60} </keyframe>")
    lines.append(
      f'<thinking> {q} </thinking> <answer> {{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], '
      f'"point_2d": [{px}, {py}]}} </answer>'
    )
    lines.append(f"<information>1. (Title: {q.title()}) {q} {q}.\n</information>\n\n")
  return lines


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGRESEARCH_CACHE", "~/.cache/segresearch_jax")).expanduser()


def embedded_tokenizer(cache_dir: str | os.PathLike | None = None) -> Tokenizer:
  """The download-free byte-level BPE (built once, then read from the cache)."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers

  corpus = _embedded_corpus()
  key = hashlib.sha256(
    json.dumps([corpus, EMBEDDED_VOCAB_SIZE, list(protocol.SPECIAL_TOKENS), list(_TAGS)]).encode()
  ).hexdigest()[:16]
  path = pathlib.Path(cache_dir or _cache_dir()) / f"embedded_tokenizer_{key}.json"
  if path.is_file():
    return Tokenizer(HFTokenizer.from_file(str(path)), f"embedded:{key}")

  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=EMBEDDED_VOCAB_SIZE - len(_TAGS),
    special_tokens=list(protocol.SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus, trainer)
  tok.add_tokens(list(_TAGS))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tok.save(str(tmp))
  tmp.replace(path)
  return Tokenizer(HFTokenizer.from_file(str(path)), f"embedded:{key}")
