"""configs/okvos.py and its validation: every enum and range checked before anything
is built, the paper recipe's requirements, the 8B, DAPO and runlocal variants, the
learning-rate warm-up in training steps, the settings classes read from the config."""

import dataclasses
import numbers
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optimizer_config

from configs import okvos as okvos_config
from segresearch_jax import components, config_checks
from segresearch_jax.agent import episodes, rollout
from segresearch_jax.models import config as model_config
from segresearch_jax.rewards import okvos as okvos_reward
from segresearch_jax.rewards import scoring
from segresearch_jax.rl import losses, update
from segresearch_jax.search import factory as search_factory

# Numeric fields with no bound to check (any value is a valid choice).
UNBOUNDED = {"seed", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.max_replicated_elements"}


def _leaves(config, prefix=""):
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      yield from _leaves(value, name + ".")
    else:
      yield name, value


def _set(config, field, value):
  *sections, key = field.split(".")
  for s in sections:
    config = config[s]
  config[key] = value


def _paper(tmp_path, arg="paper"):
  config = okvos_config.get_config(arg)
  config.model.hf_dir = str(tmp_path)
  config.eval.sam2_checkpoint = str(tmp_path / "sam2.1_hiera_large.pt")
  return config


def test_default_and_every_variant_pass_validation(tmp_path):
  config_checks.validate_config(okvos_config.get_config())
  for arg in ("paper", "paper,8b", "paper,dapo", "paper,8b,dapo"):
    config_checks.validate_config(_paper(tmp_path, arg))


@pytest.mark.parametrize("field", sorted(config_checks.CONFIG_CHOICES))
def test_every_enum_rejects_an_unknown_value_naming_the_field(field):
  config = okvos_config.get_config()
  _set(config, field, "bogus")
  with pytest.raises(ValueError, match=rf"config\.{field}='bogus' is not one of"):
    config_checks.check_config(config)


def _out_of_range(field, accepts):
  value = dict(_leaves(okvos_config.get_config()))[field]
  candidates = [-2, 0, 1, 2] if isinstance(value, int) else [-2.0, -0.5, 0.0, 0.5, 1.0, 1.5]
  return next(v for v in candidates if not accepts(v))


@pytest.mark.parametrize("field, accepts", [(f, a) for f, a, _ in config_checks.CONFIG_RANGES])
def test_every_range_rejects_an_out_of_range_value_naming_the_field(field, accepts):
  config = okvos_config.get_config()
  value = _out_of_range(field, accepts)
  _set(config, field, value)
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r} is out of range"):
    config_checks.check_config(config)


def test_every_numeric_field_is_range_checked_or_declared_unbounded():
  checked = {f for f, _, _ in config_checks.CONFIG_RANGES}
  numeric = {
    name
    for name, value in _leaves(okvos_config.get_config())
    if isinstance(value, numbers.Number) and not isinstance(value, bool)
  }
  assert numeric - checked - UNBOUNDED == set()
  assert (checked | UNBOUNDED) - numeric == set()  # no stale entries


@pytest.mark.parametrize(
  "field, value",
  [
    ("rollout.top_p", 0.0),  # sampled uniformly over the vocabulary
    ("rollout.temperature", -1.0),  # sampled the inverted distribution
    ("rollout.temperature", 0.0),
    ("rollout.top_k", -1),
    ("loss.mini_batches", 0),  # ZeroDivisionError in check_config
    ("reward.mask_prompt", "boxes"),  # failed at the first GRPO step
    ("eval.segmenter", "sam"),  # failed at the final evaluation
    ("eval.search", "google"),
    ("data.max_broken_fraction", 1.5),
  ],
)
def test_reported_late_failures_fail_at_config_check(field, value):
  config = okvos_config.get_config()
  _set(config, field, value)
  with pytest.raises(ValueError, match=rf"config\.{field}="):
    config_checks.check_config(config)


def test_overlong_buffer_must_leave_room_below_the_response_cap():
  config = okvos_config.get_config()
  config.dapo.overlong_buffer = 4096  # on the embedded 384-token responses
  with pytest.raises(ValueError, match=r"config\.dapo\.overlong_buffer=4096 must be below"):
    config_checks.check_config(config)
  config.dapo.overlong_buffer = 128
  config_checks.check_config(config)


def test_paper_preset_needs_the_pretrained_checkpoint_and_sam2(tmp_path):
  config = okvos_config.get_config("paper")
  with pytest.raises(ValueError, match=r"--config\.model\.hf_dir="):
    config_checks.check_config(config)
  config.model.hf_dir = str(tmp_path)
  with pytest.raises(ValueError, match=r"--config\.eval\.sam2_checkpoint="):
    config_checks.check_config(config)
  config.eval.sam2_checkpoint = str(tmp_path / "missing.pt")
  with pytest.raises(FileNotFoundError, match=r"config\.eval\.sam2_checkpoint="):
    config_checks.check_config(config)
  # Evaluating a saved checkpoint does not need the HF weights.
  config = okvos_config.get_config("paper")
  config.eval.sam2_checkpoint = "/ckpt/sam2.pt"
  config_checks.validate_config(config, training=False)


def test_paper_evaluates_like_the_paper_and_validates_every_10_steps():
  config = okvos_config.get_config("paper")
  assert config.eval.segmenter == "sam2" and config.eval.masks
  assert config.eval.search == "serper"
  assert config.eval.every_steps == 10
  assert okvos_config.get_config().eval.search == ""  # the default evaluates as it trains


def test_8b_and_dapo_variants():
  c = okvos_config.get_config("paper,8b")
  assert (c.model.preset, c.total_steps, c.mesh.tensor) == ("qwen3_vl_8b", 160, 2)
  assert (c.rollout.max_response_length, c.rollout.max_obs_length) == (6144, 2048)
  assert c.optim.lr == 1e-6 and c.batch_size == 16  # the rest of the paper recipe
  d = okvos_config.get_config("paper,dapo")
  assert d.loss.clip_high == 0.3 and d.loss.clip_low == 0.2
  assert d.dapo.filter_groups and d.dapo.overlong_mask and d.dapo.overlong_buffer == 0
  assert d.model.preset == "qwen3_vl_4b"
  both = okvos_config.get_config("paper,8b,dapo")
  assert both.model.preset == "qwen3_vl_8b" and both.loss.clip_high == 0.3


def test_evaluation_search_backend_is_its_own_setting(tmp_path):
  config = okvos_config.get_config()
  config.workdir = str(tmp_path)
  assert components.eval_search_config(config) is config
  config.eval.search = "none"
  eval_config = components.eval_search_config(config)
  assert eval_config.search.backend == "none" and config.search.backend == "local"
  assert eval_config.search.text_top_k == config.search.text_top_k
  assert components.make_search_backend(eval_config, "") is None  # built from the copy


@pytest.mark.parametrize("mini_batches", [1, 2, 4])
def test_warmup_counts_training_steps(mini_batches):
  config = okvos_config.get_config()
  config.optim.lr, config.optim.warmup_steps = 1e-6, 10
  config.loss.mini_batches = mini_batches
  schedule = update.OptimizerConfig.from_config(config).schedule()
  for step in range(1, 14):
    for i in range(mini_batches):  # every update of a step runs at that step's lr
      count = (step - 1) * mini_batches + i
      assert float(schedule(count)) == pytest.approx(1e-6 * min(1.0, step / 10)), (step, i)
  assert float(schedule(0)) > 0  # the first update is not at lr 0
  assert float(schedule(9 * mini_batches)) == pytest.approx(1e-6)  # full lr from step 10 on
  # A warm-start step is one update.
  assert update.OptimizerConfig.from_config(config, sft=True).updates_per_step == 1


def test_optimizer_applies_the_step_schedule():
  # Adam's first updates on a constant gradient move each weight by about the lr.
  opt = update.make_optimizer(
    optimizer_config(lr=1e-2, warmup_steps=4, eps=1e-12, weight_decay=0.0, updates_per_step=2)
  )
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  moves = []
  for _ in range(10):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    params = optax.apply_updates(params, updates)
    moves.append(-float(updates["w"]))
  expected = [1e-2 * min(1.0, (c // 2 + 1) / 4) for c in range(10)]
  np.testing.assert_allclose(moves, expected, rtol=1e-4)


def test_runlocal_shrinks_any_recipe_to_a_cpu_run(tmp_path):
  small = okvos_config.get_config("runlocal")
  config_checks.validate_config(small)
  assert (small.model.preset, small.total_steps, small.batch_size) == ("tiny", 2, 2)
  assert (small.data.synthetic_train, small.data.synthetic_test) == (16, 4)
  paper = okvos_config.get_config("paper,runlocal")
  config_checks.validate_config(paper)  # no checkpoint, no SAM2 weights, no web search
  shrunk = [
    "model.preset",
    "data.frame_size",
    "data.keyframe_size",
    "data.search_image_size",
    "rollout.max_prompt_length",
    "rollout.max_response_length",
    "rollout.max_obs_length",
    "rollout.group_size",
    "batch_size",
    "total_steps",
  ]
  small_fields, paper_fields = dict(_leaves(small)), dict(_leaves(paper))
  for field in shrunk:
    assert paper_fields[field] == small_fields[field], field
  # What is not a size stays the recipe's.
  assert paper.optim.lr == 1e-6 and paper.search.method == "dense" and paper.data.source == "okvos"
  assert paper.eval.segmenter == "weight_free" and paper.eval.search == ""


def test_settings_classes_read_every_field_from_the_config():
  config = okvos_config.get_config()
  config.search.hybrid_alpha = 0.25
  config.search.max_retries = 5
  config.loss.clip_high = 0.28
  config.rollout.observe_rows = 3
  config.reward.tpr_budget = 7
  search = search_factory.SearchConfig.from_config(config.search)
  for field in dataclasses.fields(search):
    assert getattr(search, field.name) == config.search[field.name], field.name
  assert search.hybrid_alpha == 0.25 and search.max_retries == 5
  loss = losses.LossConfig.from_config(config.loss)
  for field in dataclasses.fields(loss):
    assert getattr(loss, field.name) == config.loss[field.name], field.name
  model_cfg = model_config.get_preset("tiny")
  shapes = episodes.EpisodeShapes.from_config(config, model_cfg)
  assert (shapes.frame_size, shapes.search_size) == (64, 32)
  tokenizer = types.SimpleNamespace(im_end_id=1, image_pad_id=2, vision_start_id=3, vision_end_id=4)
  rcfg = rollout.RolloutConfig.from_config(config, shapes, tokenizer, group_size=1)
  assert (rcfg.observe_rows, rcfg.group_size, rcfg.max_turns) == (3, 1, 4)
  assert rcfg.banned_ids == (2, 3, 4)
  score = scoring.ScoreConfig.from_config(config)
  assert score.reward.tpr_budget == 7 and score.mask_weight == 1.0


def test_settings_classes_keep_no_second_copy_of_a_config_default():
  """A settings field that the config holds has no default of its own: the config is the
  one source of its value."""
  config = okvos_config.get_config()
  score_blocks = (config.reward, config.rollout, config.dapo)
  for cls, blocks in (
    (rollout.RolloutConfig, (config.rollout,)),
    (losses.LossConfig, (config.loss,)),
    (okvos_reward.RewardConfig, (config.reward,)),
    (scoring.ScoreConfig, score_blocks),
    (update.OptimizerConfig, (config.optim,)),
  ):
    for field in dataclasses.fields(cls):
      if any(field.name in block for block in blocks):
        assert field.default is dataclasses.MISSING, f"{cls.__name__}.{field.name}"
  # ScoreConfig.reward comes from the reward block too.
  assert dataclasses.fields(scoring.ScoreConfig)[0].default is dataclasses.MISSING


def test_optimizer_settings_of_grpo_and_the_warm_start():
  config = okvos_config.get_config()
  config.optim.b2, config.loss.mini_batches = 0.95, 2
  grpo = update.OptimizerConfig.from_config(config)
  for name in ("lr", "warmup_steps", "b1", "b2", "eps", "weight_decay", "grad_clip"):
    assert getattr(grpo, name) == config.optim[name], name
  assert grpo.updates_per_step == 2
  sft = update.OptimizerConfig.from_config(config, sft=True)
  assert (sft.lr, sft.warmup_steps, sft.updates_per_step) == (
    config.sft.lr,
    config.sft.warmup_steps,
    1,
  )
  assert sft.b2 == 0.95  # AdamW's settings stay the run's


def test_the_run_search_backend_is_built_from_config_search(monkeypatch, tmp_path):
  seen = {}

  def make_backend(settings, **paths):
    seen.update(settings=settings, **paths)
    return types.SimpleNamespace(text_search=lambda query, k: [])

  monkeypatch.setattr(search_factory, "make_backend", make_backend)
  config = okvos_config.get_config()
  config.workdir = str(tmp_path)
  config.search.hybrid_alpha = 0.25
  components.make_search_backend(config, str(tmp_path / "kb"))
  assert seen["settings"].hybrid_alpha == 0.25 and seen["settings"].method == "bm25"
  assert seen["text_corpus"] == str(tmp_path / "kb" / "text_corpus.jsonl")
  assert seen["cache_path"] == str(tmp_path / "search_cache.sqlite")


def test_model_compute_settings_reach_the_policy():
  config = okvos_config.get_config("runlocal")
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  tokenizer = components.load_run_tokenizer(config)
  model_cfg, _ = components.build_policy(config, tokenizer)
  assert (model_cfg.dtype, model_cfg.remat) == ("bfloat16", "full")


def test_the_bridge_waits_as_long_as_a_web_call_may_take():
  config = okvos_config.get_config()
  local = search_factory.SearchConfig.from_config(config.search)
  assert local.call_budget_s() == 2 * config.search.timeout_s  # local retrieval: as before
  config.search.backend = "serper"
  pages = search_factory.SearchConfig.from_config(config.search)
  config.search.summarizer_url = "http://127.0.0.1:9/v1"
  summarised = search_factory.SearchConfig.from_config(config.search)
  # The search request with its retries + the pages (or 6 image downloads), then the summariser.
  t, r = config.search.timeout_s, config.search.max_retries
  assert pages.call_budget_s() >= (r + 1) * t + t
  assert summarised.call_budget_s() >= pages.call_budget_s() + config.search.summarizer_timeout_s
