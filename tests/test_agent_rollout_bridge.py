"""The rollout against the real bridge, tokenizer and a synthetic knowledge base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rollout_config, search_settings

from segresearch_jax import protocol
from segresearch_jax.agent import bridge as bridge_lib
from segresearch_jax.agent import rollout
from segresearch_jax.data import synthetic
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, processor
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.search import factory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  paths = synthetic.build(root, seed=0, num_train=4, num_test=4)
  tok = tokenizer_lib.embedded_tokenizer()
  backend = factory.make_backend(
    search_settings(method="bm25"),
    text_corpus=str(paths.text_corpus),
    image_corpus=str(paths.image_corpus),
    images_dir=str(paths.kb_dir) + "/images",
  )
  return paths, tok, backend


def test_search_and_keyframe_through_the_real_bridge(world):
  paths, tok, backend = world
  cfg = config_lib.get_preset(
    "tiny",
    image_token_id=tok.image_pad_id,
    vision_start_token_id=tok.vision_start_id,
    vision_end_token_id=tok.vision_end_id,
  )
  cfg = config_lib.with_vocab(cfg, tok.vocab_size)
  frame_grid, key_grid, search_grid = (2, 2), (3, 3), (2, 2)
  nk, ns = 9, 4
  br = bridge_lib.SearchBridge(
    backend,
    tok,
    max_obs_length=160,
    keyframe_image_tokens=nk,
    search_image_tokens=ns,
    search_image_size=64,
    pad_id=tok.pad_id,
  )
  rcfg = rollout_config(
    group_size=1,
    max_turns=3,
    max_response_length=320,
    max_action_length=48,
    max_obs_length=160,
    temperature=1.0,
    im_end_id=tok.im_end_id,
    frame_grid=frame_grid,
    keyframe_grid=key_grid,
    search_grid=search_grid,
    banned_ids=(tok.image_pad_id, tok.vision_start_id, tok.vision_end_id),
  )
  patterns = rollout.stop_patterns(tok, ["</search>", "</keyframe>"])
  host_fn = rollout.bridge_host_fn(br, processor.QWEN3_VL, 64)
  fn = rollout.make_rollout_fn(cfg, rcfg, patterns, host_fn, (16, cfg.vision.patch_dim))

  frame_numbers = [0, 5]
  br.set_shown_frames([frame_numbers])
  text = protocol.chat_prompt(
    protocol.system_prompt("one-hop"), protocol.user_content(frame_numbers, "q")
  )
  rng = np.random.default_rng(0)
  frames = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in frame_numbers]
  small = processor.dataclasses.replace(processor.QWEN3_VL, min_pixels=0)
  enc = processor.encode_prompt(text, frames, tok, small, (64, 64))
  ids = enc["input_ids"][None]
  pos, next_pos = policy.rope_index(ids, np.ones_like(ids), [[frame_grid] * 2], cfg.image_token_id)
  keyframes, _ = processor.preprocess_images(frames, small, (96, 96))
  script = tok.encode(
    '<thinking> who </thinking> <search> {"name": "text_search", "query": "Cup winner"} </search>'
    "<thinking> ok </thinking> <keyframe> 5 </keyframe>"
  )
  batch = rollout.PromptBatch(
    prompt_ids=jnp.asarray(ids),
    prompt_valid=jnp.ones(ids.shape, bool),
    prompt_positions=jnp.asarray(pos),
    next_pos=jnp.asarray(next_pos),
    frame_patches=jnp.asarray(enc["pixel_values"]).reshape(1, 2, 16, -1),
    keyframe_patches=jnp.asarray(keyframes).reshape(1, 2, 36, -1),
    forced_tokens=jnp.asarray([script], jnp.int32),
  )
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  out = fn(params, batch, jax.random.PRNGKey(0))
  n = int(out.response_length[0])
  decoded = tok.decode(np.asarray(out.response_ids[0, :n]))
  # After the scripted search and keyframe the random policy rambles: its turns are cut
  # at max_action_length and come back as error observations.
  assert int(out.num_turns[0]) >= 2
  assert "<information>1. (Title:" in decoded
  assert "Here is the high-res version of your selected frame:" in decoded
  assert decoded.count(protocol.IMAGE_PAD) == nk
  assert int(out.obs_kind[0, 1]) == protocol.KEYFRAME_IMAGE and int(out.obs_slot[0, 1]) == 1
  records = br.pop_records()
  assert [r.action for r in records][:2] == ["search", "keyframe"]
