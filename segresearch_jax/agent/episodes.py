"""From data batches to rollout inputs, and expert episodes for the warm start.

Host-side glue between the data pipeline, the jitted rollout and the trainer:

- `EpisodeShapes` derives the static shapes of one run (image grids, patch counts,
  prompt length) from the config, so every compiled program sees fixed shapes.
- `PromptEncoder` is the pipeline's `encode_fn`: it runs in grain's worker threads
  and turns a prepared sample into the rollout's per-prompt arrays (left-padded
  prompt ids, M-RoPE positions, shown-frame patches and the high-resolution
  keyframe patches of the ORIGINAL frame files, docs/method.md §1.2).
- `expert_turns` writes the reference trajectory of a synthetic sample (search ->
  keyframe -> answer, from its reference chain and ground truth) and
  `expert_episode` runs it through the real bridge on the host, producing exactly
  the arrays the rollout would produce had the policy written those turns (the
  tests check this token for token against a forced rollout).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.agent import rollout
from segresearch_jax.models import policy, processor
from segresearch_jax.models.config import ModelConfig


def image_processor_config(model_cfg: ModelConfig, min_pixels: int = -1):
  """The family's image processor; `min_pixels >= 0` overrides its minimum size.

  Qwen3-VL's minimum (65536 pixels) upsizes a 128 px frame to 256 px; small CPU
  runs set `min_pixels=0` to keep 128 px frames at 16 tokens.
  """
  cfg = processor.QWEN3_VL if model_cfg.family == "qwen3_vl" else processor.QWEN2_5_VL
  return cfg if min_pixels < 0 else dataclasses.replace(cfg, min_pixels=int(min_pixels))


@dataclasses.dataclass(frozen=True)
class EpisodeShapes:
  """Static shapes of one run's prompts and observations.

  Attributes:
    image_cfg: the image processor settings.
    num_frames: F, shown frames per prompt (padded).
    frame_size, keyframe_size, search_size: square sides of the shown frames, the
      high-res keyframe and image_search results (docs/method.md §1.2: 448 / 864 / 256).
    max_prompt_length: Lp, prompts are left-padded to it.
  """

  image_cfg: processor.ImageProcessorConfig
  num_frames: int
  frame_size: int
  keyframe_size: int
  search_size: int
  max_prompt_length: int

  def patch_grid(self, size: int) -> tuple[int, int]:
    """(grid_h, grid_w) in patches of a size x size image after smart_resize."""
    c = self.image_cfg
    h, w = processor.smart_resize(size, size, c.factor, c.min_pixels, c.max_pixels)
    return h // c.patch_size, w // c.patch_size

  def merged_grid(self, size: int) -> tuple[int, int]:
    """(h, w) in merged visual tokens (what the LM sees)."""
    gh, gw = self.patch_grid(size)
    return gh // self.image_cfg.merge_size, gw // self.image_cfg.merge_size

  def num_patches(self, size: int) -> int:
    gh, gw = self.patch_grid(size)
    return gh * gw

  @property
  def patch_dim(self) -> int:
    c = self.image_cfg
    return 3 * c.temporal_patch_size * c.patch_size**2

  @property
  def search_patch_shape(self) -> tuple[int, int]:
    return self.num_patches(self.search_size), self.patch_dim

  def tokens(self, size: int) -> int:
    h, w = self.merged_grid(size)
    return h * w

  @classmethod
  def from_config(cls, config: Any, model_cfg: ModelConfig) -> EpisodeShapes:
    """The shapes of `config.data` / `config.rollout` for this policy's image processor."""
    d = config.data
    return cls(
      image_cfg=image_processor_config(model_cfg, d.min_pixels),
      num_frames=d.num_frames,
      frame_size=d.frame_size,
      keyframe_size=d.keyframe_size,
      search_size=d.search_image_size,
      max_prompt_length=config.rollout.max_prompt_length,
    )


# ----------------------------------------------------------------------------
# Prompts (the pipeline's encode_fn).
# ----------------------------------------------------------------------------


def load_keyframe(path: str, size: int) -> np.ndarray:
  """The ORIGINAL frame file resized to size x size (aspect not kept), uint8 [S, S, 3]."""
  with Image.open(path) as im:
    im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, np.uint8)


class PromptEncoder:
  """Per-sample rollout inputs, computed in the data pipeline's worker threads.

  Output fields (fixed shapes, so grain's collate stacks them):
    prompt_ids int32 [Lp] (left-padded with `pad_id`), prompt_valid bool [Lp],
    prompt_positions int32 [3, Lp], next_pos int32 [], frame_patches float32
    [F, Pf, pd] (zeros for padded frames), keyframe_patches float32 [F, Pk, pd].
  """

  def __init__(self, tokenizer: Any, model_cfg: ModelConfig, shapes: EpisodeShapes):
    self.tokenizer = tokenizer
    self.model_cfg = model_cfg
    self.shapes = shapes

  def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    s = self.shapes
    n = int(np.sum(example["frame_valid"]))
    frames = list(example["frames"][:n])
    enc = processor.encode_prompt(
      example["prompt"], frames, self.tokenizer, s.image_cfg, (s.frame_size, s.frame_size)
    )
    ids = enc["input_ids"]
    lp = s.max_prompt_length
    if len(ids) > lp:
      raise ValueError(
        f"Sample {example['id']}: the prompt has {len(ids)} tokens, more than "
        f"rollout.max_prompt_length={lp}; raise it or shrink data.frame_size."
      )
    grid = s.merged_grid(s.frame_size)
    positions, next_pos = policy.mrope_positions(ids, [grid] * n, self.model_cfg.image_token_id)
    pad = lp - len(ids)
    pf, pk = s.num_patches(s.frame_size), s.num_patches(s.keyframe_size)
    frame_patches = np.zeros((s.num_frames, pf, s.patch_dim), np.float32)
    frame_patches[:n] = enc["pixel_values"].reshape(n, pf, s.patch_dim)
    keyframe_patches = np.zeros((s.num_frames, pk, s.patch_dim), np.float32)
    for i, path in enumerate(example["frame_paths"][:n]):
      image = load_keyframe(path, s.keyframe_size)
      keyframe_patches[i], _ = processor.preprocess_image(
        image, s.image_cfg, (s.keyframe_size, s.keyframe_size)
      )
    return {
      "prompt_ids": np.pad(ids, (pad, 0), constant_values=self.tokenizer.pad_id).astype(np.int32),
      "prompt_valid": np.arange(lp) >= pad,
      "prompt_positions": np.pad(positions, ((0, 0), (pad, 0))).astype(np.int32),
      "next_pos": np.int32(next_pos),
      "frame_patches": frame_patches,
      "keyframe_patches": keyframe_patches,
    }


def shown_frames(batch: Mapping[str, Any], group_size: int) -> list[list[int]]:
  """Shown frame numbers per ROW (prompts repeated `group_size` times), for the bridge."""
  per_prompt = [
    [int(f) for f, ok in zip(numbers, valid) if ok]
    for numbers, valid in zip(batch["frame_numbers"], batch["frame_valid"])
  ]
  return [frames for frames in per_prompt for _ in range(group_size)]


def decode_responses(
  tokenizer: Any, out: rollout.RolloutOutput, skip_special_tokens: bool = True
) -> list[str]:
  """Decoded responses (observations included); the reward reads them without special tokens."""
  return [
    tokenizer.decode(
      [int(t) for t in out.response_ids[r, : int(out.response_length[r])]],
      skip_special_tokens=skip_special_tokens,
    )
    for r in range(len(out.response_length))
  ]


# ----------------------------------------------------------------------------
# Expert episodes (supervised warm start).
# ----------------------------------------------------------------------------

_IN_VIDEO = re.compile(r"'the (.+)'")


def _keyframe_choice(ground_truth: Mapping[str, Any], shown: Sequence[int]) -> int | None:
  """The shown frame where the target is largest, or None when it is absent from all."""
  best, best_area = None, -1.0
  for f in shown:
    target = ground_truth.get(str(int(f)))
    if target is not None and float(target["area"]) > best_area:
      best, best_area = int(f), float(target["area"])
  return best


def _looked(sample: Mapping[str, Any], shown: Sequence[int], relational: bool) -> tuple[str, str]:
  """The thinking that reads the frames, from the sample's `reference_frames`.

  Returns (keyframe thinking, answer thinking), or ("", "") without `reference_frames`.
  Both read until they meet the colour their turn began with ("It is the green
  cross."), so each stop is a comparison of the colour just read with that one, made
  right after writing it:

  - keyframe turn: each shown frame and the colour drawn big in it, in order ("Big:
    frame 0 red, frame 5 green."); the keyframe is the last frame read. A relational
    target's colour is not known at that point (only its neighbour's), so its turn
    reads every shown frame, as does one whose target is big in none of them.
  - answer turn, after the keyframe observation: the colour in each cell of that
    frame in reading order ("Here: top left red, top right green."); the box is the
    last cell's, or for a relational target the cell beside it ("..., top right
    green, beside it top left.").
  """
  raw = sample.get("reference_frames") or ""
  if not raw:
    return "", ""
  frames = json.loads(raw) if isinstance(raw, str) else raw
  objects, big = frames["objects"], frames["big"]
  oid = int(sample["oid"])
  named = objects[int(frames["reference"])]  # The target, or a relational one's neighbour.
  read = []
  for f in shown:
    drawn = int(big[str(f)])
    read.append(f"frame {f} {objects[drawn]['colour']}")
    if drawn == oid and not relational:
      break
  cells = []
  for o in objects:
    cells.append(f"{o['cell']} {o['colour']}")
    if o is named:
      break
  beside = f", beside it {objects[oid]['cell']}" if relational else ""
  return f" Big: {', '.join(read)}.", f" Here: {', '.join(cells)}{beside}."


def expert_turns(sample: Mapping[str, Any]) -> list[str]:
  """The reference trajectory of a synthetic sample, one string per generated turn.

  Searches follow the sample's `reference_chain` (its queries and the facts they
  reveal), the keyframe is the shown frame where the target is largest, and the
  answer is the ground-truth box and point of that frame (in the policy's
  convention). A target absent from every shown frame gets the "no target" answer.
  With `reference_frames` (the synthetic world's record of what its frames show)
  the thinking reads the frames (`_looked`): the keyframe turn what each shown frame
  draws big, the answer turn what each cell of the keyframe holds, each up to the
  colour it looks for, so the keyframe and the box follow from what the policy
  wrote about the frames. The last turn ends with `<|im_end|>`.

  Args:
    sample: a prepared sample (fields ability, question, reference_chain,
      ground_truth, frame_numbers, frame_valid; optionally oid and reference_frames).
  """
  chain = sample["reference_chain"]
  chain = json.loads(chain) if isinstance(chain, str) and chain else list(chain or [])
  gt = sample["ground_truth"]
  gt = json.loads(gt) if isinstance(gt, str) else gt
  shown = [int(f) for f, ok in zip(sample["frame_numbers"], sample["frame_valid"]) if ok]
  ability = sample["ability"]
  turns = []
  learned = None
  for step in chain:
    if step["tool"] not in ("text_search", "image_search"):
      raise ValueError(f"Expert chains search with text_search or image_search, got {step!r}.")
    known = f"It is {learned}. " if learned else ""
    call = json.dumps({"name": step["tool"], "query": step["query"]})
    turns.append(f"<thinking> {known}I search. </thinking> <search> {call} </search>")
    learned = step["answer"]
  if ability == "in-video":
    match = _IN_VIDEO.search(sample["question"])
    target = f"the {match.group(1)}" if match else "the target"
  elif ability == "relational":
    target = f"the one beside the {learned}"
  else:
    target = f"the {learned}"
  frame = _keyframe_choice(gt, shown)
  if frame is None:
    turns.append(
      f"<thinking> It is {target}, not shown. </thinking> "
      f"<keyframe> {protocol.NO_TARGET_KEYFRAME} </keyframe>"
    )
    box, point = list(protocol.NO_TARGET_BOX), list(protocol.NO_TARGET_POINT)
    here = ""
  else:
    looked, here = _looked(sample, shown, ability == "relational")
    turns.append(f"<thinking> It is {target}.{looked} </thinking> <keyframe> {frame} </keyframe>")
    box = [int(round(v)) for v in gt[str(frame)]["bbox_2d"]]
    point = [int(round(v)) for v in gt[str(frame)]["point_2d"]]
  answer = json.dumps({"bbox_2d": box, "point_2d": point})
  turns.append(
    f"<thinking> It is {target}.{here} </thinking> <answer> {answer} </answer>" + protocol.IM_END
  )
  return turns


def expert_episode(
  turns: Sequence[str],
  host_fn: rollout.HostFn,
  tokenizer: Any,
  model_cfg: ModelConfig,
  cfg: rollout.RolloutConfig,
  search_patch_shape: tuple[int, int],
  next_pos: int,
) -> rollout.RolloutOutput | None:
  """One row of rollout output for scripted turns, with real observations.

  Every turn but the last is an action: its tokens go to `host_fn` (the bridge,
  set up with this sample's shown frames as row 0) exactly as the rollout would
  send them, and the observation comes back masked out of the loss.

  Returns:
    The rollout's output for one row ([1, ...] numpy arrays, `logprobs` zero), or
    None when the episode does not fit `max_response_length`, a turn does not fit
    `max_action_length`, or it has more actions than `max_turns`.
  """
  r, turns_max = cfg.max_response_length, cfg.max_turns
  if len(turns) - 1 > turns_max:
    return None
  ids: list[int] = []
  mask: list[bool] = []
  kinds = np.zeros((1, turns_max), np.int32)
  slots = np.full((1, turns_max), -1, np.int32)
  search = np.zeros((1, turns_max, *search_patch_shape), np.float32)
  grids = []
  for t, text in enumerate(turns):
    action = tokenizer.encode(text)
    if len(action) > cfg.max_action_length:
      return None
    ids += action
    mask += [True] * len(action)
    if t == len(turns) - 1:
      break
    padded = np.zeros((1, cfg.max_action_length), np.int32)
    padded[0, : len(action)] = action
    obs, obs_len, kind, slot, patches = host_fn(
      np.ones((1,), bool), padded, np.asarray([len(action)], np.int32)
    )
    n = int(min(obs_len[0], cfg.max_obs_length))
    ids += [int(x) for x in obs[0, :n]]
    mask += [False] * n
    kinds[0, t], slots[0, t] = int(kind[0]), int(slot[0])
    if int(kind[0]) == protocol.KEYFRAME_IMAGE:
      grids.append(cfg.keyframe_grid)
    elif int(kind[0]) == protocol.SEARCH_IMAGE:
      grids.append(cfg.search_grid)
      search[0, t] = patches[0]
  if len(ids) > r:
    return None
  positions, _ = policy.mrope_positions(
    np.asarray(ids, np.int32), grids, model_cfg.image_token_id, start=int(next_pos)
  )
  n = len(ids)
  response_ids = np.zeros((1, r), np.int32)
  response_positions = np.zeros((1, 3, r), np.int32)
  loss_mask = np.zeros((1, r), bool)
  response_ids[0, :n] = ids
  response_positions[0, :, :n] = positions
  loss_mask[0, :n] = mask
  return rollout.RolloutOutput(
    response_ids=response_ids,
    response_positions=response_positions,
    response_valid=(np.arange(r) < n)[None],
    loss_mask=loss_mask,
    logprobs=np.zeros((1, r), np.float32),
    response_length=np.asarray([n], np.int32),
    stop_reason=np.asarray([protocol.FINISHED], np.int32),
    num_turns=np.asarray([len(turns) - 1], np.int32),
    obs_kind=kinds,
    obs_slot=slots,
    search_patches=search,
  )


# ----------------------------------------------------------------------------
# Running episodes.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Episodes:
  """One rollout batch on the host.

  Attributes:
    out: the rollout outputs as numpy (rows = prompts x group size).
    responses: decoded responses without special tokens (what the reward reads).
    tool_calls: per row, the bridge's call records in order.
  """

  out: rollout.RolloutOutput
  responses: list[str]
  tool_calls: list[list[Any]]


class Runner:
  """Runs jitted episodes against the search bridge for pipeline batches.

  One compiled program per `RolloutConfig` (batch shape and sampling settings are
  static). `search=False` runs the same program with the backend detached, so
  every search returns an error observation (the no-search ablation).
  """

  def __init__(
    self,
    model_cfg: ModelConfig,
    cfg: rollout.RolloutConfig,
    shapes: EpisodeShapes,
    tokenizer: Any,
    bridge: Any,
    mesh: Any = None,
  ):
    """`mesh`: this process's rollout mesh (`sharding.rollout_mesh`); the parameters
    passed to each call are then laid out on it (`sharding.rollout_params`)."""
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.bridge = bridge
    self.mesh = mesh
    host_fn = rollout.bridge_host_fn(bridge, shapes.image_cfg, shapes.search_size)
    patterns = rollout.stop_patterns(tokenizer, protocol.STOP_STRINGS)
    self.fn = rollout.make_rollout_fn(
      model_cfg, cfg, patterns, host_fn, shapes.search_patch_shape, mesh=mesh
    )

  def __call__(
    self,
    params: Any,
    batch: Mapping[str, Any],
    rng: Any,
    search: bool = True,
    prompt_index: np.ndarray | None = None,
  ) -> Episodes:
    """Episodes of `batch` (a pipeline batch) under `params`.

    Args:
      prompt_index: [P] the prompts' positions in the global batch (RNG streams;
        `pipeline.global_positions`); default 0..P-1.
    """
    import jax  # Kept local: the rest of this module is host-only.

    bridge = self.bridge
    bridge.reset()
    bridge.pop_records()
    bridge.set_shown_frames(shown_frames(batch, self.cfg.group_size))
    backend = bridge.backend
    if not search:
      bridge.backend = None
    try:
      inputs = rollout.PromptBatch.from_batch(batch)
      if prompt_index is not None:
        inputs = inputs.replace(prompt_index=np.asarray(prompt_index, np.int32))
      out = jax.device_get(self.fn(params, inputs, rng))
    finally:
      bridge.backend = backend
    calls: list[list[Any]] = [[] for _ in range(len(out.response_length))]
    for record in bridge.pop_records():
      if 0 <= record.row_id < len(calls):
        calls[record.row_id].append(record)
    out = jax.tree.map(np.asarray, out)
    return Episodes(out, decode_responses(self.tokenizer, out), calls)
