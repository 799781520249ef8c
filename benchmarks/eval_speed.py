"""J&F throughput: `eval.metrics.j_and_f` vs a per-frame NumPy / OpenCV DAVIS implementation.

    python benchmarks/eval_speed.py [--frames 50] [--repeats 3]

The baseline is the DAVIS code as the official evaluation runs it: per frame, J from
boolean sums, and F from `seg2bmap` in NumPy, two `cv2.dilate` calls with a disk of
radius ceil(0.008 × diagonal) and the precision / recall counts. Ours crops every frame
to a window around both masks and matches boundary pixels by probing horizontal
dilations only at the (sparse) boundary pixels, vectorised over the video (see the
module docstring of `segresearch_jax.eval.metrics`). Both sides get the same masks;
the numbers are checked equal before timing. Videos are generated here: moving,
overlapping ellipses, with the prediction a shifted and roughened copy of the ground
truth and the target absent from some frames, at DAVIS (854×480), 720p and 1080p
sizes, plus a case where the object fills most of the frame (little to crop).

Both sides run on one core (`cv2.setNumThreads(1)`): the official evaluation runs one
worker process per core, so per-core throughput is what matters. Times are the best
of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from segresearch_jax.eval import metrics

# ----------------------------------------------------------------------------
# Baseline: the per-frame DAVIS definitions.
# ----------------------------------------------------------------------------


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  seg = seg.astype(bool)
  e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]
  s[:-1, :] = seg[1:, :]
  se[:-1, :-1] = seg[1:, 1:]
  b = seg ^ e | seg ^ s | seg ^ se
  b[-1, :] = seg[-1, :] ^ e[-1, :]
  b[:, -1] = seg[:, -1] ^ s[:, -1]
  b[-1, -1] = 0
  return b


def disk(radius: int) -> np.ndarray:
  r = np.arange(-radius, radius + 1)
  x, y = np.meshgrid(r, r)
  return (x**2 + y**2 <= radius**2).astype(np.uint8)


def baseline_j(gt: np.ndarray, pred: np.ndarray) -> float:
  union = np.sum(gt | pred)
  return 1.0 if union == 0 else np.sum(gt & pred) / union


def baseline_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
  kernel = disk(int(np.ceil(bound_th * np.linalg.norm(gt.shape))))
  fb, gb = seg2bmap(pred), seg2bmap(gt)
  fd = cv2.dilate(fb.astype(np.uint8), kernel)
  gd = cv2.dilate(gb.astype(np.uint8), kernel)
  n_fg, n_gt = fb.sum(), gb.sum()
  if n_fg == 0 and n_gt > 0:
    p, r = 1.0, 0.0
  elif n_fg > 0 and n_gt == 0:
    p, r = 0.0, 1.0
  elif n_fg == 0 and n_gt == 0:
    p, r = 1.0, 1.0
  else:
    p, r = (fb * gd).sum() / n_fg, (gb * fd).sum() / n_gt
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def baseline(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  j = np.array([baseline_j(g, p) for g, p in zip(gt, pred)])
  f = np.array([baseline_f(g, p) for g, p in zip(gt, pred)])
  return j, f


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def make_video(
  frames: int, height: int, width: int, scale: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """GT: two moving ellipses (one object); pred: shifted, roughened, sometimes empty."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  gt = np.zeros((frames, height, width), bool)
  pred = np.zeros_like(gt)
  absent = set(rng.choice(frames, size=max(1, frames // 10), replace=False).tolist())
  for t in range(frames):
    if t in absent:
      continue
    for part in range(2):
      cy = height * (0.5 + 0.25 * np.sin(t / 9 + part))
      cx = width * (0.5 + 0.25 * np.cos(t / 13 + 2 * part))
      ay, ax = scale * height * (0.5 - 0.15 * part), scale * width * (0.3 - 0.1 * part)
      gt[t] |= ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1
    dy, dx = rng.integers(-6, 7, size=2)
    shifted = np.roll(gt[t], (int(dy), int(dx)), axis=(0, 1))
    kernel = np.ones((5, 5), np.uint8)
    noise = rng.random((height, width)) < 0.3
    rough = cv2.morphologyEx((shifted & ~noise).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    pred[t] = rough.astype(bool) if t % 7 else shifted
  return gt, pred


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  cv2.setNumThreads(1)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--frames", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  cases = [
    ("DAVIS 854x480", 480, 854, 0.25),
    ("720p", 720, 1280, 0.25),
    ("1080p", 1080, 1920, 0.25),
    ("854x480, object fills frame", 480, 854, 0.9),
  ]
  header = f"{'case':<30} {'frames':>6} {'baseline fps':>13} {'ours fps':>10} {'ratio':>7} {'max |dJ|':>9} {'max |dF|':>9}"
  print(header)
  print("-" * len(header))
  for name, height, width, scale in cases:
    gt, pred = make_video(args.frames, height, width, scale)
    j_ref, f_ref = baseline(gt, pred)
    j, f = metrics.j_and_f(gt, pred)
    dj, df = float(np.abs(j - j_ref).max()), float(np.abs(f - f_ref).max())
    if dj > 1e-12 or df > 1e-12:
      raise AssertionError(f"{name}: results differ from the baseline (|dJ| {dj}, |dF| {df}).")
    t_ref = best_time(lambda: baseline(gt, pred), args.repeats)  # noqa: B023
    t_ours = best_time(lambda: metrics.j_and_f(gt, pred), args.repeats)  # noqa: B023
    print(
      f"{name:<30} {args.frames:6d} {args.frames / t_ref:13.1f} {args.frames / t_ours:10.1f} "
      f"{t_ref / t_ours:6.1f}x {dj:9.1e} {df:9.1e}"
    )


if __name__ == "__main__":
  main()
