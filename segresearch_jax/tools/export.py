"""Turns a training checkpoint into a HuggingFace directory that transformers loads.

    python -m segresearch_jax.tools.export --checkpoint=runs/okvos/checkpoints \
        [--step=N] --out=/ckpt/segresearch-qwen3-vl [--overwrite]

Reads only the params of the saved train state (never the optimizer state) and the
metadata the trainer saved with them (`checkpoint.make_metadata`), then writes:

    config.json, model.safetensors     `weights.save_hf_checkpoint`
    tokenizer.json, tokenizer_config.json
    processor_config.json, preprocessor_config.json, video_preprocessor_config.json
    chat template                      the source's own, byte for byte (below)
    generation_config.json             stops at <|im_end|>

so `AutoProcessor`, `AutoTokenizer` and `Qwen3VLForConditionalGeneration` (or
`Qwen2_5_VLForConditionalGeneration`) load it with `from_pretrained(out)`. The
tokenizer is the run's: the embedded one is rebuilt from code (refused if the code now
builds a different one), a HF one is read from the directory the run used
(`--tokenizer_dir` overrides it, e.g. when that directory moved). Check the result
with `python -m segresearch_jax.tools.check_hf_parity --hf_dir=OUT`.

The chat template is the one of the tokenizer folder the run used (Qwen's, for a run
on a released checkpoint): its `chat_template.jinja` / `chat_template.json` files and
the `chat_template` entries of its `tokenizer_config.json` / `processor_config.json`,
exactly as the source has them, so transformers renders the prompts a user of the
source model gets. The embedded tokenizer has no template of its own: the export then
writes `chat_template.jinja` with `CHAT_TEMPLATE`, which renders exactly the trainer's
`protocol.chat_prompt`, and says so.

An existing non-empty `--out` is refused unless `--overwrite`; everything is written
into a sibling temporary folder first and renamed into place once complete, so a
failed export leaves nothing and an overwrite never mixes old and new files (stale
weight shards or index files of an earlier export).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from segresearch_jax import checkpoint, protocol
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, processor, weights
from segresearch_jax.models import tokenizer as tokenizer_lib

# Our own template, for the embedded tokenizer (which has none): string content is
# copied verbatim, an image part becomes one vision_start/image_pad/vision_end run (the
# processor expands the pad), so a system + user conversation renders to
# `protocol.chat_prompt` with its images expanded.
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
  """The run's tokenizer as a transformers tokenizer, and its folder (None: embedded)."""
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
    hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok.backend, eos_token=protocol.IM_END, pad_token=protocol.ENDOFTEXT
    )
    return hf_tok, None
  if entry["kind"] == "hf":
    path = pathlib.Path(entry["dir"])
    if not path.is_dir():
      raise FileNotFoundError(
        f"Tokenizer directory {path} (recorded in the checkpoint) not found; pass "
        "--tokenizer_dir with its new location."
      )
    return transformers.AutoTokenizer.from_pretrained(str(path)), path
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


def build_processor(
  model_cfg: config_lib.ModelConfig, tok: Any, chat_template: str = CHAT_TEMPLATE
):
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
    chat_template=chat_template,
  )


# ----------------------------------------------------------------------------
# Chat template: the source's files, as they are.
# ----------------------------------------------------------------------------

# Files that hold nothing but a chat template, and JSON configs with a `chat_template`
# entry next to other settings.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TEMPLATE_FOLDER = "additional_chat_templates"
TEMPLATE_CONFIGS = ("tokenizer_config.json", "processor_config.json")


def _json_object(path: pathlib.Path) -> dict[str, Any]:
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"Cannot read {path}: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} must hold a JSON object.")
  return value


def source_chat_template(source: pathlib.Path | None) -> dict[str, Any]:
  """Where `source` keeps its chat template: {file name: bytes} for whole files,
  {folder name: path} for the named-templates folder, {config name: template} for config
  entries; empty when it has none."""
  if source is None:
    return {}
  found: dict[str, Any] = {}
  for name in TEMPLATE_FILES:
    if (source / name).is_file():
      found[name] = (source / name).read_bytes()
  if (source / TEMPLATE_FOLDER).is_dir():
    found[TEMPLATE_FOLDER] = source / TEMPLATE_FOLDER
  for name in TEMPLATE_CONFIGS:
    if (source / name).is_file():
      entry = _json_object(source / name).get("chat_template")
      if entry is not None:
        found[name] = entry
  return found


def _template_text(found: dict[str, Any]) -> str | None:
  """The template the source's processor renders with (what transformers loads first)."""
  if "chat_template.jinja" in found:
    return found["chat_template.jinja"].decode("utf-8")
  if "chat_template.json" in found:
    return json.loads(found["chat_template.json"]).get("chat_template")
  for name in reversed(TEMPLATE_CONFIGS):
    if isinstance(found.get(name), str):
      return found[name]
  return None


def write_chat_template(out: pathlib.Path, found: dict[str, Any]) -> None:
  """Makes `out`'s chat template exactly `found`'s: what `save_pretrained` wrote is
  replaced, so no second template (ours, or one transformers re-serialised) is left for
  a loader to prefer."""
  for name in TEMPLATE_FILES:
    (out / name).unlink(missing_ok=True)
  shutil.rmtree(out / TEMPLATE_FOLDER, ignore_errors=True)
  for name in TEMPLATE_CONFIGS:
    path = out / name
    if not path.is_file():
      continue
    values = _json_object(path)
    values.pop("chat_template", None)
    if name in found:
      values["chat_template"] = found[name]
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  for name in TEMPLATE_FILES:
    if name in found:
      (out / name).write_bytes(found[name])
  if TEMPLATE_FOLDER in found:
    shutil.copytree(found[TEMPLATE_FOLDER], out / TEMPLATE_FOLDER)


# ----------------------------------------------------------------------------
# The output folder: refused when in use, replaced whole.
# ----------------------------------------------------------------------------


def _check_out_dir(out: pathlib.Path, overwrite: bool) -> None:
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} exists and is not a folder.")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(
      f"--out {out} is not empty; pass --overwrite to replace it (its files are removed)."
    )


def _replace_dir(staging: pathlib.Path, out: pathlib.Path) -> None:
  """Puts the finished `staging` folder at `out`, whatever `out` held before.

  Two renames within one parent folder: a reader sees the old folder or the new one
  (for an instant, neither), never a mixture; the old one is deleted afterwards.
  """
  old = None
  if out.is_dir() and any(out.iterdir()):
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
  elif out.is_dir():
    out.rmdir()
  try:
    os.rename(staging, out)
  except OSError:
    if old is not None:
      os.rename(old / out.name, out)
    raise
  if old is not None:
    shutil.rmtree(old)


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
  overwrite: bool = False,
  log: Callable[[str], Any] = print,
) -> pathlib.Path:
  """Writes the HF directory for `step` (None: the latest) of `checkpoint_dir`.

  Args:
    checkpoint_dir: a `checkpoint.Checkpointer` directory.
    out_dir: the HF directory to write (created); refused when not empty, unless
      `overwrite`.
    step: which saved step; None for the latest.
    tokenizer_dir: a HF tokenizer directory instead of the one the metadata names.
    dtype: the safetensors dtype, float32 or bfloat16.
    overwrite: replace a non-empty `out_dir` (as a whole: none of its files remain).
    log: where to say which chat template was written and why.

  Returns:
    The output directory.
  """
  import transformers

  out = pathlib.Path(out_dir).absolute()
  _check_out_dir(out, overwrite)
  step, metadata = checkpoint.read_metadata(checkpoint_dir, step)
  if not metadata.get("model_config"):
    raise ValueError(
      f"Checkpoint step {step} in {checkpoint_dir} has no model_config in its metadata "
      "(save it with `checkpoint.make_metadata`)."
    )
  model_cfg = checkpoint.model_config_from_dict(metadata["model_config"])
  tok, source = _hf_tokenizer(metadata.get("tokenizer"), tokenizer_dir)
  _check_tokenizer(model_cfg, tok)
  template = source_chat_template(source)

  # The params land on the host CPU: export never needs an accelerator.
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  shapes = jax.eval_shape(lambda: policy.init_params(model_cfg, jax.random.PRNGKey(0)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), shapes)
  params = checkpoint.restore_params(checkpoint_dir, step, abstract)

  out.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
  try:
    weights.save_hf_checkpoint(params, model_cfg, staging, jnp.dtype(dtype))
    hf_processor = build_processor(model_cfg, tok, _template_text(template) or CHAT_TEMPLATE)
    hf_processor.save_pretrained(str(staging))
    # Loaders that predate processor_config.json read the per-part files.
    hf_processor.image_processor.save_pretrained(str(staging))
    hf_processor.video_processor.save_pretrained(str(staging))
    transformers.GenerationConfig(
      eos_token_id=[tok.convert_tokens_to_ids(protocol.IM_END)],
      pad_token_id=tok.convert_tokens_to_ids(protocol.ENDOFTEXT),
    ).save_pretrained(str(staging))
    if template:
      write_chat_template(staging, template)
      log(f"chat template: {', '.join(sorted(template))} of {source}, kept as they are")
    else:
      write_chat_template(staging, {"chat_template.jinja": CHAT_TEMPLATE.encode("utf-8")})
      why = "the run used the embedded tokenizer" if source is None else f"{source} has none"
      log(
        f"chat template: {why}, so chat_template.jinja is this project's template, which "
        "renders exactly the prompts the run trained on (protocol.chat_prompt)"
      )
    _replace_dir(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="checkpoint directory of a run")
  parser.add_argument("--out", required=True, help="HF directory to write")
  parser.add_argument("--step", type=int, default=None, help="saved step (default: the latest)")
  parser.add_argument("--tokenizer_dir", default=None, help="HF tokenizer dir to use instead")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty --out as a whole"
  )
  args = parser.parse_args(argv)
  try:
    out = export(
      args.checkpoint,
      args.out,
      step=args.step,
      tokenizer_dir=args.tokenizer_dir,
      dtype=args.dtype,
      overwrite=args.overwrite,
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 1
  print(f"exported {args.checkpoint} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
