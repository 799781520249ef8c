"""Image preprocessing for the Qwen-VL policies, in numpy/PIL, matching transformers.

Per image: optional forced resize (the protocol shows frames at 448x448, keyframes
at 864x864 and search results at 256x256, aspect ratio not kept), smart_resize to a
multiple of patch x merge within [min_pixels, max_pixels], PIL bicubic, /255,
normalise, then cut into patches in 2x2 merge-block order, each row (C, T, P, P)
with the still image repeated over the T=2 temporal patch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from segresearch_jax import protocol


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  patch_size: int
  merge_size: int
  temporal_patch_size: int
  min_pixels: int
  max_pixels: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size


QWEN3_VL = ImageProcessorConfig(16, 2, 2, 65536, 16777216, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
QWEN2_5_VL = ImageProcessorConfig(
  14,
  2,
  2,
  3136,
  12845056,
  (0.48145466, 0.4578275, 0.40821073),
  (0.26862954, 0.26130258, 0.27577711),
)


def smart_resize(
  height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
  """The size transformers resizes to: multiples of `factor`, pixel count in range."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"Aspect ratio of {height}x{width} is above 200.")
  h = round(height / factor) * factor
  w = round(width / factor) * factor
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def _to_pil(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"Expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}.")
  return Image.fromarray(array, "RGB")


def preprocess_image(
  image: Any, cfg: ImageProcessorConfig, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One image -> (patches float32 [N, C*T*P*P], grid (1, grid_h, grid_w))."""
  pil = _to_pil(image)
  if size is not None and (pil.height, pil.width) != tuple(size):
    pil = pil.resize((size[1], size[0]), Image.BICUBIC)
  h, w = smart_resize(pil.height, pil.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
  if (h, w) != (pil.height, pil.width):
    pil = pil.resize((w, h), Image.BICUBIC)
  x = np.asarray(pil, np.float32) * np.float32(1 / 255)
  x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  gh, gw = h // p, w // p
  x = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [bh, bw, mh, mw, C, P, P]
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
  return np.ascontiguousarray(x.reshape(gh * gw, 3 * t * p * p)), (1, gh, gw)


def preprocess_images(
  images: Sequence[Any], cfg: ImageProcessorConfig, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Images -> (pixel_values [sum N_i, C*T*P*P], grid_thw int64 [n_images, 3])."""
  out = [preprocess_image(im, cfg, size) for im in images]
  return np.concatenate([o[0] for o in out]), np.array([o[1] for o in out], np.int64)


def num_image_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
  t, h, w = grid_thw
  return int(t * h * w) // merge_size**2


def encode_prompt(
  prompt_text: str,
  images: Sequence[Any],
  tokenizer: Any,
  cfg: ImageProcessorConfig,
  image_size: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
  """A rendered prompt with `<image>` placeholders -> model inputs.

  Returns:
    dict(input_ids int32 [L], pixel_values float32 [N, patch_dim], grid_thw [n, 3]).
  """
  pixel_values, grid_thw = preprocess_images(images, cfg, image_size)
  counts = [num_image_tokens(g, cfg.merge_size) for g in grid_thw]
  text = protocol.expand_images(prompt_text, counts)
  ids = np.asarray(tokenizer.encode(text), np.int32)
  return {"input_ids": ids, "pixel_values": pixel_values, "grid_thw": grid_thw}
