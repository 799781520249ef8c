r"""Parsing, reward and writers on degenerate model output: linear time, no exception.

    python benchmarks/parse_speed.py [--old_timeout 30] [--repeats 3]

Each call a response goes through after the rollout is timed on three degenerate
inputs and on a normal response of the same length:

- `8k_thinking`: 8,192 tokens of a model stuck repeating `<thinking>` (one token each
  with the embedded tokenizer, 81,920 characters);
- `200k_chars`: 200,000 characters of unclosed `<answer>` tags on one line and
  `{"name": "text_search", ` fragments with no query;
- `10k_tags`: 10,000 unclosed `<keyframe>` / `<search>` tags.

The normal response repeats a well-formed episode (thinking, search, information,
keyframe, answer) to the same length. Calls: `parse_action` (the bridge), evaluation's
`parse_response`, the reward (`score_response`, with reference steps so IGR and TPR
run, through a constant embedder), the trajectory record writer, the prediction
writer and the HTML report writer. "ratio" = degenerate time / normal time: about 1
for a linear-time call. Times are the best of `--repeats`, in milliseconds. The ratio of
`parse_action` is large only because the normal response's first tag lies in its first
100 characters, while the degenerate text is read to its end once (`str.find`), still
well under a millisecond.

"old s" runs the same work through the official regexes directly (what this codebase
ran before: `.*?` scans restarted at every opening tag), in a subprocess killed after
`--old_timeout` seconds; the writers had no regex (they crashed on lone surrogates
instead), so they have no "old" column.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import re
import tempfile
import time

import numpy as np

GT = {
  "4": {"bbox_2d": [100, 200, 300, 400], "point_2d": [200, 300], "area": 1.0, "max_conn_area": 0.8},
  "10": {"bbox_2d": [0, 0, 50, 50], "point_2d": [25, 25], "area": 0.5, "max_conn_area": 1.0},
}
STEPS = ["Glimmer Cup 2031 winner"]
SHOWN = [0, 4, 10, 13, 18, 23]

EPISODE = (
  '<thinking> look it up </thinking> <search> {"name": "text_search", "query": "Glimmer Cup'
  ' 2031 winner"} </search><|im_end|>\n<|im_start|>user\n<information>1. (Title: Glimmer Cup)'
  " The 2031 cup went to the Zar team.\n</information>\n\n<|im_end|>\n<|im_start|>assistant\n"
  "<thinking> frame 4 is clear </thinking> <keyframe> 4 </keyframe><|im_end|>\n<|im_start|>"
  "user\nHere is the high-res version of your selected frame: <image><|im_end|>\n"
  '<|im_start|>assistant\n<thinking> there </thinking> <answer> {"bbox_2d": [110, 205, 300,'
  ' 395], "point_2d": [205, 300]} </answer><|im_end|>\n'
)


def degenerate_inputs() -> dict[str, str]:
  half = 100_000
  answers = ("<answer> " * (half // 9 + 1))[:half]
  names = ('{"name": "text_search", ' * (half // 24 + 1))[:half]
  return {
    "8k_thinking": "<thinking>" * 8192,
    "200k_chars": answers + names,
    "10k_tags": "<keyframe>" * 5000 + "<search>" * 5000,
  }


def normal_like(text: str) -> str:
  """A well-formed response of the same length (whole episodes, then a cut one)."""
  return (EPISODE * (len(text) // len(EPISODE) + 1))[: len(text)]


def constant_embedder(texts):
  out = np.zeros((len(texts), 8), np.float32)
  out[:, 0] = 1.0
  return out


# ----------------------------------------------------------------------------
# Ours.
# ----------------------------------------------------------------------------


def our_calls(out_dir: pathlib.Path):
  from segresearch_jax import notebook, protocol
  from segresearch_jax.agent import records
  from segresearch_jax.eval import predictions, reports
  from segresearch_jax.rewards import okvos

  reward_cfg = okvos.RewardConfig.from_config(notebook.load_config().reward)

  def report(text):
    pred = predictions.parse_response("s", "one-hop", text)
    record = {
      "id": "s",
      "ability": "one-hop",
      "question": "q",
      "status": "failed",
      "error": "benchmark",
      "mask_dir": "masks/s",
      "frame_paths": [],
      "frame_numbers": [],
      "J": 0.0,
      "F": 0.0,
      "JF": 0.0,
    }
    results = {
      "summary": {"overall": {"J": 0.0, "F": 0.0, "JF": 0.0, "count": 1}},
      "per_sample": [record],
    }
    reports.write_html_report(results, out_dir, predictions=[pred])

  return {
    "parse_action": lambda t: protocol.parse_action(t, SHOWN),
    "eval parse": lambda t: predictions.parse_response("s", "one-hop", t),
    "reward": lambda t: okvos.score_response(
      t, GT, STEPS, embed_fn=constant_embedder, config=reward_cfg
    ),
    "record write": lambda t: records.write_step(out_dir, 0, [{"id": "s", "response": t}]),
    "prediction write": lambda t: predictions.write_predictions(
      out_dir / "p.jsonl", [predictions.parse_response("s", "one-hop", t)]
    ),
    "report write": report,
  }


# ----------------------------------------------------------------------------
# Old: the official regexes, run directly.
# ----------------------------------------------------------------------------

OLD = dict(
  action=re.compile(r"<(search|keyframe|answer)>(.*?)</\1>", re.DOTALL),
  answer_dotall=re.compile(r"<answer>(.*?)</answer>", re.DOTALL),
  search_calls=re.compile(r"<search>(.*?)</search>", re.DOTALL),
  eval_keyframe=re.compile(r"<keyframe>\s*(-?\d+)\s*</keyframe>"),
  format_keyframe=re.compile(
    r"<thinking>.*?</thinking>\s*<keyframe>\s*(\d+)\s*</keyframe>", re.DOTALL
  ),
  format_answer=re.compile(r"<thinking>.*?</thinking>\s*<answer>\s*(.*?)\s*</answer>", re.DOTALL),
  keyframe=re.compile(r"<keyframe>\s*(\d+)\s*</keyframe>"),
  answer=re.compile(r"<answer>(.*?)</answer>"),
  search_turn=re.compile(r"<thinking>.*?</thinking>\s*<search>.*?</search>", re.DOTALL),
  text_query=re.compile(r'\{"name":\s*"text_search".*?"query":\s*"(.*?)"\}', re.DOTALL),
)


def old_parse_action(text):
  return OLD["action"].search(text)


def old_eval_parse(text):
  OLD["answer_dotall"].search(text), OLD["eval_keyframe"].search(text)
  list(OLD["search_calls"].finditer(text))


def old_reward(text):
  OLD["format_keyframe"].search(text) and OLD["format_answer"].search(text)
  OLD["keyframe"].search(text), OLD["answer"].search(text)
  OLD["search_turn"].findall(text), OLD["text_query"].search(text)
  text.count("<search>")


OLD_CALLS = {"parse_action": old_parse_action, "eval parse": old_eval_parse, "reward": old_reward}


def _time_in_child(name, text, queue):
  start = time.perf_counter()
  OLD_CALLS[name](text)
  queue.put(time.perf_counter() - start)


def time_old(name: str, text: str, timeout: float) -> float | None:
  """Seconds of one old call, or None when it ran past `timeout`."""
  ctx = multiprocessing.get_context("fork")
  queue = ctx.Queue()
  proc = ctx.Process(target=_time_in_child, args=(name, text, queue))
  proc.start()
  proc.join(timeout)
  if proc.is_alive():
    proc.kill()
    proc.join()
    return None
  return queue.get()


def best_time(fn, text: str, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(text)
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--old_timeout", type=float, default=30.0)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  inputs = degenerate_inputs()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    calls = our_calls(pathlib.Path(tmp))
    for fn in calls.values():  # warm up imports and caches
      fn(EPISODE)
    for input_name, text in inputs.items():
      normal = normal_like(text)
      for call_name, fn in calls.items():
        ours = best_time(fn, text, args.repeats)
        base = best_time(fn, normal, args.repeats)
        old = None
        if call_name in OLD_CALLS:
          old = time_old(call_name, text, args.old_timeout)
          old = f"{old:9.3f}" if old is not None else f"> {args.old_timeout:.0f}"
        rows.append((input_name, len(text), call_name, ours, base, old or "—"))

  header = f"{'input':<12} {'chars':>7} {'call':<17} {'ours ms':>9} {'normal ms':>9} {'ratio':>6}"
  print(header + f" {'old s':>9}")
  for input_name, n, call_name, ours, base, old in rows:
    print(
      f"{input_name:<12} {n:>7} {call_name:<17} {1e3 * ours:9.3f} {1e3 * base:9.3f} "
      f"{ours / base:6.2f} {old:>9}"
    )
  print(json.dumps({"inputs": {k: len(v) for k, v in inputs.items()}}))


if __name__ == "__main__":
  main()
