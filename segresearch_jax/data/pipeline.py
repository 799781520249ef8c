"""grain pipelines: from a random-access source of OK-VOS samples to batches of prompts.

    source (records: `okvos.OkvosDataSource`, a list of dicts, or a TFDS data source)
      -> seeded shuffle, reshuffled every epoch -> repeat
      -> this process's shard: every `process_count`-th sample from `process_index`
      -> prepare (worker threads: decode, resize frames to a square, render the prompt
         with the protocol module, convert ground truth, optional `encode_fn`)
      -> batch (numeric fields stacked, strings and ragged fields as object arrays)

Sharding after the shuffle makes the processes' batches together the batch one
process would read: local sample j of process k is global sample
`j * process_count + k` (`global_positions`), so a run on many hosts sees the same
data, in the same episodes' RNG streams, as a run on one.

The iterator is grain's checkpointable `DatasetIterator`: `get_state()` is a small
JSON-able dict, `set_state()` makes the next batch the one that followed the save.
`checkpoint.Checkpointer` saves it with each step, next to the model state.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.data import mask_tables, okvos

EncodeFn = Callable[[dict], dict]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [F, H, W, 3] to [F, size, size, 3], aspect NOT kept (docs/method.md §1.2), bicubic."""
  if frames.shape[1:3] == (size, size):
    return frames
  return np.stack(
    [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames]
  )


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
  """Resizes bool [F, H, W] to [F, size, size] by nearest neighbour."""
  if masks.shape[1:3] == (size, size):
    return masks
  return np.stack(
    [
      np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST))
      > 127
      for m in masks
    ]
  )


def render_prompt(example: dict, template_dir: str | os.PathLike | None = None) -> str:
  """The chat prompt text for a sample; `<image>` placeholders are left for the processor."""
  system = protocol.system_prompt(example["ability"], template_dir)
  user = protocol.user_content(example["frame_numbers"], example["question"])
  return protocol.chat_prompt(system, user)


class Prepare:
  """Turns one raw sample into model-ready fields, padded to `num_frames` frames.

  Output fields: id, video, oid, ability, question, steps (list), reference_chain
  and reference_frames (JSON str, "" when the dataset has none), prompt (str), frames
  uint8 [F, S, S, 3], masks bool [F, S, S], frame_numbers int32 [F] (-1 for padding),
  frame_valid bool [F], frame_paths (list), orig_size int32 [2] (w, h), ground_truth
  (JSON str, in `convention`),
  ground_truth_pixels (JSON str, original pixels), plus whatever `encode_fn` returns.
  With `mask_cache_dir`, also the sample's mask-reward tables (docs/method.md §3.2) read with
  `mask_tables.load_entry`, in the same frame order and zero-padded like `frames`:
  mask_point_iou uint8 [F, G, G] and mask_box_iou uint8 [F, P, P].
  """

  def __init__(
    self,
    *,
    frame_size: int,
    num_frames: int,
    convention: str,
    template_dir: str | os.PathLike | None = None,
    encode_fn: EncodeFn | None = None,
    mask_cache_dir: str | os.PathLike | None = None,
    mask_cache_split: str | None = None,
  ):
    if convention not in okvos.CONVENTIONS:
      raise ValueError(f"Unknown convention {convention!r}; expected one of {okvos.CONVENTIONS}.")
    if mask_cache_dir is not None and not mask_cache_split:
      raise ValueError("mask_cache_dir needs mask_cache_split (the split folder in the cache).")
    self.frame_size = frame_size
    self.num_frames = num_frames
    self.convention = convention
    self.template_dir = template_dir
    self.encode_fn = encode_fn
    self.mask_cache_dir = mask_cache_dir
    self.mask_cache_split = mask_cache_split

  def __call__(self, example: dict | None) -> dict | None:
    if example is None:  # A sample the source skipped (on_error="skip").
      return None
    n = len(example["frame_numbers"])
    if n > self.num_frames:
      raise ValueError(
        f"Sample {example['id']}: {n} frames but the pipeline expects at most {self.num_frames}."
      )
    pad = self.num_frames - n
    height, width = example["frames"].shape[1:3]
    size = self.frame_size
    frames = resize_frames(example["frames"], size)
    masks = resize_masks(example["masks"], size)
    gt = okvos.convert_ground_truth(
      example["ground_truth"], self.convention, width, height, resized=(size, size)
    )
    out = {
      "id": example["id"],
      "video": example["video"],
      "oid": example["oid"],
      "ability": example["ability"],
      "question": example["question"],
      "steps": list(example["steps"]),
      "reference_chain": example.get("reference_chain", ""),
      "reference_frames": example.get("reference_frames", ""),
      "prompt": render_prompt(example, self.template_dir),
      "frames": np.pad(frames, ((0, pad), (0, 0), (0, 0), (0, 0))),
      "masks": np.pad(masks, ((0, pad), (0, 0), (0, 0))),
      "frame_numbers": np.pad(
        np.asarray(example["frame_numbers"], np.int32), (0, pad), constant_values=-1
      ),
      "frame_valid": np.arange(self.num_frames) < n,
      "frame_paths": list(example["frame_paths"]),
      "orig_size": np.asarray([width, height], np.int32),
      "ground_truth": json.dumps(gt),
      "ground_truth_pixels": json.dumps(example["ground_truth"]),
    }
    if self.mask_cache_dir is not None:
      entry = mask_tables.load_entry(
        self.mask_cache_dir, self.mask_cache_split, example["id"], example["frame_numbers"]
      )
      out["mask_point_iou"] = np.pad(entry["point_iou"], ((0, pad), (0, 0), (0, 0)))
      out["mask_box_iou"] = np.pad(entry["box_iou"], ((0, pad), (0, 0), (0, 0)))
    if self.encode_fn is not None:
      extra = self.encode_fn(out)
      clash = set(extra) & set(out)
      if clash:
        raise ValueError(f"encode_fn returned fields that already exist: {sorted(clash)}.")
      out.update(extra)
    return out


class BrokenSampleLimit:
  """Random access over `source` that stops a run reading mostly broken data.

  A source skips a broken sample by returning None, and the pipeline drops it; over
  a source with no usable sample, a repeating pipeline would then look for the next
  batch forever. This wrapper counts the distinct samples that came back None and
  raises `okvos.DataError` (in the reading thread; grain re-raises it to whoever
  iterates) once they exceed `max_fraction` of the source, or are all of it.
  """

  def __init__(self, source: Sequence[dict | None], max_fraction: float):
    if not 0 <= max_fraction <= 1:
      raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}.")
    self.source = source
    self.max_fraction = max_fraction
    self.broken: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict | None:
    example = self.source[index]
    if example is not None:
      return example
    n = len(self.source)
    with self._lock:
      self.broken.add(int(index) % n)
      count = len(self.broken)
    if count > self.max_fraction * n or count == n:
      errors = list(getattr(self.source, "errors", None) or [])
      shown = "; ".join(errors[:3]) or f"indices {sorted(self.broken)[:3]}"
      name = repr(self.source)
      name = name if len(name) <= 200 else type(self.source).__name__
      raise okvos.DataError(
        f"{count} of the {n} samples of {name} are broken, more than "
        f"data.max_broken_fraction={self.max_fraction} allows"
        + (" (none is usable)" if count == n else "")
        + f". The first: {shown}. Fix the data or raise data.max_broken_fraction."
      )
    return None

  def __repr__(self) -> str:
    return f"BrokenSampleLimit({self.source!r}, max_fraction={self.max_fraction})"


def collate(examples: Sequence[dict]) -> dict[str, Any]:
  """Batches dicts: same-shape numeric arrays/scalars are stacked, the rest become
  object arrays of length B (strings, lists, ragged arrays)."""
  batch = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    first = values[0]
    if isinstance(first, (np.ndarray, np.generic, int, float, bool)) and not isinstance(first, str):
      arrays = [np.asarray(v) for v in values]
      if all(a.shape == arrays[0].shape and a.dtype.kind in "biuf" for a in arrays):
        batch[key] = np.stack(arrays)
        continue
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
      column[i] = v
    batch[key] = column
  return batch


def make_dataset(
  source: Sequence[dict | None],
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = None,
  frame_size: int = 448,
  num_frames: int = 6,
  convention: str = "norm1000",
  template_dir: str | os.PathLike | None = None,
  encode_fn: EncodeFn | None = None,
  mask_cache_dir: str | os.PathLike | None = None,
  mask_cache_split: str | None = None,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_threads: int = 2,
  prefetch: int = 8,
  drop_remainder: bool = True,
  max_broken_fraction: float | None = None,
) -> grain.IterDataset:
  """The batched pipeline over `source` (see the module docstring).

  Args:
    source: random access, `len` and `[i]`; items are raw samples as made by
      `okvos.load_example` (None = skipped).
    batch_size: samples per batch on this process.
    seed: the shuffle seed; epochs are reshuffled from it.
    shuffle: False keeps source order (evaluation).
    num_epochs: None repeats forever (training); 1 for one pass (evaluation).
    frame_size: shown frames are resized to this square (448 in the paper).
    num_frames: frames per sample after padding.
    convention: coordinate convention of `ground_truth` ("norm1000" | "abs_resized").
    template_dir: system prompt templates (see `protocol.system_prompt`).
    encode_fn: optional per-sample hook (e.g. tokenisation) returning extra fields.
    mask_cache_dir: the mask cache root (`segmentation/mask_cache.build`); when set,
      samples carry mask_point_iou and mask_box_iou (see `Prepare`).
    mask_cache_split: the split folder in the cache (required with mask_cache_dir).
    shard_index, shard_count: this process's shard; default jax.process_index()
      and jax.process_count(), so each host reads a disjoint, strided slice of the
      shuffled stream (see `global_positions`).
    num_threads: worker threads for decoding/resizing.
    prefetch: samples buffered ahead per thread pool.
    drop_remainder: drop a short last batch (static shapes under jit).
    max_broken_fraction: iterating raises `okvos.DataError` once more than this
      share of the source's samples were skipped as broken (None), or all of them
      (see `BrokenSampleLimit`); None never stops (evaluation scores them instead).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if shard_index is None or shard_count is None:
    import jax  # Only for the process topology.

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count}).")
  if len(source) < shard_count:
    raise ValueError(f"Source has {len(source)} samples, fewer than {shard_count} shards.")
  if max_broken_fraction is not None:
    source = BrokenSampleLimit(source, max_broken_fraction)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  ds = ds.map(
    Prepare(
      frame_size=frame_size,
      num_frames=num_frames,
      convention=convention,
      template_dir=template_dir,
      encode_fn=encode_fn,
      mask_cache_dir=mask_cache_dir,
      mask_cache_split=mask_cache_split,
    )
  )
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  it_ds = ds.to_iter_dataset(read)  # Drops the Nones of skipped samples.
  return it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)


def stream_order(num_samples: int, seed: int) -> grain.MapDataset:
  """Which sample a shuffled, repeating `make_dataset` stream reads at each position.

  Position p of the stream (before it is dealt to processes and before broken samples
  are dropped) is source index `stream_order(len(source), seed)[p]`, the same chain
  of grain operations `make_dataset` applies to its source, here over the indices.
  The mask cache uses it to build only the samples a run of N steps reads.
  """
  return grain.MapDataset.source(range(num_samples)).shuffle(seed=seed).repeat(None)


def global_positions(
  local_count: int, shard_index: int | None = None, shard_count: int | None = None
) -> np.ndarray:
  """Positions in the global batch of this process's `local_count` batch rows.

  `make_dataset` deals samples round-robin over processes, so local row j of
  process k is row `j * shard_count + k` of the batch a single process would read.
  Defaults are this process's index and the process count.
  """
  if shard_index is None or shard_count is None:
    import jax  # Only for the process topology.

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  return np.arange(local_count, dtype=np.int32) * shard_count + shard_index


def okvos_dataset(
  okvos_dir: str | os.PathLike,
  split: str,
  *,
  batch_size: int,
  seed: int = 0,
  on_error: str = "raise",
  num_frames: int = 6,
  mask_cache_dir: str | os.PathLike | None = None,
  **kwargs,
) -> tuple[grain.IterDataset, okvos.OkvosDataSource]:
  """`make_dataset` over a raw OK-VOS split; also returns the source (for its `errors`).

  With `mask_cache_dir` (the cache root), the tables are read from its `split` folder.
  """
  source = okvos.OkvosDataSource(
    okvos_dir, split, num_frames=num_frames, seed=seed, on_error=on_error
  )
  return make_dataset(
    source,
    batch_size=batch_size,
    seed=seed,
    num_frames=num_frames,
    mask_cache_dir=mask_cache_dir,
    mask_cache_split=split if mask_cache_dir is not None else None,
    **kwargs,
  ), source


# ----------------------------------------------------------------------------
# From the config.
# ----------------------------------------------------------------------------


def resolve_data(data_config, workdir: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
  """The raw OK-VOS folder and the KB folder a config points at, building the synthetic set.

  Args:
    data_config: `config.data` (fields source, okvos_dir, synthetic_dir, synthetic_train,
      synthetic_test, optionally synthetic_train_teams: the train split's entities,
      96 when absent; the test split has 24).
    workdir: the run folder; the synthetic set goes to `workdir/synthetic` unless
      `synthetic_dir` is set (built once, then reused from its cache).
    seed: the synthetic set's seed.

  Returns:
    (okvos_dir, kb_dir); kb_dir is "" for real OK-VOS (the KB is `config.search.kb_dir`).
  """
  if data_config.source == "synthetic":
    from segresearch_jax.data import synthetic

    out = data_config.synthetic_dir or os.path.join(workdir, "synthetic")
    paths = synthetic.build(
      out,
      seed=seed,
      num_train=data_config.synthetic_train,
      num_test=data_config.synthetic_test,
      teams_per_split=(int(data_config.get("synthetic_train_teams", 96)), 24),
      shown=data_config.num_frames,
    )
    return paths.okvos_dir, paths.kb_dir
  if data_config.source == "okvos":
    if not data_config.okvos_dir:
      raise ValueError("config.data.source is 'okvos' but config.data.okvos_dir is empty.")
    return str(data_config.okvos_dir), ""
  raise ValueError(f"Unknown config.data.source {data_config.source!r}; use synthetic | okvos.")
