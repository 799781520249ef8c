"""What a run is built from: the policy, its data, search, bridge, runners and scorers.

    tokenizer = components.load_run_tokenizer(config)
    model_cfg, params = components.build_policy(config, tokenizer, mesh)
    c = components.build_components(config, tokenizer, model_cfg)
    dataset, source = c.eval_dataset()

Shared by the trainer (`train.py`), evaluation (`evaluate.py`), the reasoning
benchmarks (`eval/reasoning.py`), the notebooks and the benchmarks, so each builds
these pieces the same way from the same config fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax import sharding
from segresearch_jax.agent import bridge as bridge_lib
from segresearch_jax.agent import episodes as episodes_lib
from segresearch_jax.agent import rollout
from segresearch_jax.data import okvos as okvos_lib
from segresearch_jax.data import pipeline
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import layers, policy, weights
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.rewards import scoring
from segresearch_jax.rl import rows as rows_lib
from segresearch_jax.rl import update
from segresearch_jax.search import factory as search_factory

# ----------------------------------------------------------------------------
# The policy.
# ----------------------------------------------------------------------------


def load_run_tokenizer(config):
  """`model.tokenizer_dir`, else the HF checkpoint's own tokenizer, else the embedded one.

  A real checkpoint never runs with the embedded tokenizer: its ids would be
  meaningless to the weights.
  """
  return tokenizer_lib.load_tokenizer(config.model.tokenizer_dir or config.model.hf_dir or None)


def build_policy(config, tokenizer, mesh=None) -> tuple[config_lib.ModelConfig, dict]:
  """The policy's shapes and initial parameters (from a HF directory or a preset).

  Small presets take their vocabulary and special-token ids from the run's
  tokenizer; a HF checkpoint brings its own config and weights. With a mesh the
  parameters are created (or placed) sharded by the config's partition rules. The
  model computes as `config.model` asks (dtype, remat, scan_layers, attention).
  """
  if config.model.hf_dir:
    model_cfg, params = weights.load_hf_checkpoint(config.model.hf_dir, jnp.float32, config.model)
    if mesh is not None:
      params = jax.device_put(params, param_sharding(config, mesh, params))
    return model_cfg, params
  model_cfg = config_lib.with_compute(config_lib.get_preset(config.model.preset), config.model)
  if model_cfg.text.vocab_size < tokenizer.vocab_size or config.model.preset in (
    "tiny",
    "embedded",
  ):
    model_cfg = dataclasses.replace(
      config_lib.with_vocab(model_cfg, tokenizer.vocab_size),
      image_token_id=tokenizer.image_pad_id,
      vision_start_token_id=tokenizer.vision_start_id,
      vision_end_token_id=tokenizer.vision_end_id,
    )
  init_fn = functools.partial(policy.init_params, model_cfg)
  rng = jax.random.PRNGKey(config.seed)
  if mesh is None:
    return model_cfg, jax.jit(init_fn)(rng)
  shardings = param_sharding(config, mesh, jax.eval_shape(init_fn, rng))
  return model_cfg, sharding.create_sharded(init_fn, rng, shardings=shardings)


def param_sharding(config, mesh, abstract_params) -> Any:
  """NamedShardings of the parameters from `mesh.rules` then the default rules."""
  return sharding.param_shardings(abstract_params, sharding.rules_from_config(config.mesh), mesh)


# ----------------------------------------------------------------------------
# Search and the bridge.
# ----------------------------------------------------------------------------


def eval_search_config(config):
  """The config evaluation builds its search backend from: `config` itself when
  `eval.search` is "" or the training backend, else a copy with `search.backend`
  replaced (the other `search` settings kept)."""
  if config.eval.search in ("", config.search.backend):
    return config
  copy = config.copy_and_resolve_references()
  copy.search.backend = config.eval.search
  return copy


def make_search_backend(config, kb_dir: str):
  """The configured backend (None when `search.backend == "none"`), checked with one query."""
  s = config.search
  if s.backend == "none":
    return None
  kb = s.kb_dir or kb_dir
  paths = {}
  if s.backend == "local":
    if not kb:
      raise ValueError("search.backend=local needs search.kb_dir (or the synthetic data set).")
    image_corpus = os.path.join(kb, "image_corpus.jsonl")
    # Image files are found next to the corpus (`images/`, or each row's image_path).
    paths.update(
      text_corpus=os.path.join(kb, "text_corpus.jsonl"),
      image_corpus=image_corpus if os.path.isfile(image_corpus) else None,
    )
  if s.cache_mode != "off":
    suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
    paths["cache_path"] = s.cache_path or os.path.join(
      config.workdir, f"search_cache{suffix}.sqlite"
    )
  backend = search_factory.make_backend(search_factory.SearchConfig.from_config(s), **paths)
  try:  # A backend that is down fails here, not in the middle of a rollout.
    backend.text_search("health check", 1)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
      f"Search backend {s.backend!r} does not answer ({type(e).__name__}: {e}); "
      "fix config.search or run with --config.search.backend=none."
    ) from e
  return backend


def make_bridge(
  config, backend, tokenizer, shapes: episodes_lib.EpisodeShapes
) -> bridge_lib.SearchBridge:
  """The host bridge that serves the rollout's searches from `backend` (None = detached)."""
  return bridge_lib.SearchBridge(
    backend,
    tokenizer,
    max_obs_length=config.rollout.max_obs_length,
    text_top_k=config.search.text_top_k,
    image_top_k=config.search.image_top_k,
    keyframe_image_tokens=shapes.tokens(shapes.keyframe_size),
    search_image_tokens=shapes.tokens(shapes.search_size),
    search_image_size=shapes.search_size,
    call_timeout_s=search_factory.SearchConfig.from_config(config.search).call_budget_s(),
    pad_id=tokenizer.pad_id,
  )


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def make_dataset(
  config,
  okvos_dir,
  split,
  encoder,
  *,
  train: bool,
  batch_size: int,
  mask_cache_dir=None,
  whole: bool = False,
):
  """Batches of prepared + encoded prompts; training repeats forever, evaluation once.

  Each process reads its share of the samples (`batch_size` is per process) unless
  `whole` (evaluation, which runs on process 0 and scores a broken sample 0 instead
  of stopping at `data.max_broken_fraction`). `mask_cache_dir` attaches each
  sample's mask-IoU tables (the mask reward's input).
  """
  dataset, source = pipeline.okvos_dataset(
    okvos_dir,
    split,
    batch_size=batch_size,
    seed=config.seed,
    on_error=config.data.on_error,
    num_frames=config.data.num_frames,
    frame_size=config.data.frame_size,
    convention=encoder.model_cfg.coord_convention,
    encode_fn=encoder,
    shuffle=train,
    num_epochs=None if train else 1,
    drop_remainder=train,
    template_dir=config.data.templates or None,
    mask_cache_dir=mask_cache_dir,
    max_broken_fraction=None if whole else config.data.max_broken_fraction,
    **(dict(shard_index=0, shard_count=1) if whole else {}),
  )
  return dataset, source


# ----------------------------------------------------------------------------
# Everything a run uses besides the policy's parameters.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Components:
  """The pieces of a run that `build_components` builds from the config.

  Attributes:
    model_cfg: the policy's shapes.
    shapes: image and episode shapes (`episodes.EpisodeShapes.from_config`).
    encoder: turns a prepared sample into prompt tokens and patches.
    okvos_dir: the OK-VOS folder (raw layout) the run reads.
    kb_dir: the knowledge base that came with the data ("" when none).
    bridge: the training rollout's search bridge.
    rcfg: the training rollout's settings.
    mask_cache_dir: the mask-IoU tables of the training split (None without the
      mask reward).
    runner: sampled episodes, `rollout.group_size` per prompt.
    eval_runner: greedy episodes, one per prompt, with evaluation's search backend.
    scorer: reward terms and advantages of `runner`'s groups (mask term included).
    eval_scorer: reward terms of `eval_runner`'s episodes.
    eval_dataset: () -> (batches of the held-out split in order, its data source;
      the source names the samples the pipeline skipped).
  """

  model_cfg: config_lib.ModelConfig
  shapes: episodes_lib.EpisodeShapes
  encoder: episodes_lib.PromptEncoder
  okvos_dir: str
  kb_dir: str
  bridge: bridge_lib.SearchBridge
  rcfg: rollout.RolloutConfig
  mask_cache_dir: str | None
  runner: episodes_lib.Runner
  eval_runner: episodes_lib.Runner
  scorer: scoring.Scorer
  eval_scorer: scoring.Scorer
  eval_dataset: Callable[[], tuple[Iterable[dict[str, Any]], okvos_lib.OkvosDataSource]]


def build_components(
  config, tokenizer, model_cfg: config_lib.ModelConfig, mesh: Any = None
) -> Components:
  """Data, search, bridge, rollout runners and scorers of a run (shared with evaluate).

  With the training `mesh`, the training and evaluation rollouts run on this process's
  devices of it (`sharding.rollout_mesh`; give them `sharding.rollout_params`); without
  one (the evaluation CLI), on one device.
  """
  rollout_mesh = None if mesh is None else sharding.rollout_mesh(mesh)
  shapes = episodes_lib.EpisodeShapes.from_config(config, model_cfg)
  encoder = episodes_lib.PromptEncoder(tokenizer, model_cfg, shapes)
  okvos_dir, kb_dir = pipeline.resolve_data(config.data, config.workdir, config.seed)
  backend = make_search_backend(config, kb_dir)
  bridge = make_bridge(config, backend, tokenizer, shapes)
  eval_bridge = bridge
  if eval_search_config(config) is not config:
    eval_backend = make_search_backend(eval_search_config(config), kb_dir)
    eval_bridge = make_bridge(config, eval_backend, tokenizer, shapes)
  mask_cache_dir = None
  if config.reward.mask_weight > 0:  # The mask reward reads precomputed IoU tables.
    from segresearch_jax.segmentation import mask_cache

    # Only the samples this run's steps read (a resumed or longer run builds the rest).
    mask_cache_dir = mask_cache.build(
      config, config.data.train_split, stream_samples=config.total_steps * config.batch_size
    )
  rcfg = rollout.RolloutConfig.from_config(config, shapes, tokenizer)
  eval_rcfg = rollout.RolloutConfig.from_config(
    config, shapes, tokenizer, group_size=1, temperature=0.0
  )
  return Components(
    model_cfg=model_cfg,
    shapes=shapes,
    encoder=encoder,
    okvos_dir=okvos_dir,
    kb_dir=kb_dir,
    bridge=bridge,
    rcfg=rcfg,
    mask_cache_dir=mask_cache_dir,
    runner=episodes_lib.Runner(
      model_cfg,
      rcfg,
      shapes,
      tokenizer,
      bridge,
      mesh=rollout_mesh,
    ),
    eval_runner=episodes_lib.Runner(
      model_cfg, eval_rcfg, shapes, tokenizer, eval_bridge, mesh=rollout_mesh
    ),
    scorer=scoring.Scorer(config, config.rollout.group_size, model_cfg.coord_convention, mask=True),
    eval_scorer=scoring.Scorer(config, 1, model_cfg.coord_convention),
    eval_dataset=lambda: make_dataset(
      config,
      okvos_dir,
      config.data.eval_split,
      encoder,
      train=False,
      batch_size=config.batch_size,
      whole=True,
    ),
  )


# ----------------------------------------------------------------------------
# The memory plan of a run.
# ----------------------------------------------------------------------------


def plan_model_config(config: Any) -> config_lib.ModelConfig:
  """The run's model shapes: `model.hf_dir`'s config.json (no weights read), else the preset.

  The tiny and embedded presets keep their own vocabulary here; the trainer resizes it
  to the tokenizer's, which changes the embedding rows only.
  """
  if config.model.hf_dir:
    path = pathlib.Path(config.model.hf_dir) / "config.json"
    if not path.is_file():
      raise FileNotFoundError(f"No config.json in model.hf_dir {config.model.hf_dir!r}.")
    return config_lib.from_hf_config(json.loads(path.read_text()))
  return config_lib.get_preset(config.model.preset)


def plan_image_patches(
  config: Any, model_cfg: config_lib.ModelConfig, row_devices: int = 1
) -> tuple[int, ...]:
  """Patches of the images the update encodes for one trajectory (`steps.training_inputs`):
  its share of the shown frames (encoded once for the rows of a group on one of the
  `row_devices` devices: `rows.shared_frame_rows`), and at most one keyframe and one
  image_search result per turn (`rows.fit_rows`)."""
  v = model_cfg.vision
  factor = v.patch_size * v.spatial_merge_size

  def patches(size: int) -> int:
    # The processor resizes each side to a multiple of patch x merge (smart_resize).
    side = max(round(size / factor), 1) * v.spatial_merge_size
    return side * side

  turns = config.rollout.max_turns
  shared = rows_lib.shared_frame_rows(
    config.rollout.group_size,
    config.loss.micro_batches,
    rows=config.batch_size * config.rollout.group_size // config.loss.mini_batches,
    row_devices=row_devices,
  )
  return (
    (patches(config.data.frame_size),) * -(-config.data.num_frames // shared)
    + (patches(config.data.keyframe_size),) * turns
    + (patches(config.data.search_image_size),) * turns
  )


def _plan_mesh_sizes(
  config: Any, mesh_override: str | Mapping[str, int] | None, num_devices: int | None
) -> dict[str, int]:
  if isinstance(mesh_override, str) and mesh_override:
    sizes = sharding.parse_mesh(mesh_override)
  elif isinstance(mesh_override, Mapping) and mesh_override:
    # As in the text form (`sharding.parse_mesh`), axes an override leaves out are 1.
    sizes = {axis: mesh_override.get(axis, 1) for axis in sharding.AXES}
  else:
    sizes = {axis: config.mesh[axis] for axis in sharding.AXES}
  if -1 in sizes.values():
    return sharding.mesh_shape(sizes, num_devices or jax.device_count())
  return sharding.mesh_shape(sizes, math.prod(sizes.values()))


def plan_run(
  config: Any,
  mesh_override: str | Mapping[str, int] | None = None,
  num_devices: int | None = None,
  platform: str | None = None,
) -> sharding.Plan:
  """The sharding and memory plan of a run config (`sharding.plan` of its numbers).

  Abstract arrays only, so a large mesh plans on one CPU: `tools/plan.py` prints it
  and `train.py --config.dry_run=True` returns it.

  Args:
    config: the run config (configs/okvos.py).
    mesh_override: 'data:1,fsdp:16,tensor:4' or a dict; None uses `config.mesh`.
    num_devices: the device count a -1 axis fills; None = this machine's devices.
    platform: the platform the run is planned for ('tpu', 'gpu', 'cpu'; None = this
      machine's): `model.attention=auto` is its kernel.

  Raises:
    sharding.UnshardedParamError: a large parameter is replicated on a multi-device mesh.
    ValueError: a bad mesh, bad rules, or a batch that does not split over the mesh.
  """
  model_cfg = plan_model_config(config)
  sizes = _plan_mesh_sizes(config, mesh_override, num_devices)
  rules = sharding.rules_from_config(config.mesh)
  # Only the optimizer state's shapes enter the plan.
  optimizer = update.make_optimizer(update.OptimizerConfig.from_config(config))
  rows = config.batch_size * config.rollout.group_size
  if rows % config.loss.mini_batches:
    raise ValueError(
      f"batch_size x group_size = {rows} rows do not split into "
      f"{config.loss.mini_batches} mini-batches."
    )
  return sharding.plan(
    model_cfg,
    sizes,
    rules,
    rows // config.loss.mini_batches,
    config.rollout.max_prompt_length + config.rollout.max_response_length,
    optimizer,
    micro_batches=config.loss.micro_batches,
    compute_dtype=config.model.dtype,
    remat=config.model.remat,
    image_patches=plan_image_patches(config, model_cfg, sizes["data"] * sizes["fsdp"]),
    max_replicated_elements=config.mesh.max_replicated_elements,
    fused_attention=layers.resolve_attention(config.model.attention, platform) != "xla_blocked",
  )


def run_plan(
  config: Any,
  mesh_override: str | Mapping[str, int] | None = None,
  num_devices: int | None = None,
  platform: str | None = None,
) -> str:
  """`plan_run` as text, headed by the model and its compute dtype."""
  model_cfg = plan_model_config(config)
  p = plan_run(config, mesh_override, num_devices, platform)
  source = config.model.hf_dir or f"preset {config.model.preset}"
  attention = layers.resolve_attention(config.model.attention, platform)
  header = (
    f"model: {model_cfg.family} ({source}), compute dtype {config.model.dtype}, "
    f"remat {config.model.remat}, attention {attention}"
  )
  return header + "\n" + sharding.format_plan(p)
