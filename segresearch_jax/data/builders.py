"""TFDS builders writing array_record shards: OK-VOS, ReasonSeg, ReasonVOS, ReVOS (docs/method.md §4).

This module imports tensorflow_datasets at the top; nothing else in the package
imports it, so everything else works without TensorFlow. Raw data are read from the
`manual_dir` exactly as downloaded; each builder applies the same preprocessing as the
raw readers (`okvos.load_example` for OK-VOS), so the two paths agree.

    builder = builders.build("okvos", okvos_dir, data_dir)      # writes array_record
    source = builders.okvos_source(data_dir, "train", okvos_dir) # for pipeline.make_dataset

Records keep what training and evaluation need: id, video, oid, ability, question,
steps, sampled frame numbers, the sampled frames (original size), paths of the
original frames (relative to the raw folder, for the high-res keyframe), per-frame GT
masks of the sampled frames, and the ground-truth dict (JSON, original pixels).
Full-video masks are NOT duplicated: `annotation_dir` points into the raw folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import numpy as np

try:
  # Loading TensorFlow before triton (which torch / transformers load lazily) in one
  # process segfaults at triton's import; the reverse order works. So when they are
  # installed, load them before TensorFlow.
  import torch  # noqa: F401
  import triton  # noqa: F401
except ImportError:
  pass
import tensorflow_datasets as tfds

from segresearch_jax.data import okvos, reasoning

IGNORE_LABEL = reasoning.IGNORE_LABEL  # ReasonSeg ignore regions.

# ----------------------------------------------------------------------------
# OK-VOS.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class OkvosConfig(tfds.core.BuilderConfig):
  """Preprocessing knobs of the OK-VOS builder (docs/method.md §4.2)."""

  num_frames: int = 6
  seed: int = 0


def okvos_config(num_frames: int = 6, seed: int = 0) -> OkvosConfig | str:
  """The config for these settings, named after them so settings never share files.

  Returns the registered config's NAME for the defaults (TFDS refuses a new config
  object under a registered name).
  """
  name = f"f{num_frames}_s{seed}"
  if any(c.name == name for c in Okvos.BUILDER_CONFIGS):
    return name
  return OkvosConfig(name=name, num_frames=num_frames, seed=seed)


class Okvos(tfds.core.GeneratorBasedBuilder):
  """OK-VOS from its raw layout (docs/method.md §4.1), preprocessed as officially (§4.2)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.1.0": "reference_frames: what each frame shows, for the warm start's reasoning.",
    "1.0.0": "Initial release.",
  }
  BUILDER_CONFIGS = [OkvosConfig(name="f6_s0", num_frames=6, seed=0)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the raw OK-VOS folder (train.parquet, test.parquet, train/, test/) as manual_dir."
  )

  def __init__(self, *, on_error: str = "raise", **kwargs):
    """`on_error`: "raise" at a broken sample, or "skip" it (logged and counted)."""
    if on_error not in okvos.ON_ERROR:
      raise ValueError(f"on_error must be one of {okvos.ON_ERROR}, got {on_error!r}.")
    self.on_error = on_error
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": text,
          "video": text,
          "oid": text,
          "ability": text,
          "question": text,
          "steps": tfds.features.Sequence(text),
          "frame_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "frame_paths": tfds.features.Sequence(text),
          "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
          "masks": tfds.features.Tensor(
            shape=(None, None, None), dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB
          ),
          "ground_truth": text,
          "annotation_dir": text,
          "reference_chain": text,
          "reference_frames": text,
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = sorted(p.stem for p in root.glob("*.parquet"))
    if not splits:
      raise FileNotFoundError(f"No {{split}}.parquet in the OK-VOS folder {root}.")
    return {split: self._generate_examples(root, split) for split in splits}

  def _generate_examples(self, root: pathlib.Path, split: str):
    cfg = self.builder_config
    errors: list[str] = []
    for ex in okvos.iter_raw_examples(
      root, split, num_frames=cfg.num_frames, seed=cfg.seed, on_error=self.on_error, errors=errors
    ):
      yield (
        ex["id"],
        {
          "id": ex["id"],
          "video": ex["video"],
          "oid": ex["oid"],
          "ability": ex["ability"],
          "question": ex["question"],
          "steps": ex["steps"],
          "frame_numbers": ex["frame_numbers"],
          "frame_paths": [os.path.relpath(p, root) for p in ex["frame_paths"]],
          "frames": list(ex["frames"]),
          "masks": ex["masks"],
          "ground_truth": json.dumps(ex["ground_truth"]),
          "annotation_dir": os.path.relpath(ex["annotation_dir"], root),
          "reference_chain": ex["reference_chain"],
          "reference_frames": ex["reference_frames"],
        },
      )
    if errors:
      logging.warning("OK-VOS %s: skipped %d broken samples.", split, len(errors))
      self.skipped.extend(errors)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsOkvosSource:
  """A TFDS OK-VOS data source returning the same dicts as `okvos.load_example`.

  Relative paths are resolved against `okvos_dir` (the raw folder the high-res
  keyframes and the full-video masks are read from).
  """

  def __init__(self, data_source, okvos_dir: str | os.PathLike):
    self.data_source = data_source
    self.okvos_dir = pathlib.Path(okvos_dir)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict:
    r = self.data_source[int(index)]
    return {
      "id": _text(r["id"]),
      "video": _text(r["video"]),
      "oid": _text(r["oid"]),
      "ability": _text(r["ability"]),
      "question": _text(r["question"]),
      "steps": [_text(s) for s in r["steps"]],
      "frame_numbers": np.asarray(r["frame_numbers"], np.int32),
      "frame_paths": [str(self.okvos_dir / _text(p)) for p in r["frame_paths"]],
      "frames": np.asarray(r["frames"], np.uint8),
      "masks": np.asarray(r["masks"], bool),
      "ground_truth": json.loads(_text(r["ground_truth"])),
      "annotation_dir": str(self.okvos_dir / _text(r["annotation_dir"])),
      "reference_chain": _text(r["reference_chain"]),
      "reference_frames": _text(r["reference_frames"]),
    }


def okvos_source(
  data_dir: str | os.PathLike,
  split: str,
  okvos_dir: str | os.PathLike,
  *,
  num_frames: int = 6,
  seed: int = 0,
) -> TfdsOkvosSource:
  """The array_record source of a built OK-VOS split, as raw-example dicts."""
  builder = Okvos(data_dir=str(data_dir), config=okvos_config(num_frames, seed))
  return TfdsOkvosSource(builder.as_data_source(split=split), okvos_dir)


# ----------------------------------------------------------------------------
# ReasonSeg (image), ReasonVOS and ReVOS (video): readers in `data/reasoning.py`.
# ----------------------------------------------------------------------------


class ReasonSeg(tfds.core.GeneratorBasedBuilder):
  """ReasonSeg (LISA layout): upright images, texts and rasterised labels (docs/method.md §4.3)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "LISA's rules: exact 'flag' dropped, cp1252, EXIF, cv2 rasterising."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the ReasonSeg folder (train/, val/, test/) as manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.Tensor(
            shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
          ),
          "texts": tfds.features.Sequence(tfds.features.Text()),
          "is_sentence": np.bool_,
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if not splits:
      raise FileNotFoundError(f"No train/val/test folder in the ReasonSeg folder {root}.")
    return {s: self._generate_examples(root, s) for s in splits}

  def _generate_examples(self, root: pathlib.Path, split: str):
    for record in reasoning.read_reasonseg(root, split):
      image, label = reasoning.load_reasonseg(record)
      yield (
        record["id"],
        {
          "id": record["id"],
          "image": image,
          "label": label,
          "texts": record["texts"],
          "is_sentence": record["is_sentence"],
        },
      )


class ReasonVos(tfds.core.GeneratorBasedBuilder):
  """ReasonVOS expressions (VideoLISA layout) with paths to frames and masks (docs/method.md §4.3).

  Frames and masks stay in the raw folder (`frame_dir`, `annotation_dir` are relative
  to it) and are read at evaluation time.
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "Expressions as a list, source-prefixed mask folders, is_sent."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the ReasonVOS folder (meta_expressions.json, JPEGImages/, Annotations/) as manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": text,
          "video": text,
          "source": text,
          "obj_id": text,
          "exp_id": text,
          "expression": text,
          "is_sentence": np.bool_,
          "question": text,
          "frame_names": tfds.features.Sequence(text),
          "frame_dir": text,
          "annotation_dir": text,
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    return {"test": self._generate_examples(root)}

  def _generate_examples(self, root: pathlib.Path):
    for record in reasoning.read_reasonvos(root):
      # A broken record fails the build, naming it, rather than the evaluation.
      reasoning.frame_paths(root, record)
      reasoning.reasonvos_masks(root, record)
      yield record["id"], record


class Revos(tfds.core.GeneratorBasedBuilder):
  """ReVOS expressions (VISA layout) with their decoded masks (docs/method.md §4.3).

  `masks` holds every frame of the video (sorted by name), the union of the
  expression's anno_ids; frames stay in the raw folder (`frame_dir`).
  """

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the ReVOS folder (meta_expressions_{train,valid}_.json, mask_dict.json, "
    "JPEGImages/) as manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": text,
          "video": text,
          "exp_id": text,
          "expression": text,
          "type_id": np.int32,
          "category": text,
          "anno_ids": tfds.features.Sequence(text),
          "frame_names": tfds.features.Sequence(text),
          "frame_dir": text,
          "masks": tfds.features.Tensor(
            shape=(None, None, None), dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = [s for s in ("train", "valid") if (root / f"meta_expressions_{s}_.json").is_file()]
    if not splits:
      raise FileNotFoundError(
        f"No meta_expressions_{{train,valid}}_.json in the ReVOS folder {root}."
      )
    mask_dict = reasoning.read_revos_mask_dict(root)
    return {s: self._generate_examples(root, s, mask_dict) for s in splits}

  def _generate_examples(self, root: pathlib.Path, split: str, mask_dict: dict):
    for record in reasoning.read_revos(root, split):
      reasoning.frame_paths(root, record)
      names, masks = reasoning.revos_masks(root, record, mask_dict)
      yield (
        record["id"],
        {
          "id": record["id"],
          "video": record["video"],
          "exp_id": record["exp_id"],
          "expression": record["expression"],
          "type_id": record["type_id"],
          "category": record["category"],
          "anno_ids": record["anno_ids"],
          "frame_names": names,
          "frame_dir": record["frame_dir"],
          "masks": masks,
        },
      )


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------

BUILDERS = {"okvos": Okvos, "reason_seg": ReasonSeg, "reason_vos": ReasonVos, "revos": Revos}


def build(
  name: str,
  raw_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  **kwargs,
) -> tfds.core.DatasetBuilder:
  """Prepares a dataset as array_record under `data_dir` from its raw folder.

  `kwargs` go to the builder, e.g. `config=okvos_config(6, seed)` or
  `on_error="skip"` for OK-VOS (skipped messages land in `builder.skipped`).
  """
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(BUILDERS)}.")
  builder = BUILDERS[name](data_dir=str(data_dir), file_format="array_record", **kwargs)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(raw_dir))
  )
  return builder
