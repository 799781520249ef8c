r"""Prompts per second of the grain data pipeline, against a sequential baseline.

Builds (or reuses) the embedded synthetic OK-VOS, then measures in the same run:

- baseline: one Python loop, `okvos.iter_raw_examples` + `pipeline.Prepare`, no threads;
- grain: `pipeline.okvos_dataset` with `--num_threads` worker threads, batched.

Both do the same work per sample (read JPEG/PNG, official preprocessing, resize,
prompt rendering). The last column compares with what training consumes:
`batch_size / step_seconds` prompts/s; the goal is >= 4x that.

    python benchmarks/data_speed.py --frame_size=128 --step_seconds=1.0
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from segresearch_jax.data import okvos, pipeline, synthetic


def baseline_rate(okvos_dir: str, n: int, frame_size: int) -> float:
  prepare = pipeline.Prepare(frame_size=frame_size, num_frames=6, convention="norm1000")
  start = time.perf_counter()
  done = 0
  while done < n:
    for example in okvos.iter_raw_examples(okvos_dir, "train"):
      prepare(example)
      done += 1
      if done == n:
        break
  return n / (time.perf_counter() - start)


def grain_rate(okvos_dir: str, n: int, frame_size: int, batch_size: int, threads: int) -> float:
  ds, _ = pipeline.okvos_dataset(
    okvos_dir,
    "train",
    batch_size=batch_size,
    frame_size=frame_size,
    num_threads=threads,
    shard_index=0,
    shard_count=1,
  )
  it = iter(ds)
  next(it)  # Warm up the thread pool.
  start = time.perf_counter()
  done = 0
  while done < n:
    done += len(next(it)["id"])
  return done / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=str(pathlib.Path(tempfile.gettempdir()) / "syn_okvos"))
  parser.add_argument("--num_samples", type=int, default=96)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--num_threads", type=int, default=2)
  parser.add_argument("--frame_sizes", default="128,448")
  parser.add_argument("--step_seconds", type=float, default=1.0, help="Training step time.")
  args = parser.parse_args()

  start = time.perf_counter()
  paths = synthetic.build(args.data_dir, seed=0, num_train=64, num_test=32)
  print(f"synthetic set ready in {time.perf_counter() - start:.1f} s at {args.data_dir}")
  consumed = args.batch_size / args.step_seconds
  print(
    f"training consumes {consumed:.1f} prompts/s (batch {args.batch_size} / {args.step_seconds} s)"
  )
  header = f"{'frame':>6} {'baseline p/s':>13} {'grain p/s':>10} {'ratio':>6} {'x consumed':>11}"
  print(header)
  print("-" * len(header))
  for size in (int(s) for s in args.frame_sizes.split(",")):
    base = baseline_rate(paths.okvos_dir, args.num_samples, size)
    fast = grain_rate(paths.okvos_dir, args.num_samples, size, args.batch_size, args.num_threads)
    print(f"{size:>6} {base:>13.1f} {fast:>10.1f} {fast / base:>6.2f} {fast / consumed:>11.1f}")


if __name__ == "__main__":
  main()
