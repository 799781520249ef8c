"""The HTML evaluation report (rendered in headless Chromium), overlays and training curves."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from segresearch_jax import protocol
from segresearch_jax.data import okvos, synthetic
from segresearch_jax.eval import predictions, reports

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def box_segmenter(frames, keyframe_index, box, point):
  """A weight-free segmenter: the box, filled, on every frame."""
  masks = np.zeros(frames.shape[:3], bool)
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  masks[:, max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1] = True
  return masks


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
  """A 4-sample synthetic evaluation with searches, a no-target and a missing sample."""
  root = tmp_path_factory.mktemp("report")
  paths = synthetic.build(root / "data", num_train=2, num_test=4, frames=(4, 5), size=(96, 72))
  samples = predictions.load_eval_samples(paths.okvos_dir, "test")
  numbers, gt = okvos.read_video_masks(samples[0].annotation_dir)
  k = int(np.argmax(gt.sum(axis=(1, 2))))
  h, w = gt.shape[1:]
  conv = okvos.convert_ground_truth({"f": okvos.mask_stats(gt[k])}, "norm1000", w, h)["f"]
  info = protocol.text_search_observation(
    [("Brass Cup", "Won by the <script>alert(1)</script> Otters.")]
  )
  first = (
    '<thinking>look up</thinking><search> {"name": "text_search", "query": "Who won the Brass Cup?"} </search>'
    + protocol.wrap_observation(info)
    + f"<thinking>there</thinking><keyframe> {numbers[k]} </keyframe>"
    + protocol.wrap_observation(protocol.KEYFRAME_OBSERVATION)
    + f'<answer>{{"bbox_2d": {conv["bbox_2d"]}, "point_2d": {conv["point_2d"]}}}</answer>'
  )
  preds = [
    predictions.parse_response(samples[0].id, samples[0].ability, first, stop_reason="finished"),
    predictions.parse_response(samples[1].id, samples[1].ability, "<keyframe> -1 </keyframe>"),
    predictions.parse_response(samples[3].id, samples[3].ability, "<answer>oops</answer>"),
  ]
  out = root / "eval"
  results = predictions.evaluate_predictions(
    preds, samples, box_segmenter, "norm1000", out, print_table=False
  )
  return out, results, preds, samples


def test_report_html_content(evaluation):
  out, results, preds, samples = evaluation
  page = (out / "report.html").read_text()
  assert page.count('class="card"') == len(samples)
  for s in samples:
    assert s.id in page
  assert "Who won the Brass Cup?" in page
  # Retrieved text is untrusted: it is escaped, never live markup.
  assert "<script>" not in page and "&lt;script&gt;" in page
  assert "no_target" in page and "missing" in page and "no_answer" in page
  assert "J&amp;F" in page
  # Image files next to the page, referenced relatively.
  files = sorted((out / reports.FILES_DIR).rglob("*.png"))
  assert files and all(f'src="{f.relative_to(out).as_posix()}"' in page for f in files)
  key = (out / results["per_sample"][0]["mask_dir"]).name
  assert (out / reports.FILES_DIR / key / "keyframe.png").is_file()


def test_report_embedded_and_limited(evaluation, tmp_path):
  out, results, preds, _ = evaluation
  # Results read back from disk are enough to rebuild the report.
  results = json.loads((out / "results.json").read_text())
  copy = tmp_path / "copy"
  shutil.copytree(out / "masks", copy / "masks")
  path = reports.write_html_report(
    results, copy, predictions=preds, max_samples=2, embed_images=True
  )
  page = path.read_text()
  assert page.count('class="card"') == 2 and "Showing 2 of 4 samples" in page
  assert "data:image/png;base64," in page and not (copy / reports.FILES_DIR).exists()
  assert "<details><summary>response</summary>" in page


def test_report_cli(evaluation):
  out, _, _, _ = evaluation
  (out / "report.html").unlink()
  reports.main(["--results", str(out / "results.json")])
  assert (out / "report.html").is_file()


def test_report_cli_shows_responses_from_predictions_file(evaluation, tmp_path):
  out, results, preds, _ = evaluation
  copy = tmp_path / "eval"
  shutil.copytree(out, copy)
  (copy / "report.html").unlink()
  path = predictions.write_predictions(tmp_path / predictions.PREDICTIONS_FILE, preds)
  reports.main(["--results", str(copy / "results.json"), "--predictions", str(path)])
  page = (copy / "report.html").read_text()
  assert page.count("<details><summary>response</summary>") == len(preds)
  assert "Who won the Brass Cup?" in page
  (tmp_path / "broken.jsonl").write_text('{"id": "a"}\n[1]\n')
  with pytest.raises(ValueError, match="broken.jsonl:2"):
    reports.main(
      ["--results", str(copy / "results.json"), "--predictions", str(tmp_path / "broken.jsonl")]
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Debian `chromium` is not installed")
def test_report_renders_in_headless_chromium(evaluation, tmp_path):
  out, _, _, _ = evaluation
  shot = tmp_path / "shot.png"
  cmd = [
    CHROMIUM,
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--user-data-dir={tmp_path / 'profile'}",
    f"--screenshot={shot}",
    "--window-size=1200,2000",
    (out / "report.html").as_uri(),
  ]
  subprocess.run(cmd, check=True, capture_output=True, timeout=120)
  assert shot.is_file()
  image = np.asarray(Image.open(shot).convert("RGB"))
  assert image.shape == (2000, 1200, 3)
  assert image.std() > 20  # Not a blank page.
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200  # Text and pictures, not flat.
  # The keyframe picture loaded: the predicted point's magenta is on screen.
  magenta = np.all(np.abs(image.astype(int) - reports.POINT_COLOUR) < 30, axis=-1)
  assert magenta.sum() > 20


def test_overlay_and_prompt_drawing(tmp_path):
  frame = np.full((20, 30, 3), 100, np.uint8)
  pred = np.zeros((20, 30), bool)
  pred[5:10, 5:10] = True
  gt = np.zeros((20, 30), bool)
  gt[12:16, 20:26] = True
  image = reports.overlay(frame, pred, gt)
  assert image.shape == frame.shape and image.dtype == np.uint8
  assert image[7, 7, 1] > 150 and image[7, 7, 0] < 100  # Green tint inside the prediction.
  assert tuple(image[12, 22]) == reports.GT_COLOUR  # GT boundary.
  assert tuple(image[0, 0]) == (100, 100, 100)  # Untouched elsewhere.
  drawn = reports.draw_prompt(frame, [2, 2, 12, 12], [20, 10])
  assert tuple(drawn[2, 7]) == reports.BOX_COLOUR
  assert tuple(drawn[10, 20]) == reports.POINT_COLOUR
  with pytest.raises(ValueError, match="uint8"):
    reports.overlay(frame.astype(float), pred)
  with pytest.raises(ValueError, match="shape"):
    reports.overlay(frame, pred[:5])
  path = reports.save_png(tmp_path / "a" / "overlay.png", image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


def test_plot_training_curves(tmp_path):
  rng = np.random.default_rng(0)
  lines = []
  for step in range(1, 41):
    row = {
      "step": step,
      "reward/score": 1.5 + step / 25 + rng.normal(0, 0.2),
      "reward/iou_score": min(1.0, step / 40),
      "loss": float(rng.normal(0, 0.1)),
      "note": "text is skipped",
      "phase": "train",
    }
    if step % 2:  # Lines may carry different fields.
      row["search/per_trajectory"] = 1.7 + step / 20
    lines.append(json.dumps(row))
    if step % 10 == 0:  # An eval phase: its own line in the same panels.
      lines.append(json.dumps({"step": step, "phase": "eval", "reward/score": 2.0 + step / 40}))
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text("\n".join(lines) + "\n")
  png = reports.plot_training_curves(jsonl, tmp_path / "curves" / "c.png")
  image = np.asarray(Image.open(png).convert("RGB"))
  assert image.shape[:2] == (560, 1260)  # 2 rows x 3 columns of 4.2 x 2.8 in at 100 dpi.
  assert image.std() > 10
  png = reports.plot_training_curves(jsonl, tmp_path / "one.png", keys=["loss"])
  assert Image.open(png).size == (420, 280)
  with pytest.raises(ValueError, match="No numeric values"):
    reports.plot_training_curves(jsonl, tmp_path / "x.png", keys=["reward/nothing"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"loss": 1.0}\n')
  with pytest.raises(ValueError, match="step"):
    reports.plot_training_curves(bad, tmp_path / "x.png")
