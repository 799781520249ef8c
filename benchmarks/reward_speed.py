r"""Reward throughput and mask-cache build cost.

    python benchmarks/reward_speed.py [--batch 256] [--sam2_prompts 8] [--no_sam2] \
        [--real_video ../shared/data/real_video/toy_horse]

1. The official OK-VOS reward (docs/method.md §3.1) with IGR through the packaged MiniLM.
   Baseline: the reference `score_response` called per response (pure Python, one
   embedding call per response, no memo). Ours: `score_batch`'s two halves, host
   parse + the jitted `jnp` terms, with the MiniLM wrapped in a `CachedEmbedder`
   (each distinct text embedded once per batch) cleared before every timed run
   ("cold": no help from earlier batches); also shown with the plain embedder and
   with a warm memo, and with the docs/method.md §3.2 mask term added (host prompt parse + the
   jitted cache gather). Results are checked equal before timing. The last rows
   make every query unique (no repeats within the batch to share), against the
   same per-response baseline (whose cost does not depend on repeats), and time
   MiniLM alone on those queries: the floor of any exact implementation, since
   each distinct query has to be embedded once.
2. Mask-cache build for G=32, K=16 (1,024 point + 14,400 box prompts a frame):
   seconds per frame of the weight-free segmenter's `prompt_ious` (region counts,
   no masks) vs the same IoUs from materialised masks (`predict` + `mask_ious`),
   on synthetic 192x144 frames and on real 640x360 frames; bytes per sample on disk.
   SAM2 (random-weight hiera-tiny, CPU): the image embedding and `--sam2_prompts`
   prompts are timed, and the per-frame cost is extrapolated to 15,424 prompts
   (the full grid takes hours on a CPU; on a GPU run `tools/build_mask_cache`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np

GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
FRAME_NUMBERS = [0, 4, 7, 10, 13, 18]
QUERIES = [
  "Glimmer Cup 2031 winner",
  "founder of the Velora Institute",
  "team emblem colour",
  "who coached the Zar team",
  "recipe for bread",
]
STEP_SETS = [
  ["Glimmer Cup 2031 winner"],
  ["founder of the Velora Institute", "team coached by Ilse Varn"],
  ["Orun Prize 2029 winner"],
]
REAL_VIDEO = pathlib.Path(__file__).resolve().parents[2] / "shared/data/real_video/toy_horse"


def make_batch(n: int, seed: int = 0, distinct: bool = False):
  """Responses and steps; `distinct` makes every query text unique (no repeats to share)."""
  rng = np.random.default_rng(seed)
  responses, steps = [], []
  for i in range(n):
    searches = "".join(
      f'<thinking> s </thinking> <search> {{"name": "text_search", "query": '
      f'"{rng.choice(QUERIES)}{f" {i}-{j}" if distinct else ""}"}}'
      " </search><information>1. (Title: T) text\n</information>\n\n"
      for j in range(rng.integers(0, 4))
    )
    box = sorted(rng.integers(0, 1000, 2).tolist()) + sorted(rng.integers(0, 1000, 2).tolist())
    box = [box[0], box[2], box[1], box[3]]
    ans = json.dumps({"bbox_2d": box, "point_2d": rng.integers(0, 1000, 2).tolist()})
    kf = rng.choice(["4", "10", "7"])
    responses.append(
      f"{searches}<thinking> k </thinking> <keyframe> {kf} </keyframe>"
      f"<thinking> a </thinking> <answer> {ans} </answer>"
    )
    steps.append(STEP_SETS[i % len(STEP_SETS)] if i % 4 else None)
  return responses, steps


def best_of(fn, repeats: int, setup=None) -> float:
  """Smallest wall time of `repeats` runs after one warm-up; `setup` runs untimed before each."""
  if setup:
    setup()
  fn()
  times = []
  for _ in range(repeats):
    if setup:
      setup()
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def reward_rows(batch: int, repeats: int) -> None:
  import jax

  from segresearch_jax import notebook
  from segresearch_jax.rewards import mask, okvos

  reward_cfg = okvos.RewardConfig.from_config(notebook.load_config().reward)
  plain = okvos.minilm_embedder(cache_size=0)
  cached = okvos.CachedEmbedder(plain)
  responses, steps = make_batch(batch)
  gts = [json.dumps(GT)] * batch
  frame_numbers = np.tile(FRAME_NUMBERS, (batch, 1))
  rng = np.random.default_rng(0)
  g, k = 32, 16
  p = k * (k - 1) // 2
  point_iou = rng.integers(0, 256, (batch, len(FRAME_NUMBERS), g, g), dtype=np.uint8)
  box_iou = rng.integers(0, 256, (batch, len(FRAME_NUMBERS), p, p), dtype=np.uint8)

  ours = okvos.score_batch(responses, gts, steps, embed_fn=cached, step_cache={}, config=reward_cfg)
  ref = [
    okvos.score_response(r, GT, s, embed_fn=plain, config=reward_cfg)
    for r, s in zip(responses, steps)
  ]
  np.testing.assert_allclose(ours["score"], [r["score"] for r in ref], atol=1e-5)

  terms_fn = jax.jit(lambda parsed: okvos.reward_terms(parsed, reward_cfg))
  mask_fn = jax.jit(mask.mask_score)

  def batched(embed, step_cache, texts, with_mask=False):
    def run():
      parsed = okvos.parse_responses(
        texts, gts, steps, embed_fn=embed, step_cache=step_cache, config=reward_cfg
      )
      out = terms_fn(parsed)
      if with_mask:
        prompts = mask.parse_mask_prompts(texts, gts, frame_numbers, "norm1000")
        score = mask_fn(point_iou, box_iou, **prompts)
        out = mask.add_mask_term(out, score, 0.5)
      jax.block_until_ready(out)

    return run

  def one_by_one():
    for r, s in zip(responses, steps):
      okvos.score_response(r, GT, s, embed_fn=plain, config=reward_cfg)

  t_ref = best_of(one_by_one, repeats)
  step_cache: dict = {}
  rows = [
    ("per response (score_response)", t_ref, ""),
    ("batched, plain MiniLM", best_of(batched(plain, step_cache, responses), repeats), ""),
    (
      "batched, CachedEmbedder cold",
      best_of(batched(cached, step_cache, responses), repeats, setup=cached.clear),
      ">=20x",
    ),
    ("batched, CachedEmbedder warm", best_of(batched(cached, step_cache, responses), repeats), ""),
    (
      "batched + mask term (G=32, K=16), cold",
      best_of(batched(cached, step_cache, responses, True), repeats, setup=cached.clear),
      ">=20x",
    ),
  ]
  # The same work with no repeated query: only the batching helps, not the memo.
  unique, unique_steps = make_batch(batch, distinct=True)
  assert unique_steps == steps  # Same samples, only the query texts differ.
  rows.append(
    (
      "batched, CachedEmbedder cold, all distinct",
      best_of(batched(cached, step_cache, unique), repeats, setup=cached.clear),
      "",
    )
  )
  # The floor of any exact implementation on that batch: MiniLM has to embed each
  # distinct query once (the steps are shared by every sample and cached); fp32
  # MiniLM runs at the CPU's matmul speed, so the batched row can only approach this.
  queries = [okvos._TEXT_QUERY.search(r) for r in unique]
  queries = [q.group(1) for q, s in zip(queries, steps) if q and s]
  rows.append(
    (
      f"  floor: MiniLM alone on its {len(queries)} queries",
      best_of(lambda: plain(queries), repeats),
      "",
    )
  )
  distinct = len({q for r in responses for q in QUERIES if q in r})
  print(
    f"\nOK-VOS reward, {batch} responses ({sum(1 for s in steps if s)} with reference steps, "
    f"<= {distinct} distinct queries), IGR with the packaged MiniLM, CPU"
  )
  print(f"{'implementation':<44}{'responses/s':>14}{'ratio':>9}{'goal':>8}")
  for name, seconds, goal in rows:
    print(f"{name:<44}{batch / seconds:>14.1f}{t_ref / seconds:>8.2f}x{goal:>8}")


def synthetic_frames(n: int) -> tuple[np.ndarray, np.ndarray]:
  from segresearch_jax.data import okvos, synthetic

  paths = synthetic.build(
    pathlib.Path(tempfile.gettempdir()) / "reward_speed_syn", num_train=4, num_test=1
  )
  frames, masks = [], []
  for example in okvos.iter_raw_examples(paths.okvos_dir, "train", num_frames=6):
    for f, m in zip(example["frames"], example["masks"]):
      if m.any():
        frames.append(f)
        masks.append(m)
  return np.stack(frames[:n]), np.stack(masks[:n])


def real_frames(n: int, video_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray] | None:
  """A few real frames with an elliptic stand-in GT mask (the video has no masks)."""
  from segresearch_jax.data import okvos

  paths = sorted(video_dir.glob("*.jpg"))
  if not paths:
    return None
  frames = np.stack([okvos.read_frame(p) for p in paths[:: max(1, len(paths) // n)][:n]])
  h, w = frames.shape[1:3]
  yy, xx = np.mgrid[:h, :w]
  gt = ((xx - 0.6 * w) / (0.15 * w)) ** 2 + ((yy - 0.55 * h) / (0.35 * h)) ** 2 <= 1
  return frames, np.broadcast_to(gt, frames.shape[:3])


def cache_rows(num_frames: int, sam2: bool, sam2_prompts: int, video_dir: pathlib.Path) -> None:
  from segresearch_jax.data import mask_tables
  from segresearch_jax.segmentation import mask_cache, segmenters

  g, k = 32, 16
  num_points, num_boxes = g * g, mask_tables.num_pairs(k) ** 2
  seg = segmenters.WeightFreeSegmenter()

  def materialised(frame, gt):
    h, w = frame.shape[:2]
    seg.set_image(frame)
    pts = mask_tables.point_grid(g) * [w, h]
    boxes = mask_tables.box_grid(k) * [w, h, w, h]
    out = [segmenters.mask_ious(seg.predict(points=pts), gt)]
    for s in range(0, len(boxes), 1024):  # Bounded memory: 1,024 masks at a time.
      out.append(segmenters.mask_ious(seg.predict(boxes=boxes[s : s + 1024]), gt))
    return np.concatenate(out)

  print(f"\nmask cache, G={g}, K={k}: {num_points + num_boxes} prompts a frame")
  print(f"{'segmenter, frames':<52}{'s/frame':>10}{'ratio':>9}")
  sets = [("synthetic 192x144", synthetic_frames(num_frames))]
  real = real_frames(num_frames, video_dir)
  if real is not None:
    sets.append((f"real {real[0].shape[2]}x{real[0].shape[1]}", real))
  for label, (frames, masks) in sets:
    start = time.perf_counter()
    tables = [mask_cache.frame_tables(seg, f, m, g, k) for f, m in zip(frames, masks)]
    ours = (time.perf_counter() - start) / len(frames)
    n_base = min(2, len(frames))  # The materialised baseline is slow; two frames suffice.
    start = time.perf_counter()
    base = [materialised(f, m) for f, m in zip(frames[:n_base], masks[:n_base])]
    baseline = (time.perf_counter() - start) / n_base
    for (pt, bt), iou in zip(tables, base):  # Same numbers, both ways.
      np.testing.assert_array_equal(np.r_[pt.ravel(), bt.ravel()], mask_tables.to_uint8(iou))
    print(f"{'weight-free, masks + IoU, ' + label:<52}{baseline:>10.3f}{1.0:>8.2f}x")
    print(f"{'weight-free, region counts, ' + label:<52}{ours:>10.3f}{baseline / ours:>8.2f}x")

  if sam2:
    sam = segmenters.Sam2ImageSegmenter(
      "configs/sam2.1/sam2.1_hiera_t.yaml", None, "cpu", random_weights=True
    )
    frame, gt = sets[-1][1][0][0], sets[-1][1][1][0]
    h, w = frame.shape[:2]
    start = time.perf_counter()
    sam.set_image(frame)
    embed_s = time.perf_counter() - start
    pts = mask_tables.point_grid(g)[:sam2_prompts] * [w, h]
    start = time.perf_counter()
    sam.prompt_ious(gt, points=pts)
    per_prompt = (time.perf_counter() - start) / len(pts)
    total = embed_s + per_prompt * (num_points + num_boxes)
    print(
      f"{'SAM2 hiera-t random, CPU, ' + sets[-1][0]:<52}{total:>10.1f}"
      f"   (extrapolated: embedding {embed_s:.1f} s + {per_prompt:.2f} s x "
      f"{num_points + num_boxes} prompts, from {len(pts)} timed)"
    )

  with tempfile.TemporaryDirectory() as tmp:
    p = mask_tables.num_pairs(k)
    path = pathlib.Path(tmp) / "x.npz"
    mask_tables.write_entry(
      path,
      sample_id="x",
      frame_numbers=np.arange(6),
      point_iou=np.zeros((6, g, g), np.uint8),
      box_iou=np.zeros((6, p, p), np.uint8),
      segmenter_name="weight_free",
    )
    print(
      f"bytes per sample (6 frames): {mask_tables.bytes_per_sample(6, g, k):,} in the tables, "
      f"{path.stat().st_size:,} on disk (.npz)"
    )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache_frames", type=int, default=6)
  parser.add_argument("--sam2_prompts", type=int, default=8)
  parser.add_argument("--no_sam2", action="store_true")
  parser.add_argument("--real_video", default=str(REAL_VIDEO), help="A folder of JPEG frames.")
  args = parser.parse_args()
  import torch  # noqa: F401  (torch before TensorFlow, which some imports may pull in)

  reward_rows(args.batch, args.repeats)
  cache_rows(args.cache_frames, not args.no_sam2, args.sam2_prompts, pathlib.Path(args.real_video))


if __name__ == "__main__":
  main()
