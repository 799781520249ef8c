"""Reward throughput: the batched reward vs scoring one response at a time.

    python benchmarks/reward_speed.py [--batch 256]

Both sides compute the same official reward (SPEC 3.1) with the packaged MiniLM for
IGR. The baseline is the reference `score_response` called per response (pure
Python, one embedding call per response); ours is `score_batch` (host parse with one
embedding call per batch and cached step embeddings, then the jitted `jnp` terms).
Results are checked equal before timing.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from segresearch_jax.rewards import okvos

GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
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


def make_batch(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  responses, steps = [], []
  for i in range(n):
    searches = "".join(
      f'<thinking> s </thinking> <search> {{"name": "text_search", "query": "{rng.choice(QUERIES)}"}}'
      " </search><information>1. (Title: T) text\n</information>\n\n"
      for _ in range(rng.integers(0, 4))
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


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  embed = okvos.minilm_embedder()
  responses, steps = make_batch(args.batch)
  gts = [GT] * args.batch

  # Same numbers first.
  cache: dict = {}
  ours = okvos.score_batch(responses, gts, steps, embed_fn=embed, step_cache=cache)
  ref = [okvos.score_response(r, GT, s, embed_fn=embed) for r, s in zip(responses, steps)]
  np.testing.assert_allclose(ours["score"], [r["score"] for r in ref], atol=1e-5)

  terms = jax.jit(okvos.reward_terms)

  def batched():
    parsed = okvos.parse_responses(responses, gts, steps, embed_fn=embed, step_cache=cache)
    jax.block_until_ready(terms(parsed))

  def one_by_one():
    for r, s in zip(responses, steps):
      okvos.score_response(r, GT, s, embed_fn=embed)

  def best(fn):
    fn()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  t_ours, t_ref = best(batched), best(one_by_one)
  print(
    f"\nofficial OK-VOS reward, {args.batch} responses, IGR with the packaged MiniLM, "
    f"{sum(1 for s in steps if s)} with reference steps"
  )
  print(f"{'implementation':<44}{'responses/s':>14}{'ratio':>9}{'goal':>8}")
  print(f"{'per response (score_response)':<44}{args.batch / t_ref:>14.1f}{1.0:>8.2f}x{'':>8}")
  print(
    f"{'batched (parse + jitted jnp terms)':<44}{args.batch / t_ours:>14.1f}"
    f"{t_ref / t_ours:>8.2f}x{'>=20x':>8}"
  )


if __name__ == "__main__":
  main()
