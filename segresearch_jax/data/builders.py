"""TFDS builders writing array_record shards: OK-VOS, ReasonSeg and ReasonVOS (SPEC §4).

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
from PIL import Image, ImageDraw

from segresearch_jax.data import okvos

IGNORE_LABEL = 255  # ReasonSeg ignore regions.

# ----------------------------------------------------------------------------
# OK-VOS.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class OkvosConfig(tfds.core.BuilderConfig):
  """Preprocessing knobs of the OK-VOS builder (SPEC §4.2)."""

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
  """OK-VOS from its raw layout (SPEC §4.1), preprocessed as officially (SPEC §4.2)."""

  VERSION = tfds.core.Version("1.0.0")
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
# ReasonSeg (image).
# ----------------------------------------------------------------------------


def polygon_mask(shapes: list[dict], width: int, height: int, name: str) -> np.ndarray:
  """Rasterises ReasonSeg polygons: 1 = target, 255 = ignore, 0 = background.

  Larger shapes are drawn first so a small shape inside a large one stays visible;
  labels containing "ignore" or "flag" mark ignore regions (excluded from IoU).
  """
  canvas = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(canvas)

  def area(points):
    xs, ys = np.asarray(points, float).T
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))

  polygons = []
  for shape in shapes:
    points = shape.get("points")
    if not points or len(points) < 3:
      raise okvos.DataError(f"ReasonSeg {name}: a shape has fewer than 3 points.")
    label = str(shape.get("label", "")).lower()
    value = IGNORE_LABEL if ("ignore" in label or "flag" in label) else 1
    polygons.append((area(points), value, [tuple(map(float, p)) for p in points]))
  for _, value, points in sorted(polygons, key=lambda p: -p[0]):
    draw.polygon(points, fill=value, outline=value)
  return np.asarray(canvas)


def read_reasonseg(root: pathlib.Path, split: str):
  """Yields (name, image uint8 [H, W, 3], label uint8 [H, W], texts, is_sentence)."""
  folder = root / split
  if not folder.is_dir():
    raise FileNotFoundError(f"ReasonSeg split folder not found: {folder}")
  for image_path in sorted(folder.glob("*.jpg")):
    json_path = image_path.with_suffix(".json")
    if not json_path.is_file():
      raise okvos.DataError(f"ReasonSeg {image_path.name}: missing {json_path.name}.")
    try:
      anno = json.loads(json_path.read_text(encoding="utf-8"))
      texts, shapes = anno["text"], anno["shapes"]
    except (json.JSONDecodeError, KeyError) as e:
      raise okvos.DataError(f"ReasonSeg {json_path}: bad annotation ({e}).") from e
    image = okvos.read_frame(image_path)
    height, width = image.shape[:2]
    label = polygon_mask(shapes, width, height, image_path.name)
    texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
    yield image_path.stem, image, label, texts, bool(anno.get("is_sentence", False))


class ReasonSeg(tfds.core.GeneratorBasedBuilder):
  """ReasonSeg: images, queries and rasterised polygon labels (SPEC §4.3)."""

  VERSION = tfds.core.Version("1.0.0")
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
    for name, image, label, texts, is_sentence in read_reasonseg(root, split):
      yield (
        name,
        {
          "id": name,
          "image": image,
          "label": label,
          "texts": texts,
          "is_sentence": is_sentence,
        },
      )


# ----------------------------------------------------------------------------
# ReasonVOS (video).
# ----------------------------------------------------------------------------


def read_reasonvos(root: pathlib.Path):
  """Yields one dict per expression of ReasonVOS (`meta_expressions.json` layout).

  Layout: `meta_expressions.json` = {"videos": {vid: {"expressions": {eid: {"exp",
  "obj_id"}}, "frames": [names]}}}, frames `JPEGImages/{vid}/{name}.jpg`, masks
  `Annotations/{vid}/{obj_id}/{name}.png` (non-zero palette index = target). Only
  paths are stored; frames and masks are read at evaluation time.
  """
  meta_path = root / "meta_expressions.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"ReasonVOS meta file not found: {meta_path}")
  videos = json.loads(meta_path.read_text(encoding="utf-8"))["videos"]
  for vid in sorted(videos):
    entry = videos[vid]
    frames = sorted(str(f) for f in entry.get("frames", []))
    if not frames:
      raise okvos.DataError(f"ReasonVOS video {vid}: no frames listed.")
    for eid in sorted(entry["expressions"], key=str):
      exp = entry["expressions"][eid]
      if "exp" not in exp:
        raise okvos.DataError(f"ReasonVOS {vid}/{eid}: no 'exp' text.")
      oid = str(exp.get("obj_id", exp.get("anno_id", eid)))
      yield {
        "id": f"{vid}_{eid}",
        "video": vid,
        "oid": oid,
        "expression": str(exp["exp"]),
        "frame_names": frames,
        "frame_dir": f"JPEGImages/{vid}",
        "annotation_dir": f"Annotations/{vid}/{oid}",
      }


class ReasonVos(tfds.core.GeneratorBasedBuilder):
  """ReasonVOS expressions with paths to their frames and masks (SPEC §4.3)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Pass the ReasonVOS folder (meta_expressions.json, ...) as manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": text,
          "video": text,
          "oid": text,
          "expression": text,
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
    for record in read_reasonvos(root):
      yield record["id"], record


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------

BUILDERS = {"okvos": Okvos, "reason_seg": ReasonSeg, "reason_vos": ReasonVos}


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
