"""Image processor parity with transformers' PIL Qwen2-VL processor, both families."""

import numpy as np
import pytest

from segresearch_jax.models import processor

transformers = pytest.importorskip("transformers")


def _hf(cfg):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  return Qwen2VLImageProcessorPil(
    patch_size=cfg.patch_size,
    merge_size=cfg.merge_size,
    temporal_patch_size=cfg.temporal_patch_size,
    min_pixels=cfg.min_pixels,
    max_pixels=cfg.max_pixels,
    image_mean=list(cfg.mean),
    image_std=list(cfg.std),
  )


@pytest.mark.parametrize(
  "cfg", [processor.QWEN3_VL, processor.QWEN2_5_VL], ids=["qwen3", "qwen2_5"]
)
@pytest.mark.parametrize("shape", [(300, 420), (257, 180)])
def test_matches_transformers(cfg, shape):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2)]
  ours, grid = processor.preprocess_images(images, cfg)
  theirs = _hf(cfg)(images=images, return_tensors="np")
  np.testing.assert_array_equal(grid, theirs["image_grid_thw"])
  assert ours.shape == theirs["pixel_values"].shape
  assert np.abs(ours - theirs["pixel_values"]).max() < 1e-5


def test_forced_size_then_transformers_on_the_resized_image():
  from PIL import Image

  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (333, 500, 3), dtype=np.uint8)
  ours, grid = processor.preprocess_images([image], processor.QWEN3_VL, size=(448, 448))
  resized = np.asarray(Image.fromarray(image).resize((448, 448), Image.BICUBIC))
  theirs = _hf(processor.QWEN3_VL)(images=[resized], return_tensors="np")
  assert list(grid[0]) == [1, 28, 28]  # 196 merged tokens per 448x448 frame (docs/method.md §1.2)
  assert processor.num_image_tokens(grid[0], 2) == 196
  assert np.abs(ours - theirs["pixel_values"]).max() < 1e-5


def test_smart_resize_limits():
  assert processor.smart_resize(864, 864, 32, 65536, 16777216) == (864, 864)
  h, w = processor.smart_resize(10, 10, 32, 65536, 16777216)
  assert h * w >= 65536 and h % 32 == 0 and w % 32 == 0
  with pytest.raises(ValueError, match="Aspect ratio"):
    processor.smart_resize(10, 3000, 28, 3136, 12845056)


def test_rejects_non_uint8_images():
  with pytest.raises(ValueError, match="uint8"):
    processor.preprocess_image(np.zeros((64, 64, 3), np.float32), processor.QWEN3_VL)
