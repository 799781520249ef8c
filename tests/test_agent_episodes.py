"""Prompt encoding for the rollout and expert episodes through the real bridge."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reward_config, shrink_rollout

from configs import okvos as okvos_config
from segresearch_jax import components, protocol
from segresearch_jax.agent import episodes, rollout
from segresearch_jax.data import synthetic
from segresearch_jax.models import tokenizer as tokenizer_lib

# Under `pytest -n 2 --dist loadgroup` one worker builds the module's world once.
pytestmark = pytest.mark.xdist_group("agent_episodes")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("episodes")
  paths = synthetic.build(root / "syn", seed=0, num_train=8, num_test=2, frames=(6, 8))
  config = okvos_config.get_config()
  config.workdir = str(root / "run")
  config.model.preset = "tiny"
  shrink_rollout(config)
  tok = tokenizer_lib.embedded_tokenizer()
  model_cfg, params = components.build_policy(config, tok)
  shapes = episodes.EpisodeShapes.from_config(config, model_cfg)
  encoder = episodes.PromptEncoder(tok, model_cfg, shapes)
  backend = components.make_search_backend(config, paths.kb_dir)
  bridge = components.make_bridge(config, backend, tok, shapes)
  dataset, _ = components.make_dataset(
    config, paths.okvos_dir, "train", encoder, train=False, batch_size=1
  )
  samples = [{k: v[0] for k, v in batch.items()} for batch in dataset]
  return dict(
    config=config,
    tok=tok,
    model_cfg=model_cfg,
    params=params,
    shapes=shapes,
    bridge=bridge,
    samples=samples,
  )


def test_shapes_follow_the_processor():
  config = okvos_config.get_config("paper")
  from segresearch_jax.models import config as config_lib

  shapes = episodes.EpisodeShapes.from_config(config, config_lib.get_preset("qwen3_vl_4b"))
  # docs/method.md §1.2: 448 px -> 196 tokens, 864 px -> 729, 256 px -> 64 with Qwen3-VL.
  assert shapes.tokens(448) == 196
  assert shapes.tokens(864) == 729
  assert shapes.tokens(256) == 64
  assert shapes.search_patch_shape == (256, 1536)


def test_prompt_encoder_left_pads_and_counts_image_tokens(world):
  s = world["samples"][0]
  lp = world["config"].rollout.max_prompt_length
  assert s["prompt_ids"].shape == (lp,)
  valid = s["prompt_valid"]
  assert not valid[0] and valid[-1]  # left padding
  ids = s["prompt_ids"][valid]
  n_frames = int(np.sum(s["frame_valid"]))
  assert np.sum(ids == world["tok"].image_pad_id) == n_frames * 4  # 64 px -> 2x2 tokens
  text = world["tok"].decode(ids)
  assert text.startswith(protocol.IM_START + "system\n") and text.endswith("assistant\n")
  # The keyframe copy is the original frame file at keyframe_size (96 px -> 6x6 patches).
  assert s["keyframe_patches"].shape[1:] == (36, world["shapes"].patch_dim)
  assert np.abs(s["keyframe_patches"][:n_frames]).sum() > 0


def test_expert_turns_follow_the_reference_chain(world):
  by_ability = {s["ability"]: s for s in world["samples"]}
  one_hop = by_ability["one-hop"]
  turns = episodes.expert_turns(one_hop)
  chain = json.loads(one_hop["reference_chain"])
  assert len(turns) == len(chain) + 2
  assert json.dumps({"name": "text_search", "query": chain[0]["query"]}) in turns[0]
  assert turns[0].endswith("</search>") and turns[-1].endswith(protocol.IM_END)
  gt = json.loads(one_hop["ground_truth"])
  frame = protocol.first_keyframe(turns[1])
  shown = [int(f) for f, ok in zip(one_hop["frame_numbers"], one_hop["frame_valid"]) if ok]
  assert frame in shown
  assert gt[str(frame)]["area"] == max(gt[str(f)]["area"] for f in shown if str(f) in gt)
  answer = protocol.parse_answer(turns[-1])
  assert list(answer.bbox_2d) == gt[str(frame)]["bbox_2d"]
  # The full expert trajectory earns the whole official reward but its process part.
  from segresearch_jax.rewards import okvos

  text = " ".join(t.replace(protocol.IM_END, "") for t in turns)
  r = okvos.score_response(
    text, gt, one_hop["steps"], embed_fn=lambda q: np.ones((len(q), 4)) / 2, config=reward_config()
  )
  assert r["iou_score"] == r["box_l1_score"] == r["point_l1_score"] == 1.0
  assert r["keyframe_score"] == gt[str(frame)]["max_conn_area"]
  in_video = episodes.expert_turns(by_ability["in-video"])
  assert len(in_video) == 2 and "<search>" not in in_video[0]


def test_expert_reasoning_reads_the_frames(world):
  """The keyframe turn names each shown frame and the colour drawn big in it, in
  order, up to the target's (the keyframe); a relational turn reads them all. The answer turn
  names the colour in each cell of the keyframe up to the named object's: the
  target's, or a relational target's neighbour, then the cell beside it."""
  stopped = 0
  for sample in world["samples"]:
    record = json.loads(sample["reference_frames"])
    objects, big = record["objects"], record["big"]
    oid, named = int(sample["oid"]), int(record["reference"])
    shown = [int(f) for f, ok in zip(sample["frame_numbers"], sample["frame_valid"]) if ok]
    turns = episodes.expert_turns(sample)
    frame = protocol.first_keyframe(turns[-2])
    read = turns[-2].split(" Big: ")[1].split(". </thinking>")[0].split(", ")
    everything = [f"frame {f} {objects[big[str(f)]]['colour']}" for f in shown]
    relational = sample["ability"] == "relational"
    assert named == (synthetic.beside(oid) if relational else oid)
    if relational or big[str(frame)] != oid:
      assert read == everything  # No colour to stop at, or the target's big frame unshown.
    else:
      assert read == everything[: shown.index(frame) + 1]
      assert read[-1] == f"frame {frame} {objects[oid]['colour']}"
      stopped += 1
    cells = ", ".join(f"{o['cell']} {o['colour']}" for o in objects[: named + 1])
    beside = f", beside it {objects[oid]['cell']}" if relational else ""
    assert f" Here: {cells}{beside}. </thinking> <answer>" in turns[-1]
  assert stopped
  # Without a record of the frames (a real dataset) the turns do not describe them.
  sample = world["samples"][0]
  plain = episodes.expert_turns({**sample, "reference_frames": ""})
  assert " Big: " not in plain[-2] and " Here: " not in plain[-1]
  assert protocol.first_keyframe(plain[-2]) == protocol.first_keyframe(
    episodes.expert_turns(sample)[-2]
  )


def test_expert_episode_equals_a_forced_rollout(world):
  tok, model_cfg, shapes = world["tok"], world["model_cfg"], world["shapes"]
  config = world["config"]
  sample = next(s for s in world["samples"] if s["ability"] == "multi-hop")
  turns = episodes.expert_turns(sample)
  bridge = world["bridge"]
  rcfg = rollout.RolloutConfig.from_config(config, shapes, tok, group_size=1)
  host_fn = rollout.bridge_host_fn(bridge, shapes.image_cfg, shapes.search_size)
  shown = [int(f) for f, ok in zip(sample["frame_numbers"], sample["frame_valid"]) if ok]
  bridge.set_shown_frames([shown])
  expert = episodes.expert_episode(
    turns, host_fn, tok, model_cfg, rcfg, shapes.search_patch_shape, int(sample["next_pos"])
  )
  assert expert is not None

  script = [t for turn in turns for t in tok.encode(turn)]
  batch = {k: np.asarray(v)[None] for k, v in sample.items()}
  runner = episodes.Runner(model_cfg, rcfg, shapes, tok, bridge)
  inputs = rollout.PromptBatch.from_batch(batch)
  inputs = inputs.replace(forced_tokens=jnp.asarray([script], jnp.int32))
  bridge.set_shown_frames([shown])
  out = jax.device_get(runner.fn(world["params"], inputs, jax.random.PRNGKey(0)))
  n = int(out.response_length[0])
  assert n == int(expert.response_length[0])
  for key in ("response_ids", "loss_mask", "response_valid"):
    np.testing.assert_array_equal(
      np.asarray(getattr(out, key))[0, :n], getattr(expert, key)[0, :n], err_msg=key
    )
  np.testing.assert_array_equal(
    np.asarray(out.response_positions)[0, :, :n], expert.response_positions[0, :, :n]
  )
  np.testing.assert_array_equal(np.asarray(out.obs_kind), expert.obs_kind)
  np.testing.assert_array_equal(np.asarray(out.obs_slot), expert.obs_slot)
  assert protocol.STOP_REASONS[int(out.stop_reason[0])] == "finished"
  text = tok.decode(expert.response_ids[0, :n])
  assert text.count("<information>") == 2 and "high-res version" in text


def test_expert_episode_too_long_is_reported_as_none(world):
  tok, model_cfg, shapes = world["tok"], world["model_cfg"], world["shapes"]
  rcfg = rollout.RolloutConfig.from_config(world["config"], shapes, tok, group_size=1)
  rcfg = rollout.RolloutConfig(**{**rcfg.__dict__, "max_response_length": 16})
  host_fn = rollout.bridge_host_fn(world["bridge"], shapes.image_cfg, shapes.search_size)
  turns = episodes.expert_turns(world["samples"][0])
  assert (
    episodes.expert_episode(turns, host_fn, tok, model_cfg, rcfg, shapes.search_patch_shape, 10)
    is None
  )
