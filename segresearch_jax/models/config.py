"""Model shapes for the policy families, with presets and HF config conversion.

Frozen dataclasses (hashable, so they can be static arguments under `jax.jit`).
The real shapes follow the released Qwen3-VL checkpoints; `tiny` is for tests and
`embedded` for the default CPU run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla_blocked", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT tower and its mergers (docs/method.md §5)."""

  depth: int = 2
  hidden_size: int = 32
  intermediate_size: int = 64
  num_heads: int = 2
  patch_size: int = 16
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  out_hidden_size: int = 64
  num_position_embeddings: int = 64
  deepstack_visual_indexes: tuple[int, ...] = (0,)
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-6
  # Qwen2.5-VL only: attention inside window_size-pixel windows except in these blocks.
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = ()

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The decoder-only language model (GQA, q/k norm, M-RoPE, SwiGLU)."""

  vocab_size: int = 512
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 5_000_000.0
  mrope_section: tuple[int, int, int] = (4, 2, 2)
  mrope_interleaved: bool = True  # Qwen3-VL interleaves T/H/W; Qwen2.5-VL uses blocks.
  qkv_bias: bool = False  # Qwen2.5-VL has q/k/v biases.
  qk_norm: bool = True  # Qwen3-VL RMS-normalises q and k per head.
  tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A whole policy: family, towers and the special-token ids the model reads."""

  family: str = "qwen3_vl"
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  # How the model computes, not what it is (HF conversion ignores these; see
  # `with_compute`). Parameters stay fp32 whatever `dtype` is (master weights).
  dtype: str = "float32"  # compute dtype of both towers: float32 | bfloat16
  remat: str = "none"  # per decoder layer / vision block: none | full | dots (keep matmuls)
  scan_layers: bool = False  # stacked decoder layers (leading axis) under one lax.scan
  attention: str = "auto"  # auto (per platform) | xla_blocked | splash | cudnn

  def __post_init__(self):
    for name, value, allowed in (
      ("dtype", self.dtype, DTYPES),
      ("remat", self.remat, REMAT_POLICIES),
      ("attention", self.attention, ATTENTION_IMPLEMENTATIONS),
    ):
      if value not in allowed:
        raise ValueError(f"model {name} must be one of {allowed}, got {value!r}.")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def coord_convention(self) -> str:
    """How box/point coordinates are expressed by this family (docs/method.md §4.2)."""
    return "norm1000" if self.family == "qwen3_vl" else "abs_resized"


def _real(text: dict[str, Any], vision: dict[str, Any]) -> ModelConfig:
  text = dict(
    vocab_size=151936, head_dim=128, rope_theta=5_000_000.0, mrope_section=(24, 20, 20), **text
  )
  vision = dict(num_heads=16, num_position_embeddings=2304, **vision)
  return ModelConfig(text=TextConfig(**text), vision=VisionConfig(**vision))


def _real_qwen2_5(text: dict[str, Any], out_hidden_size: int) -> ModelConfig:
  text = TextConfig(
    vocab_size=151936,
    head_dim=128,
    rope_theta=1_000_000.0,
    mrope_section=(16, 24, 24),
    mrope_interleaved=False,
    qkv_bias=True,
    qk_norm=False,
    **text,
  )
  vision = VisionConfig(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    out_hidden_size=out_hidden_size,
    num_position_embeddings=0,
    deepstack_visual_indexes=(),
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
  )
  return ModelConfig(family="qwen2_5_vl", text=text, vision=vision)


# Tests: windows of 2x2 merged tokens on small grids, one full-attention block.
_TINY_QWEN2_5 = ModelConfig(
  family="qwen2_5_vl",
  vision=VisionConfig(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    patch_size=14,
    out_hidden_size=64,
    num_position_embeddings=0,
    deepstack_visual_indexes=(),
    window_size=56,
    fullatt_block_indexes=(1,),
  ),
  text=TextConfig(
    mrope_section=(2, 3, 3),
    mrope_interleaved=False,
    qkv_bias=True,
    qk_norm=False,
    rope_theta=1_000_000.0,
  ),
  image_token_id=511,
  vision_start_token_id=509,
  vision_end_token_id=510,
)


PRESETS: dict[str, ModelConfig] = {
  # Tests: every code path (GQA, DeepStack, tied head) at toy size.
  "tiny": ModelConfig(image_token_id=511, vision_start_token_id=509, vision_end_token_id=510),
  # The embedded default run on a 2-core CPU: small enough to train in minutes.
  "embedded": ModelConfig(
    vision=VisionConfig(
      depth=2,
      hidden_size=64,
      intermediate_size=128,
      num_heads=4,
      out_hidden_size=128,
      num_position_embeddings=196,
      deepstack_visual_indexes=(0,),
    ),
    text=TextConfig(
      vocab_size=4096,
      hidden_size=128,
      intermediate_size=384,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mrope_section=(8, 4, 4),
    ),
  ),
  # Benchmarks (issue 2): hidden 512, 8 LM layers, 4 vision layers.
  "mid": ModelConfig(
    vision=VisionConfig(
      depth=4,
      hidden_size=256,
      intermediate_size=1024,
      num_heads=4,
      out_hidden_size=512,
      num_position_embeddings=784,
      deepstack_visual_indexes=(1, 2),
    ),
    text=TextConfig(
      vocab_size=32768,
      hidden_size=512,
      intermediate_size=1536,
      num_layers=8,
      num_heads=8,
      num_kv_heads=4,
      head_dim=64,
      mrope_section=(12, 10, 10),
    ),
  ),
  "tiny_qwen2_5": _TINY_QWEN2_5,
  # Benchmarks: the Qwen2.5-VL counterpart of `mid`.
  "mid_qwen2_5": ModelConfig(
    family="qwen2_5_vl",
    vision=VisionConfig(
      depth=4,
      hidden_size=256,
      intermediate_size=512,
      num_heads=4,
      patch_size=14,
      out_hidden_size=512,
      num_position_embeddings=0,
      deepstack_visual_indexes=(),
      window_size=112,
      fullatt_block_indexes=(3,),
    ),
    text=TextConfig(
      vocab_size=32768,
      hidden_size=512,
      intermediate_size=1536,
      num_layers=8,
      num_heads=8,
      num_kv_heads=4,
      head_dim=64,
      mrope_section=(8, 12, 12),
      mrope_interleaved=False,
      qkv_bias=True,
      qk_norm=False,
      rope_theta=1_000_000.0,
    ),
  ),
  "qwen2_5_vl_3b": _real_qwen2_5(
    dict(
      hidden_size=2048,
      intermediate_size=11008,
      num_layers=36,
      num_heads=16,
      num_kv_heads=2,
      tie_word_embeddings=True,
    ),
    out_hidden_size=2048,
  ),
  "qwen2_5_vl_7b": _real_qwen2_5(
    dict(
      hidden_size=3584,
      intermediate_size=18944,
      num_layers=28,
      num_heads=28,
      num_kv_heads=4,
      tie_word_embeddings=False,
    ),
    out_hidden_size=3584,
  ),
  "qwen3_vl_2b": _real(
    dict(
      hidden_size=2048,
      intermediate_size=6144,
      num_layers=28,
      num_heads=16,
      num_kv_heads=8,
      tie_word_embeddings=True,
    ),
    dict(
      depth=24,
      hidden_size=1024,
      intermediate_size=4096,
      out_hidden_size=2048,
      deepstack_visual_indexes=(5, 11, 17),
    ),
  ),
  "qwen3_vl_4b": _real(
    dict(
      hidden_size=2560,
      intermediate_size=9728,
      num_layers=36,
      num_heads=32,
      num_kv_heads=8,
      tie_word_embeddings=True,
    ),
    dict(
      depth=24,
      hidden_size=1024,
      intermediate_size=4096,
      out_hidden_size=2560,
      deepstack_visual_indexes=(5, 11, 17),
    ),
  ),
  "qwen3_vl_8b": _real(
    dict(
      hidden_size=4096,
      intermediate_size=12288,
      num_layers=36,
      num_heads=32,
      num_kv_heads=8,
      tie_word_embeddings=False,
    ),
    dict(
      depth=27,
      hidden_size=1152,
      intermediate_size=4304,
      out_hidden_size=4096,
      deepstack_visual_indexes=(8, 16, 24),
    ),
  ),
}


def get_preset(name: str, **token_ids: int) -> ModelConfig:
  """A preset by name, optionally with special-token ids from the run's tokenizer."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[name], **token_ids)


def with_vocab(config: ModelConfig, vocab_size: int) -> ModelConfig:
  return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=vocab_size))


def with_compute(config: ModelConfig, run_model: Any) -> ModelConfig:
  """`config` computing as the run config's `model` section asks: `dtype`, `remat`,
  `scan_layers` and `attention` (a run config always has the four; a mapping with the
  same keys does too).

  Apply it before parameters are created or loaded: `scan_layers` changes their
  layout (`weights.params_from_hf` and `policy.init_params` follow the config).
  """
  return dataclasses.replace(
    config,
    dtype=str(run_model["dtype"]),
    remat=str(run_model["remat"]),
    scan_layers=bool(run_model["scan_layers"]),
    attention=str(run_model["attention"]),
  )


# ----------------------------------------------------------------------------
# transformers config.json <-> ModelConfig
# ----------------------------------------------------------------------------


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
  """Reads a transformers Qwen3-VL or Qwen2.5-VL `config.json` dict."""
  family = hf.get("model_type")
  if family not in ("qwen3_vl", "qwen2_5_vl"):
    raise ValueError(f"Unsupported model_type {family!r} (expected 'qwen3_vl' or 'qwen2_5_vl').")
  qwen3 = family == "qwen3_vl"
  # Older Qwen2.5-VL configs keep the text fields at the top level.
  t = hf.get("text_config") or hf
  v = hf["vision_config"]
  rope = t.get("rope_parameters") or t.get("rope_scaling") or hf.get("rope_scaling") or {}
  theta = rope.get("rope_theta", t.get("rope_theta", 5_000_000.0 if qwen3 else 1_000_000.0))
  vrope = v.get("rope_parameters") or {}
  tie = hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
  text = TextConfig(
    vocab_size=t["vocab_size"],
    hidden_size=t["hidden_size"],
    intermediate_size=t["intermediate_size"],
    num_layers=t["num_hidden_layers"],
    num_heads=t["num_attention_heads"],
    num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
    head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
    rms_norm_eps=t.get("rms_norm_eps", 1e-6),
    rope_theta=float(theta),
    mrope_section=tuple(rope.get("mrope_section", (24, 20, 20) if qwen3 else (16, 24, 24))),
    mrope_interleaved=qwen3,
    qkv_bias=not qwen3,
    qk_norm=qwen3,
    tie_word_embeddings=bool(tie),
  )
  vision = VisionConfig(
    depth=v["depth"],
    hidden_size=v.get("hidden_size") or v["embed_dim"],
    intermediate_size=v["intermediate_size"],
    num_heads=v["num_heads"],
    patch_size=v.get("patch_size", 16 if qwen3 else 14),
    temporal_patch_size=v.get("temporal_patch_size", 2),
    spatial_merge_size=v.get("spatial_merge_size", 2),
    in_channels=v.get("in_channels", v.get("in_chans", 3)),
    out_hidden_size=v["out_hidden_size"],
    num_position_embeddings=v.get("num_position_embeddings", 2304) if qwen3 else 0,
    deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", ())) if qwen3 else (),
    rope_theta=float(vrope.get("rope_theta", 10000.0)),
    window_size=v.get("window_size", 112),
    fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
  )
  return ModelConfig(
    family=family,
    vision=vision,
    text=text,
    image_token_id=hf.get("image_token_id", 151655),
    vision_start_token_id=hf.get("vision_start_token_id", 151652),
    vision_end_token_id=hf.get("vision_end_token_id", 151653),
  )


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """A transformers `config.json` dict for the family's `...ForConditionalGeneration`."""
  t, v = config.text, config.vision
  qwen3 = config.family == "qwen3_vl"
  text = {
    "model_type": f"{config.family}_text",
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "intermediate_size": t.intermediate_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "hidden_act": "silu",
    "rms_norm_eps": t.rms_norm_eps,
    "max_position_embeddings": 262144 if qwen3 else 128000,
    "tie_word_embeddings": t.tie_word_embeddings,
    "rope_parameters": {
      "rope_type": "default",
      "rope_theta": t.rope_theta,
      "mrope_section": list(t.mrope_section),
    },
  }
  vision = {
    "model_type": f"{config.family}_vision",
    "depth": v.depth,
    "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size,
    "num_heads": v.num_heads,
    "hidden_act": "gelu_pytorch_tanh" if qwen3 else "silu",
    "patch_size": v.patch_size,
    "temporal_patch_size": v.temporal_patch_size,
    "spatial_merge_size": v.spatial_merge_size,
    "in_channels": v.in_channels,
    "out_hidden_size": v.out_hidden_size,
    "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
  }
  if qwen3:
    text.update(head_dim=t.head_dim, attention_bias=False)
    text["rope_parameters"]["mrope_interleaved"] = True
    vision.update(
      num_position_embeddings=v.num_position_embeddings,
      deepstack_visual_indexes=list(v.deepstack_visual_indexes),
    )
  else:
    vision.update(window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
  architecture = (
    "Qwen3VLForConditionalGeneration" if qwen3 else "Qwen2_5_VLForConditionalGeneration"
  )
  return {
    "architectures": [architecture],
    "model_type": config.family,
    "image_token_id": config.image_token_id,
    "video_token_id": config.image_token_id + 1,
    "vision_start_token_id": config.vision_start_token_id,
    "vision_end_token_id": config.vision_end_token_id,
    "tie_word_embeddings": t.tie_word_embeddings,
    "text_config": text,
    "vision_config": vision,
  }
