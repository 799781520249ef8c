"""The embedded tokenizer and the wrapper over a local HF tokenizer directory."""

import json

import numpy as np
import pytest

from segresearch_jax import protocol
from segresearch_jax.models import processor
from segresearch_jax.models import tokenizer as tokenizer_lib

QWEN_STYLE_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.embedded_tokenizer(tmp_path_factory.mktemp("cache"))


def test_round_trip_and_single_special_ids(tok):
  text = protocol.chat_prompt("sys", protocol.user_content([0, 15], "Please find 'x'.")) + (
    '<thinking> hm </thinking> <search> {"name": "text_search", "query": "Zarnok Cup"} </search>'
  )
  assert tok.decode(tok.encode(text)) == text
  for s in protocol.SPECIAL_TOKENS:
    assert tok.encode(s) == [tok.token_to_id(s)]
  assert tok.decode(tok.encode(protocol.IM_END + "hi"), skip_special_tokens=True) == "hi"
  assert len({tok.pad_id, tok.im_end_id, tok.image_pad_id, tok.vision_start_id}) == 4


def test_deterministic_and_cached(tmp_path):
  a = tokenizer_lib.embedded_tokenizer(tmp_path / "a")
  b = tokenizer_lib.embedded_tokenizer(tmp_path / "b")
  text = "The emblem of the team that won the 2031 Glimmer Cup </answer>"
  assert a.encode(text) == b.encode(text) and a.vocab_size == b.vocab_size
  assert len(list((tmp_path / "a").glob("embedded_tokenizer_*.json"))) == 1
  assert tokenizer_lib.embedded_tokenizer(tmp_path / "a").encode(text) == a.encode(text)


def test_hf_directory_gives_the_same_ids_and_chat_template(tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  tok._backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": QWEN_STYLE_TEMPLATE,
        "eos_token": protocol.IM_END,
        "pad_token": protocol.ENDOFTEXT,
      }
    )
  )
  hf = tokenizer_lib.load_tokenizer(tmp_path)
  text = protocol.user_content([3, 9], "Please find 'the red circle' in the provided video.")
  assert hf.encode(text) == tok.encode(text)
  assert hf.im_end_id == tok.im_end_id and hf.image_pad_id == tok.image_pad_id
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": text}]
  rendered = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
  )
  assert rendered == protocol.chat_prompt("S", text)


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="Tokenizer directory not found"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")


def test_encode_prompt_expands_one_pad_run_per_image(tok):
  frames = [np.zeros((64, 64, 3), np.uint8)] * 2
  text = protocol.chat_prompt("s", protocol.user_content([0, 5], "q"))
  enc = processor.encode_prompt(text, frames, tok, processor.QWEN3_VL, (64, 64))
  # smart_resize lifts 64x64 to the 65536-pixel minimum: 256x256 -> 8x8 merged tokens.
  assert list(enc["grid_thw"][0]) == [1, 16, 16]
  assert int(np.sum(enc["input_ids"] == tok.image_pad_id)) == 2 * 64
  assert enc["pixel_values"].shape == (2 * 256, 3 * 2 * 16 * 16)
