"""HuggingFace safetensors <-> Flax parameters for the Qwen-VL policies.

One function maps a Flax parameter path to its HF tensor name and layout; loading
and export both walk the Flax tree, so they cannot disagree. HF `Linear` weights are
(out, in) and become Flax kernels (in, out); the Conv3d patch embedding becomes a
Dense kernel `w.reshape(D, -1).T` (docs/method.md §5).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy

# Older exports keep the language model at the top level; normalise to the current layout.
_KEY_ALIASES = (
  (re.compile(r"^visual\."), "model.visual."),
  (re.compile(r"^model\.(layers|embed_tokens|norm)\."), r"model.language_model.\1."),
)

_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "weight": "weight",
  "bias": "bias",
  "embedding": "weight",
}


def stack_layers(params: Any, num_layers: int, vision_depth: int | None = None) -> Any:
  """Per-layer decoder parameters `layers_0 .. layers_{n-1}` -> one `layers` subtree
  with a leading layer axis, and (given `vision_depth`) the vision blocks
  `visual/blocks_0 ..` -> `visual/blocks`: the layout of `ModelConfig.scan_layers`."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  if vision_depth:
    visual = dict(params["visual"])
    blocks = [visual.pop(f"blocks_{i}") for i in range(vision_depth)]
    visual["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    params["visual"] = visual
  return params


def unstack_layers(params: Any) -> Any:
  """Inverse of `stack_layers`; parameters without stacked subtrees pass through."""

  def split(tree: Any, name: str) -> Any:
    if name not in tree:
      return tree
    tree = dict(tree)
    stacked = tree.pop(name)
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
      tree[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return tree

  params = split(params, "layers")
  if "visual" in params:
    params = dict(params)
    params["visual"] = split(params["visual"], "blocks")
  return params


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not match the model: lists every problem at once."""


def hf_name(path: tuple[str, ...]) -> tuple[str, str]:
  """(HF tensor name, layout) for a Flax path; layout is 'linear', 'conv' or 'plain'."""
  *mods, leaf = path
  layout = "linear" if leaf == "kernel" else "plain"
  if mods == ["visual", "patch_embed"]:
    return f"model.visual.patch_embed.proj.{_LEAF[leaf]}", "conv" if leaf == "kernel" else "plain"
  if mods == ["visual"] and leaf == "pos_embed":
    return "model.visual.pos_embed.weight", "plain"
  if mods == ["embed_tokens"]:
    return "model.language_model.embed_tokens.weight", "plain"
  if mods == ["norm"]:
    return "model.language_model.norm.weight", "plain"
  if mods == ["lm_head"]:
    return "lm_head.weight", "linear"
  parts = []
  for m in mods:
    if match := re.fullmatch(r"blocks_(\d+)", m):
      parts += ["blocks", match[1]]
    elif match := re.fullmatch(r"deepstack_merger_(\d+)", m):
      parts += ["deepstack_merger_list", match[1]]
    elif match := re.fullmatch(r"layers_(\d+)", m):
      parts += ["language_model", "layers", match[1]]
    elif m in ("qkv", "proj") and parts and parts[0] == "visual":
      parts += ["attn", m]
    elif m in ("linear_fc1", "linear_fc2") and "blocks" in parts:
      parts += ["mlp", m]
    elif match := re.fullmatch(r"mlp_(\d+)", m):  # Qwen2.5-VL merger: nn.Sequential indices
      parts += ["mlp", match[1]]
    elif m in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
      parts += ["self_attn", m]
    else:
      parts.append(m)
  return "model." + ".".join(parts) + "." + _LEAF[leaf], layout


def _to_flax(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.reshape(value.shape[0], -1).T
  return value


def _to_hf(value: np.ndarray, layout: str, hf_shape: tuple[int, ...] | None) -> np.ndarray:
  if layout == "linear":
    return value.T
  if layout == "conv":
    return value.T.reshape(hf_shape)
  return value


def _conv_shape(cfg: config_lib.ModelConfig) -> tuple[int, ...]:
  v = cfg.vision
  return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


def read_safetensors(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a (possibly sharded) safetensors directory, as float32 numpy."""
  from safetensors import safe_open

  hf_dir = pathlib.Path(hf_dir)
  files = sorted(hf_dir.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"No *.safetensors files in {hf_dir}.")
  tensors = {}
  for f in files:
    with safe_open(str(f), framework="flax") as fh:
      for key in fh.keys():
        name = key
        for pattern, repl in _KEY_ALIASES:
          name = pattern.sub(repl, name)
        tensors[name] = np.asarray(fh.get_tensor(key).astype(jnp.float32))
  return tensors


def params_from_hf(
  tensors: Mapping[str, np.ndarray], cfg: config_lib.ModelConfig, dtype: Any = jnp.float32
) -> Any:
  """Builds the Flax parameter tree from HF tensors; raises one error listing all problems.

  With `cfg.scan_layers` the decoder layers come stacked (`stack_layers`)."""
  if cfg.scan_layers:
    per_layer = params_from_hf(tensors, dataclasses.replace(cfg, scan_layers=False), dtype)
    return stack_layers(per_layer, cfg.text.num_layers, cfg.vision.depth)
  shapes = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.PRNGKey(0)))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  out, used, missing, bad_shape = {}, set(), [], []
  for path, leaf in flat.items():
    name, layout = hf_name(path)
    if name not in tensors:
      missing.append(name)
      continue
    value = _to_flax(tensors[name], layout, leaf.shape)
    if tuple(value.shape) != tuple(leaf.shape):
      bad_shape.append(
        f"{name}: checkpoint {tuple(tensors[name].shape)}, model expects {leaf.shape}"
      )
      continue
    used.add(name)
    out[path] = jnp.asarray(value, dtype)
  tied_head = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
  unexpected = sorted(set(tensors) - used - tied_head)
  if cfg.text.tie_word_embeddings and "lm_head.weight" in tensors:
    # A tied checkpoint may still store the head; it must equal the embedding.
    if not np.array_equal(
      tensors["lm_head.weight"], tensors.get("model.language_model.embed_tokens.weight")
    ):
      unexpected.append("lm_head.weight (differs from embed_tokens while tie_word_embeddings=True)")
  if missing or unexpected or bad_shape:
    lines = [f"missing: {m}" for m in missing] + [f"unexpected: {u}" for u in unexpected]
    lines += [f"wrong shape: {s}" for s in bad_shape]
    raise CheckpointMismatchError(
      f"Checkpoint does not match the {cfg.family} model ({len(lines)} problems):\n  "
      + "\n  ".join(lines)
    )
  return flax.traverse_util.unflatten_dict(out)


def load_hf_checkpoint(hf_dir: str | os.PathLike, dtype: Any = jnp.float32, run_model: Any = None):
  """Reads `config.json` and the safetensors of a HF Qwen-VL directory; with the run
  config's `model` section as `run_model`, the config computes as it asks
  (`config.with_compute`) and the parameters have its layout.

  Returns:
    (ModelConfig, params).
  """
  hf_dir = pathlib.Path(hf_dir)
  if not hf_dir.is_dir():
    raise FileNotFoundError(f"HF checkpoint directory not found: {hf_dir}")
  config_path = hf_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{hf_dir} has no config.json; is it a HF checkpoint directory?")
  cfg = config_lib.from_hf_config(json.loads(config_path.read_text()))
  if run_model is not None:
    cfg = config_lib.with_compute(cfg, run_model)
  return cfg, params_from_hf(read_safetensors(hf_dir), cfg, dtype)


def params_to_hf(params: Any, cfg: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """HF tensors of per-layer or stacked (`scan_layers`) parameters."""
  flat = flax.traverse_util.flatten_dict(unstack_layers(flax.core.unfreeze(params)))
  out = {}
  for path, value in flat.items():
    name, layout = hf_name(path)
    out[name] = np.ascontiguousarray(
      _to_hf(np.asarray(value, np.float32), layout, _conv_shape(cfg))
    )
  return out


def save_hf_checkpoint(
  params: Any, cfg: config_lib.ModelConfig, out_dir: str | os.PathLike, dtype: Any = jnp.float32
) -> pathlib.Path:
  """Writes `config.json` + `model.safetensors` that transformers loads."""
  from safetensors.flax import save_file

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tensors = {k: jnp.asarray(v, dtype) for k, v in params_to_hf(params, cfg).items()}
  save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  hf_config = config_lib.to_hf_config(cfg)
  hf_config["torch_dtype"] = jnp.dtype(dtype).name
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
  return out_dir
