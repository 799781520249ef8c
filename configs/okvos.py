r"""Seg-ReSearch on OK-VOS.

The embedded default (no argument) needs nothing but this repository: a synthetic
OK-VOS-style dataset and knowledge base made on first use, a tiny Qwen3-VL trained
from scratch, BM25 search over the synthetic KB and the weight-free mask cache.

    python -m segresearch_jax.train --config=configs/okvos.py

The paper recipe (Qwen3-VL-4B, 16 prompts x 8 rollouts, lr 1e-6, 100 steps):

    python -m segresearch_jax.train --config=configs/okvos.py:paper \
        --config.model.hf_dir=/ckpt/Qwen3-VL-4B-Instruct \
        --config.data.okvos_dir=/data/OK-VOS --config.search.kb_dir=/data/local_KB \
        --config.search.dense_model=/ckpt/e5-base-v2 \
        --config.eval.sam2_checkpoint=/ckpt/sam2.1_hiera_large.pt

It evaluates with SAM2.1 hiera-large and Serper web search (SERPER_API_KEY). Variants
combine left to right: `:paper,8b` (Qwen3-VL-8B, 160 steps, tensor parallel 2),
`:paper,dapo` (clip-higher, dynamic sampling, overlong shaping); `:runlocal` (last,
e.g. `:paper,runlocal`) shrinks any of them to a tiny run that a CPU test finishes.

Any field can be overridden with `--config.x.y=value`; a misspelled key fails at once
(`lock_config=True`). Lengths: we cap the *response* at `rollout.max_response_length`
(the official code caps prompt + response together at that number).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` is a comma-separated list of variants (see VARIANTS)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/okvos"
  c.total_steps = 20
  c.dry_run = False  # Build the model with abstract arrays and print the plan, then exit.
  # Persistent XLA compilation cache: a rerun (or a resumed run) skips compilation. "" = off.
  c.compilation_cache_dir = "~/.cache/segresearch_jax/xla"

  c.model = ml_collections.ConfigDict()
  c.model.preset = "embedded"  # tiny | embedded | mid | qwen3_vl_2b | qwen3_vl_4b | qwen3_vl_8b
  c.model.hf_dir = ""  # A local HF checkpoint; overrides the preset's shapes and weights.
  c.model.tokenizer_dir = ""  # Local HF tokenizer/processor dir; empty = the embedded tokenizer.
  c.model.dtype = "float32"  # Compute dtype (params stay fp32): float32 | bfloat16.
  # Memory and speed on accelerators (docs: `python -m segresearch_jax.tools.aot`):
  # per-layer rematerialisation none | full | dots, the decoder layers under one
  # lax.scan (stacked parameters), attention kernel auto | xla_blocked | splash | cudnn
  # (auto: splash on TPU, cuDNN on GPU, the blocked XLA loop on CPU).
  c.model.remat = "none"
  c.model.scan_layers = False
  c.model.attention = "auto"
  # True: refuse to start without `hf_dir` (a recipe that fine-tunes a pretrained
  # model must not silently train a randomly initialised one).
  c.model.require_hf_dir = False

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | okvos
  c.data.okvos_dir = ""  # Raw OK-VOS layout (docs/method.md §4.1) when source == okvos.
  # Evaluating a reasoning benchmark instead (`evaluate.py`; variants reasonseg |
  # reasonvos | revos): its name, and each one's raw folder as released.
  c.data.benchmark = ""
  c.data.reasonseg_dir = ""
  c.data.reasonvos_dir = ""
  c.data.revos_dir = ""
  c.data.synthetic_dir = ""  # Where the synthetic set is built and cached; empty = under workdir.
  # Samples per split of the synthetic set (disjoint entities; 96 train teams, 24 test).
  # The warm start reads 1,536 expert episodes: on 384 the policy memorises their
  # keyframes instead of reading its frames (README, "What the embedded default does").
  c.data.synthetic_train = 1536
  c.data.synthetic_test = 32
  # Entities (teams, with their cups, coaches and institutes) of the train split; the
  # test split has 24 others.
  c.data.synthetic_train_teams = 96
  c.data.train_split = "train"
  c.data.eval_split = "test"
  # The synthetic videos: 3 frames of a 2 x 2 board, four emblems, one drawn big a
  # frame. At 64 pixels each cell is 2 x 2 16-pixel patches, i.e. one merged vision
  # token of the embedded policy (448 / 864 / 256 pixels in the paper).
  c.data.num_frames = 3
  c.data.frame_size = 64  # Shown frames are resized to this square.
  c.data.keyframe_size = 64  # The high-res keyframe observation.
  c.data.search_image_size = 32  # image_search results.
  c.data.min_pixels = 0  # Image processor minimum; -1 = the family's (Qwen3-VL: 65536).
  c.data.on_error = "skip"  # skip (and count) | raise, for broken samples.
  # A run stops when more than this share of the samples it has read were broken
  # (on_error=skip), naming a few of them: a bad path or a half-copied dataset
  # should not train on what little is left.
  c.data.max_broken_fraction = 0.1
  # System prompt templates: "default", "compact" (same protocol, a third of the tokens)
  # or a folder with system_search.txt / system_no_search.txt (e.g. a checkpoint's own).
  c.data.templates = "compact"

  c.search = ml_collections.ConfigDict()
  c.search.backend = "local"  # local | service | serper | ddgs | none (search disabled)
  c.search.kb_dir = ""  # Official-format KB (text_corpus.jsonl, ...); empty = the synthetic KB.
  c.search.method = "bm25"  # bm25 | dense | hybrid
  c.search.dense_model = ""  # Local embedding model dir; empty = the packaged MiniLM.
  # The e5 `query: ` / `passage: ` prefixes (the official e5-base-v2 retriever was
  # trained with them); needs search.dense_model.
  c.search.dense_prefixes = False
  # Hybrid retrieval: alpha x dense + (1 - alpha) x BM25 (each score min-max normalised).
  c.search.hybrid_alpha = 0.5
  # Corpus embeddings are cached on disk; empty = ~/.cache/segresearch_jax/embeddings.
  c.search.embedding_cache_dir = ""
  c.search.service_url = ""  # backend=service: a `segresearch_jax.search.service` root.
  # Web backends (serper | ddgs): results per text search (official 3, whatever
  # text_top_k says); serper fetches each result page and answers with the context
  # around its best-matching sentence, 960 characters in all (official page processing).
  c.search.web_top_k = 3
  c.search.fetch_pages = True
  c.search.serper_base_url = "https://google.serper.dev"  # The Serper API root.
  c.search.image_dir = ""  # Where serper downloads image results; empty = keep the URLs.
  # Official "web browsing": an OpenAI-compatible chat endpoint condenses the fetched
  # pages (temperature 0.6, top_p 0.95, up to 8192 tokens). Empty = off.
  c.search.summarizer_url = ""
  c.search.summarizer_model = ""
  c.search.summarizer_retries = 10
  c.search.summarizer_timeout_s = 120.0
  c.search.text_top_k = 1  # Official 2; the synthetic KB answers every query at rank 1.
  c.search.image_top_k = 1
  c.search.timeout_s = 30.0  # Per request (web and service backends), as a whole.
  # Web and service backends: retries of a failed request, the wait doubling from backoff_s.
  c.search.max_retries = 2
  c.search.backoff_s = 1.0
  c.search.cache_mode = "read_write"  # off | read_write | replay
  c.search.cache_path = ""  # Empty = workdir/search_cache.sqlite.

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 4
  c.rollout.max_turns = 4
  c.rollout.max_prompt_length = 272
  c.rollout.max_response_length = 384
  c.rollout.max_action_length = 96
  c.rollout.max_obs_length = 160
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  # Rows prefilled together when observations arrive (rounded down to a divisor of the
  # batch); 0 = a sixteenth of the batch (`rollout.RolloutConfig.observe_rows`).
  c.rollout.observe_rows = 0
  # KV-cache slots of one episode: the padded prompt, its actions and observations. An
  # episode that reaches it stops with `max_length`. 0 = max_prompt_length +
  # max_response_length (the paper's 2048 + 8192: 10,240 slots a row, where the worst
  # case of every turn would need 14,337).
  c.rollout.max_episode_tokens = 0
  # Continuous batching: decode slots for the rollout's episodes; a slot whose episode
  # ends takes the next pending one. 0 = one slot per episode (no refill).
  c.rollout.slots = 0

  c.reward = ml_collections.ConfigDict()
  c.reward.tpr_p = 0.7
  c.reward.tpr_budget = 10
  c.reward.igr_threshold = 0.5
  c.reward.mask_weight = (
    1.0  # Weight of the SAM2 mask-cache term (docs/method.md §3.2); 0 = docs/method.md §3.1.
  )
  c.reward.mask_prompt = "box"  # Which cached prompt scores the mask: box | point | mean.

  # The precomputed mask-IoU tables behind the mask reward (docs/method.md §3.2), built with
  # `python -m segresearch_jax.tools.build_mask_cache --config=...`.
  c.mask_cache = ml_collections.ConfigDict()
  c.mask_cache.segmenter = "weight_free"  # weight_free | sam2
  c.mask_cache.sam2_config = "configs/sam2.1/sam2.1_hiera_l.yaml"
  c.mask_cache.sam2_checkpoint = ""  # Local SAM2.1 checkpoint (.pt); required for sam2.
  c.mask_cache.point_grid = 32  # G: G x G point prompts per frame.
  c.mask_cache.box_bins = 16  # K: bins per box coordinate.
  c.mask_cache.dir = ""  # Empty = next to the dataset (okvos_dir/mask_cache).

  c.loss = ml_collections.ConfigDict()
  c.loss.clip_low = 0.2
  c.loss.clip_high = 0.2  # DAPO clip-higher: 0.28
  c.loss.dual_clip = 3.0  # 0 disables.
  c.loss.log_ratio_clamp = 20.0
  c.loss.kl_coef = 0.0  # > 0 keeps a frozen reference policy (the initial params).
  c.loss.kl_estimator = "low_var_kl"  # k1 | low_var_kl
  c.loss.entropy_coef = 0.0
  c.loss.aggregation = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
  # Optimizer updates per step (official: 16 prompts / 8 = 2; the embedded default: 4
  # updates of 2 prompts x 4 rows).
  c.loss.mini_batches = 4
  c.loss.micro_batches = 1  # Gradient accumulation inside one update.

  # DAPO options (off by default; the official DAPO script never reads them, docs/differences.md).
  c.dapo = ml_collections.ConfigDict()
  c.dapo.filter_groups = False  # Drop groups with zero reward variance and refill.
  c.dapo.max_refills = 3  # Extra rollout batches to draw when refilling.
  c.dapo.overlong_buffer = 0  # > 0: soft overlong penalty over the last N tokens.
  c.dapo.overlong_penalty = 1.0
  c.dapo.overlong_mask = False  # Mask truncated (max_length) trajectories out of the loss.

  # Supervised warm start on the synthetic expert trajectories (search -> keyframe
  # -> answer), for a policy that starts from random weights.
  c.sft = ml_collections.ConfigDict()
  # 1,500 steps: where the embedded policy has learned to compare the colour it reads
  # in a frame with the one it named, on three seeds (README); 1,000 is not enough.
  c.sft.steps = 1500
  c.sft.lr = 2e-3
  c.sft.batch_size = 8
  c.sft.warmup_steps = 10
  # Warm-start steps between printed and recorded metrics (each one waits for its
  # step; between them steps are dispatched back to back).
  c.sft.log_every = 25
  # The vision tower's step as a fraction of the rest's (0 = frozen), in the warm start
  # and in GRPO (optim.vision_lr_scale). Trained from scratch at sft.lr, the embedded
  # tower's output tokens drift to one shared vector within ~150 steps; frozen at its
  # random initialisation (0, the embedded default) they keep telling colours apart.
  c.sft.vision_lr_scale = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.vision_lr_scale = 0.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # (regex over the '/'-joined parameter path, spec) pairs tried before
  # sharding.DEFAULT_RULES, e.g. ((r"lm_head/kernel$", ("fsdp", "tensor")),).
  c.mesh.rules = ()
  # The dry run fails when a rule leaves a larger parameter whole on every device.
  c.mesh.max_replicated_elements = 2**20

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 3

  c.eval = ml_collections.ConfigDict()
  # Validation every N steps (greedy, held-out split, `val/*` metrics); 0 = only at the end.
  c.eval.every_steps = 0
  c.eval.num_samples = 0  # 0 = the whole split.
  c.eval.segmenter = "weight_free"  # weight_free | sam2
  # Evaluation's search backend: "" = the training one (config.search), else
  # local | service | serper | ddgs | none with the other config.search settings.
  c.eval.search = ""
  c.eval.sam2_config = "configs/sam2.1/sam2.1_hiera_l.yaml"
  c.eval.sam2_checkpoint = ""
  c.eval.official_two_calls = (
    False  # Reproduce the official box-dropping SAM2 prompts (docs/differences.md).
  )
  c.eval.report_samples = 16  # Cards in the HTML report.
  c.eval.masks = True  # Segment the final evaluation's answers and report J&F.
  # Each GRPO step also rolls out its prompts with the frozen warm start (step 0) and
  # the same sampling streams; `control/*` metrics and reward_curve.png then show the
  # policy's reward against the same prompts' draw. One extra rollout a step.
  c.eval.frozen_control = True

  c.log_every = 1
  # Prompts per step. With 4, which prompts were drawn moves the step's mean reward
  # more than 20 steps of GRPO do; 8 halves that noise (README, "Does GRPO learn?").
  c.batch_size = 8

  variants = [v.strip() for v in (arg or "").split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(
      f"Unknown config variant(s) {unknown} in {arg!r}; known: {', '.join(VARIANTS)} "
      "(combine them with commas, e.g. 'paper,dapo')."
    )
  for name in variants:
    VARIANTS[name](c)
  return c


def _paper(c: ml_collections.ConfigDict) -> None:
  """The paper recipe: Qwen3-VL-4B on OK-VOS, 16 prompts x 8 rollouts, lr 1e-6, 100 steps."""
  c.total_steps = 100
  c.model.preset = "qwen3_vl_4b"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.scan_layers = True
  c.data.source = "okvos"
  c.data.frame_size = 448
  c.data.keyframe_size = 864
  c.data.search_image_size = 256
  c.data.min_pixels = -1
  c.data.templates = "default"
  c.search.method = "dense"
  c.search.dense_prefixes = True  # e5-base-v2: --config.search.dense_model=/ckpt/e5-base-v2
  c.search.text_top_k = 2
  c.rollout.group_size = 8
  c.rollout.max_turns = 6
  c.rollout.max_prompt_length = 2048
  c.rollout.max_response_length = 8192
  c.rollout.max_action_length = 4096
  c.rollout.max_obs_length = 4096
  c.optim.lr = 1e-6
  c.optim.warmup_steps = 10
  c.loss.mini_batches = 2
  c.sft.steps = 0
  # The whole model trains, vision tower included (the embedded default freezes its
  # randomly initialised tower).
  c.sft.vision_lr_scale = 1.0
  c.optim.vision_lr_scale = 1.0
  c.reward.mask_weight = 0.0  # The official reward (docs/method.md §3.1).
  c.model.require_hf_dir = True
  # Evaluated as the paper reports it: SAM2.1 hiera-large J&F with web search,
  # validated on the held-out split every 10 steps (the official schedule).
  c.eval.segmenter = "sam2"
  c.eval.search = "serper"
  c.eval.every_steps = 10
  c.eval.frozen_control = False  # Would double the rollout time at 16 x 8.
  c.batch_size = 16
  c.mesh.data = 1
  c.mesh.fsdp = -1


def _8b(c: ml_collections.ConfigDict) -> None:
  """The official 8B recipe on top of `paper`: Qwen3-VL-8B, 160 steps, shorter
  responses and observations, the model split over 2 devices (tensor parallel)."""
  c.total_steps = 160
  c.model.preset = "qwen3_vl_8b"
  c.model.require_hf_dir = True
  c.rollout.max_response_length = 6144
  c.rollout.max_obs_length = 2048
  c.mesh.tensor = 2


def _dapo(c: ml_collections.ConfigDict) -> None:
  """DAPO as the official DAPO scripts set it: clip-higher 0.3, dynamic sampling (refill
  with groups whose rewards differ) and truncated responses masked out of the loss. The
  official trainer never reads the last two (docs/differences.md); here they act. DAPO's
  soft overlong penalty (`dapo.overlong_buffer`) is not in the scripts and stays off."""
  c.loss.clip_high = 0.3
  c.dapo.filter_groups = True
  c.dapo.overlong_mask = True


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """Shrinks the run to what a CPU test runs in seconds: the tiny policy, 2 prompts x 2
  rollouts of 2 turns, small frames, a 16 / 4 sample synthetic set, 2 warm-start and 2
  GRPO steps, 2 evaluation samples. Give it last (`:paper,runlocal`): it also shrinks a
  recipe's lengths and image sizes, and evaluates with the weight-free segmenter and the
  training search backend, so it runs without checkpoints or network."""
  c.total_steps = 2
  c.model.preset = "tiny"
  c.model.require_hf_dir = False
  c.data.frame_size = 64
  c.data.keyframe_size = 64
  c.data.search_image_size = 64
  c.data.min_pixels = 0
  c.data.synthetic_train = 16
  c.data.synthetic_test = 4
  c.batch_size = 2
  c.rollout.group_size = 2
  c.rollout.max_turns = 2
  c.rollout.max_prompt_length = 272
  c.rollout.max_response_length = 192
  c.rollout.max_action_length = 48
  c.rollout.max_obs_length = 160
  c.loss.mini_batches = 2
  c.sft.steps = 2
  c.sft.batch_size = 2
  c.checkpoint.every_steps = 1
  c.eval.num_samples = 2
  c.eval.segmenter = "weight_free"
  c.eval.search = ""


def _reasonseg(c: ml_collections.ConfigDict) -> None:
  """Evaluate on ReasonSeg's val split (LISA layout): --config.data.reasonseg_dir=DIR
  (`--config.data.eval_split=test` for test)."""
  c.data.benchmark = "reasonseg"
  c.data.eval_split = "val"


def _reasonvos(c: ml_collections.ConfigDict) -> None:
  """Evaluate on ReasonVOS (VideoLISA layout): --config.data.reasonvos_dir=DIR."""
  c.data.benchmark = "reasonvos"
  c.data.eval_split = "test"


def _revos(c: ml_collections.ConfigDict) -> None:
  """Evaluate on ReVOS's valid split (VISA layout): --config.data.revos_dir=DIR."""
  c.data.benchmark = "revos"
  c.data.eval_split = "valid"


# Variants applied in the order given: `configs/okvos.py:paper,dapo`, `:paper,8b`,
# `:runlocal`, `:paper,runlocal`.
VARIANTS = {
  "paper": _paper,
  "8b": _8b,
  "dapo": _dapo,
  "runlocal": _runlocal,
  "reasonseg": _reasonseg,
  "reasonvos": _reasonvos,
  "revos": _revos,
}
