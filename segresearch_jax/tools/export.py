"""Turns a training checkpoint into a HuggingFace directory that transformers loads.

    python -m segresearch_jax.tools.export --checkpoint=runs/okvos/checkpoints \
        [--step=N] --out=/ckpt/segresearch-qwen3-vl

Reads only the params of the saved train state (never the optimizer state) and the
metadata the trainer saved with them (`checkpoint.make_metadata`), then writes:

    config.json, model.safetensors     `weights.save_hf_checkpoint`
    tokenizer.json, tokenizer_config.json
    processor_config.json, preprocessor_config.json, video_preprocessor_config.json
    chat_template.jinja                renders exactly `protocol.chat_prompt`
    generation_config.json             stops at <|im_end|>

so `AutoProcessor`, `AutoTokenizer` and `Qwen3VLForConditionalGeneration` (or
`Qwen2_5_VLForConditionalGeneration`) load it with `from_pretrained(out)`. The
tokenizer is the run's: the embedded one is rebuilt from code (refused if the code now
builds a different one), a HF one is read from the directory the run used
(`--tokenizer_dir` overrides it, e.g. when that directory moved). Check the result
with `python -m segresearch_jax.tools.check_hf_parity --hf_dir=OUT`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax import checkpoint
from segresearch_jax.agent import protocol
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, processor, weights
from segresearch_jax.models import tokenizer as tokenizer_lib

# Our own template (not Qwen's): string content is copied verbatim, an image part becomes
# one vision_start/image_pad/vision_end run (the processor expands the pad), so a
# system + user conversation renders to `protocol.chat_prompt` with its images expanded.
CHAT_TEMPLATE = (
  "{%- for message in messages -%}"
  "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
  "{%- if message['content'] is string -%}"
  "{{- message['content'] -}}"
  "{%- else -%}"
  "{%- for part in message['content'] -%}"
  "{%- if part['type'] == 'image' -%}"
  "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
  "{%- elif part['type'] == 'text' -%}"
  "{{- part['text'] -}}"
  "{%- endif -%}"
  "{%- endfor -%}"
  "{%- endif -%}"
  "{{- '<|im_end|>\\n' -}}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}"
  "{{- '<|im_start|>assistant\\n' -}}"
  "{%- endif -%}"
)


def chat_messages(system: str, user: str) -> list[dict[str, Any]]:
  """Our system/user texts (with `<image>` placeholders) as transformers chat messages.

  `processor.apply_chat_template(chat_messages(s, u), add_generation_prompt=True)` on an
  exported directory gives `protocol.chat_prompt(s, u)` with each `<image>` replaced by
  vision_start + image_pad + vision_end.
  """
  parts: list[dict[str, str]] = []
  for i, text in enumerate(user.split(protocol.IMAGE_PLACEHOLDER)):
    if i:
      parts.append({"type": "image"})
    if text:
      parts.append({"type": "text", "text": text})
  return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


# ----------------------------------------------------------------------------
# Tokenizer and processor.
# ----------------------------------------------------------------------------


def _hf_tokenizer(entry: dict[str, Any] | None, tokenizer_dir: str | None):
  """The run's tokenizer as a transformers tokenizer."""
  import transformers

  if tokenizer_dir:
    entry = {"kind": "hf", "dir": tokenizer_dir}
  if not entry:
    raise ValueError(
      "The checkpoint metadata names no tokenizer (saved without `make_metadata(..., "
      "tokenizer=...)`); pass --tokenizer_dir with the tokenizer the run used."
    )
  if entry["kind"] == "embedded":
    tok = tokenizer_lib.embedded_tokenizer()
    if tok.name != entry["name"]:
      raise ValueError(
        f"The run used the embedded tokenizer {entry['name']}, but this code builds "
        f"{tok.name}; pass --tokenizer_dir with the tokenizer the run used."
      )
    # The embedded tokenizer wraps a `tokenizers.Tokenizer`; transformers takes it as is.
    return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok.backend, eos_token=protocol.IM_END, pad_token=protocol.ENDOFTEXT
    )
  if entry["kind"] == "hf":
    path = pathlib.Path(entry["dir"])
    if not path.is_dir():
      raise FileNotFoundError(
        f"Tokenizer directory {path} (recorded in the checkpoint) not found; pass "
        "--tokenizer_dir with its new location."
      )
    return transformers.AutoTokenizer.from_pretrained(str(path))
  raise ValueError(f"Unknown tokenizer kind {entry['kind']!r} in the checkpoint metadata.")


def _check_tokenizer(model_cfg: config_lib.ModelConfig, tok: Any) -> None:
  """The tokenizer must produce the ids the model reads, or the export is useless."""
  expected = {
    protocol.IMAGE_PAD: model_cfg.image_token_id,
    protocol.VISION_START: model_cfg.vision_start_token_id,
    protocol.VISION_END: model_cfg.vision_end_token_id,
  }
  problems = [
    f"{token}: tokenizer {tok.convert_tokens_to_ids(token)}, model {tid}"
    for token, tid in expected.items()
    if tok.convert_tokens_to_ids(token) != tid
  ]
  if len(tok) > model_cfg.text.vocab_size:
    problems.append(f"vocabulary: tokenizer {len(tok)}, model {model_cfg.text.vocab_size}")
  if problems:
    raise ValueError("The tokenizer does not match the model: " + "; ".join(problems) + ".")


def build_processor(model_cfg: config_lib.ModelConfig, tok: Any):
  """The family's transformers processor, with the image settings the trainer used."""
  import transformers

  cfg = processor.QWEN3_VL if model_cfg.family == "qwen3_vl" else processor.QWEN2_5_VL
  shared = dict(
    patch_size=cfg.patch_size,
    merge_size=cfg.merge_size,
    temporal_patch_size=cfg.temporal_patch_size,
    image_mean=list(cfg.mean),
    image_std=list(cfg.std),
  )
  image_processor = transformers.Qwen2VLImageProcessor(
    size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}, **shared
  )
  if model_cfg.family == "qwen3_vl":
    video = transformers.Qwen3VLVideoProcessor(**shared)
    cls = transformers.Qwen3VLProcessor
  else:
    video = transformers.Qwen2VLVideoProcessor(**shared)
    cls = transformers.Qwen2_5_VLProcessor
  return cls(
    image_processor=image_processor,
    tokenizer=tok,
    video_processor=video,
    chat_template=CHAT_TEMPLATE,
  )


# ----------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------


def export(
  checkpoint_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  step: int | None = None,
  tokenizer_dir: str | None = None,
  dtype: str = "float32",
) -> pathlib.Path:
  """Writes the HF directory for `step` (None: the latest) of `checkpoint_dir`.

  Args:
    checkpoint_dir: a `checkpoint.Checkpointer` directory.
    out_dir: the HF directory to write (created).
    step: which saved step; None for the latest.
    tokenizer_dir: a HF tokenizer directory instead of the one the metadata names.
    dtype: the safetensors dtype, float32 or bfloat16.

  Returns:
    The output directory.
  """
  import transformers

  step, metadata = checkpoint.read_metadata(checkpoint_dir, step)
  if not metadata.get("model_config"):
    raise ValueError(
      f"Checkpoint step {step} in {checkpoint_dir} has no model_config in its metadata "
      "(save it with `checkpoint.make_metadata`)."
    )
  model_cfg = checkpoint.model_config_from_dict(metadata["model_config"])
  tok = _hf_tokenizer(metadata.get("tokenizer"), tokenizer_dir)
  _check_tokenizer(model_cfg, tok)

  # The params land on the host CPU: export never needs an accelerator.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  shapes = jax.eval_shape(lambda: policy.init_params(model_cfg, jax.random.PRNGKey(0)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), shapes)
  params = checkpoint.restore_params(checkpoint_dir, step, abstract)

  out = weights.save_hf_checkpoint(params, model_cfg, out_dir, jnp.dtype(dtype))
  hf_processor = build_processor(model_cfg, tok)
  hf_processor.save_pretrained(str(out))
  # Loaders that predate processor_config.json read the per-part files.
  hf_processor.image_processor.save_pretrained(str(out))
  hf_processor.video_processor.save_pretrained(str(out))
  transformers.GenerationConfig(
    eos_token_id=[tok.convert_tokens_to_ids(protocol.IM_END)],
    pad_token_id=tok.convert_tokens_to_ids(protocol.ENDOFTEXT),
  ).save_pretrained(str(out))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory of a run")
  parser.add_argument("--out", required=True, help="HF directory to write")
  parser.add_argument("--step", type=int, default=None, help="saved step (default: the latest)")
  parser.add_argument("--tokenizer_dir", default=None, help="HF tokenizer dir to use instead")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)
  try:
    out = export(
      args.checkpoint,
      args.out,
      step=args.step,
      tokenizer_dir=args.tokenizer_dir,
      dtype=args.dtype,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 1
  print(f"exported {args.checkpoint} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
