"""Checkpoint -> export tool -> transformers: same logits, and the processor files load."""

import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optimizer_config

from segresearch_jax import checkpoint, protocol
from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy, processor, weights
from segresearch_jax.models import tokenizer as tokenizer_lib
from segresearch_jax.rl import update
from segresearch_jax.tools import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

HF_MODELS = {
  "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
  "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.embedded_tokenizer()


def _model_config(preset: str, tokenizer) -> config_lib.ModelConfig:
  """A tiny preset on the embedded tokenizer's vocabulary, as the trainer builds it."""
  return dataclasses.replace(
    config_lib.with_vocab(config_lib.get_preset(preset), tokenizer.vocab_size),
    image_token_id=tokenizer.image_pad_id,
    vision_start_token_id=tokenizer.vision_start_id,
    vision_end_token_id=tokenizer.vision_end_id,
  )


def _random_params(cfg: config_lib.ModelConfig, seed: int = 0):
  """Every weight random: default init (ones/zeros) hides norm and bias bugs (docs/method.md §5)."""
  shapes = jax.eval_shape(lambda: policy.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)
  out = {}
  for path, x in sorted(flax.traverse_util.flatten_dict(shapes).items()):
    norm_scale = any("norm" in p for p in path) and path[-1] in ("scale", "weight")
    out[path] = jnp.asarray(float(norm_scale) + 0.2 * rng.standard_normal(x.shape), x.dtype)
  return flax.traverse_util.unflatten_dict(out)


def _save_run(directory, cfg, params, tokenizer, step=5):
  state = update.init_state(
    params, update.make_optimizer(optimizer_config(lr=1e-4, warmup_steps=10, updates_per_step=1))
  )
  metadata = checkpoint.make_metadata(cfg, {"model": {"preset": "tiny"}}, tokenizer)
  with checkpoint.Checkpointer(directory, keep=2, save_every=1) as ckpt:
    assert ckpt.save(step, state, jax.random.key(0), None, metadata)


def _images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (70, 90, 3), dtype=np.uint8) for _ in range(2)]


def _flax_logits(cfg, params, ids, pixels, grid_thw):
  n_images = len(grid_thw)
  grid = tuple(int(g) for g in grid_thw[0][1:])
  assert all(tuple(g[1:]) == grid for g in grid_thw)
  model = policy.Policy(cfg)
  patches = jnp.asarray(pixels).reshape(n_images, grid[0] * grid[1], -1)
  visual, deepstack = model.apply(
    {"params": params}, patches, grid, method=policy.Policy.encode_images
  )
  visual = visual.reshape(1, -1, visual.shape[-1])  # [1, n_images * tokens, D]
  # Explicit sizes: Qwen2.5-VL has no DeepStack layers, and -1 cannot be inferred from 0.
  deepstack = deepstack.reshape(deepstack.shape[0], *visual.shape)
  merged = tuple(g // cfg.vision.spatial_merge_size for g in grid)
  pos, _ = policy.rope_index(ids, np.ones_like(ids), [[merged] * n_images], cfg.image_token_id)
  logits, _ = model.apply(
    {"params": params},
    jnp.asarray(ids, jnp.int32),
    jnp.asarray(pos),
    jnp.ones(ids.shape, bool),
    visual,
    deepstack,
  )
  return np.asarray(logits)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_qwen2_5"])
def test_export_loads_in_transformers_with_the_same_logits(preset, tokenizer, tmp_path):
  cfg = _model_config(preset, tokenizer)
  params = _random_params(cfg)
  _save_run(tmp_path / "ckpt", cfg, params, tokenizer)
  out = tmp_path / "hf"
  assert export.main([f"--checkpoint={tmp_path / 'ckpt'}", f"--out={out}"]) == 0
  for name in (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "generation_config.json",
  ):
    assert (out / name).is_file(), name

  model_cls, processor_cls = HF_MODELS[cfg.family]
  hf_processor = transformers.AutoProcessor.from_pretrained(out)
  assert type(hf_processor).__name__ == processor_cls
  # The PIL backend is the one our processor matches to 1e-5 (torchvision's bicubic differs).
  pil_images = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")

  # The chat template renders exactly the trainer's prompt.
  system = protocol.system_prompt("one-hop")
  user = protocol.user_content([0, 12], "Please find 'the red circle' in the provided video.")
  rendered = hf_processor.apply_chat_template(
    export.chat_messages(system, user), tokenize=False, add_generation_prompt=True
  )
  image_run = protocol.VISION_START + protocol.IMAGE_PAD + protocol.VISION_END
  prompt = protocol.chat_prompt(system, user)
  assert rendered == prompt.replace(protocol.IMAGE_PLACEHOLDER, image_run)

  # The processor gives our processor's token ids and pixels.
  images = _images()
  inputs = hf_processor(text=[rendered], images=images, return_tensors="np")
  ours = processor.encode_prompt(
    prompt,
    images,
    tokenizer,
    processor.QWEN3_VL if cfg.family == "qwen3_vl" else processor.QWEN2_5_VL,
  )
  np.testing.assert_array_equal(inputs["input_ids"][0], ours["input_ids"])
  np.testing.assert_array_equal(inputs["image_grid_thw"], ours["grid_thw"])
  pil_pixels = pil_images(images=images, return_tensors="np")["pixel_values"]
  assert np.abs(pil_pixels - ours["pixel_values"]).max() < 1e-5

  # The model: transformers on the exported directory vs our Flax model on the params saved.
  model = getattr(transformers, model_cls).from_pretrained(out).eval()
  with torch.no_grad():
    expected = model(
      input_ids=torch.tensor(inputs["input_ids"]),
      attention_mask=torch.tensor(inputs["attention_mask"]),
      pixel_values=torch.tensor(inputs["pixel_values"]),
      image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
      mm_token_type_ids=torch.tensor(inputs["mm_token_type_ids"]),
    ).logits.numpy()
  ids = np.asarray(inputs["input_ids"])
  got = _flax_logits(cfg, params, ids, inputs["pixel_values"], inputs["image_grid_thw"])
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= 1e-4

  # The tokenizer alone, and the generation config.
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.encode(prompt, add_special_tokens=False) == tokenizer.encode(prompt)
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert generation.eos_token_id == [tokenizer.im_end_id]


def test_a_hf_tokenizer_directory_is_carried_over_and_steps_selectable(tokenizer, tmp_path):
  cfg = _model_config("tiny", tokenizer)
  _save_run(tmp_path / "first", cfg, _random_params(cfg), tokenizer)
  assert export.main([f"--checkpoint={tmp_path / 'first'}", f"--out={tmp_path / 'hf1'}"]) == 0
  # A run whose tokenizer is a HF directory (here: the first export).
  hf_tokenizer = tokenizer_lib.load_tokenizer(tmp_path / "hf1")
  params = _random_params(cfg, seed=3)
  _save_run(tmp_path / "second", cfg, _random_params(cfg, seed=2), hf_tokenizer, step=2)
  _save_run(tmp_path / "second", cfg, params, hf_tokenizer, step=4)
  out = export.export(tmp_path / "second", tmp_path / "hf2", step=4)
  text = protocol.chat_prompt("sys", "frame 3 <image>\n\nPlease find 'x'.")
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
  exported = tokenizer_lib.load_tokenizer(out)  # Our own loader reads it too.
  assert exported.image_pad_id == cfg.image_token_id
  cfg2, params2 = weights.load_hf_checkpoint(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)  # Step 4, not step 2.


def test_clear_errors(tokenizer, tmp_path, capsys):
  assert export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
  assert "Checkpoint directory not found" in capsys.readouterr().err

  cfg = _model_config("tiny", tokenizer)
  _save_run(tmp_path / "ckpt", cfg, _random_params(cfg), tokenizer)
  assert export.main(["--checkpoint", str(tmp_path / "ckpt"), "--out", "x", "--step", "7"]) == 1
  assert "No checkpoint for step 7" in capsys.readouterr().err

  # A model whose special-token ids are not the tokenizer's.
  tiny = config_lib.get_preset("tiny")
  _save_run(tmp_path / "tiny", tiny, _random_params(tiny), tokenizer)
  with pytest.raises(ValueError, match="tokenizer does not match the model"):
    export.export(tmp_path / "tiny", tmp_path / "o")

  # No tokenizer recorded, and an embedded tokenizer the code no longer builds.
  _save_run(tmp_path / "none", cfg, _random_params(cfg), None)
  with pytest.raises(ValueError, match="names no tokenizer"):
    export.export(tmp_path / "none", tmp_path / "o")

  class OldEmbedded:
    name = "embedded:0000000000000000"

  _save_run(tmp_path / "old", cfg, _random_params(cfg), OldEmbedded())
  with pytest.raises(ValueError, match="this code builds"):
    export.export(tmp_path / "old", tmp_path / "o")
  assert not (tmp_path / "o").exists()  # Nothing is written before the checks pass.


def test_a_non_empty_out_folder_is_refused_and_overwrite_replaces_it_whole(
  tokenizer, tmp_path, capsys, monkeypatch
):
  cfg = _model_config("tiny", tokenizer)
  _save_run(tmp_path / "ckpt", cfg, _random_params(cfg), tokenizer)
  out = tmp_path / "hf"
  out.mkdir()
  # What a sharded export of another model leaves: transformers would read the index.
  stale = {"model.safetensors.index.json": "{}", "model-00001-of-00002.safetensors": "x"}
  for name, text in stale.items():
    (out / name).write_text(text)
  args = [f"--checkpoint={tmp_path / 'ckpt'}", f"--out={out}"]
  assert export.main(args) == 1
  assert "not empty; pass --overwrite" in capsys.readouterr().err
  assert sorted(p.name for p in out.iterdir()) == sorted(stale)  # Untouched.

  # A failure half-way through an overwrite leaves the old folder as it was.
  def fail(*_args, **_kwargs):
    raise ValueError("disk full")

  with monkeypatch.context() as m:
    m.setattr(weights, "save_hf_checkpoint", fail)
    assert export.main([*args, "--overwrite"]) == 1
  assert sorted(p.name for p in out.iterdir()) == sorted(stale)

  assert export.main([*args, "--overwrite"]) == 0
  said = capsys.readouterr().out
  assert "embedded tokenizer" in said and "chat_template.jinja" in said
  names = {p.name for p in out.iterdir()}
  assert not names & set(stale) and {"config.json", "model.safetensors"} <= names
  assert (out / "chat_template.jinja").read_text() == export.CHAT_TEMPLATE
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # No debris.
  cfg2, _ = weights.load_hf_checkpoint(out)
  assert cfg2 == cfg
  # An empty folder (e.g. made by a job script) is not "in use".
  (tmp_path / "empty").mkdir()
  assert export.main([args[0], f"--out={tmp_path / 'empty'}"]) == 0
  assert (tmp_path / "empty" / "model.safetensors").is_file()


# A Qwen-style template: trailing blank line and spaces, non-ASCII, its own JSON layout.
SOURCE_TEMPLATE = (
  "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
  "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
  "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}"
  "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}{%- else -%}{{- part['text'] -}}"
  "{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
  "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
  "{#- Qwen — source template -#}\n\n  "
)


def test_the_source_chat_template_is_kept_byte_for_byte(tokenizer, tmp_path, capsys):
  cfg = _model_config("tiny", tokenizer)
  source = tmp_path / "Qwen-source"
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizer.backend, eos_token=protocol.IM_END, pad_token=protocol.ENDOFTEXT
  ).save_pretrained(source)
  (source / "chat_template.jinja").unlink(missing_ok=True)
  processor_template = (
    '{\n  "chat_template": ' + json.dumps(SOURCE_TEMPLATE, ensure_ascii=False) + "\n}"
  ).encode()
  (source / "chat_template.json").write_bytes(processor_template)
  tokenizer_template = SOURCE_TEMPLATE.replace("source template", "tokenizer template")
  config = json.loads((source / "tokenizer_config.json").read_text())
  (source / "tokenizer_config.json").write_text(
    json.dumps({**config, "chat_template": tokenizer_template})
  )

  class SourceTokenizer:  # What the trainer records for a run on a HF tokenizer folder.
    name = str(source)

  _save_run(tmp_path / "ckpt", cfg, _random_params(cfg), SourceTokenizer())
  out = export.export(tmp_path / "ckpt", tmp_path / "hf")
  assert "kept as they are" in capsys.readouterr().out
  assert (out / "chat_template.json").read_bytes() == processor_template
  assert not (out / "chat_template.jinja").exists()  # No second template to prefer.
  exported = json.loads((out / "tokenizer_config.json").read_text())
  assert exported["chat_template"] == tokenizer_template
  assert "chat_template" not in json.loads((out / "processor_config.json").read_text())

  # A transformers user renders what a user of the source model renders.
  messages = export.chat_messages("sys", "frame 3 <image>\n\nPlease find 'x'.")
  loaded = transformers.AutoProcessor.from_pretrained(out)
  assert loaded.chat_template == SOURCE_TEMPLATE
  rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert rendered.endswith("<|im_start|>assistant\n")
  assert transformers.AutoTokenizer.from_pretrained(out).chat_template == tokenizer_template
