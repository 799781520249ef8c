"""An embedded, synthetic OK-VOS: videos, masks, queries and a knowledge base.

No real dataset can be downloaded on a fresh machine, so the default config trains on
data made here, written in the SAME raw layout as OK-VOS (docs/method.md §4.1) so the real reader
(`okvos.py`) ingests it unchanged, plus a knowledge base in the official format
(`text_corpus.jsonl`, `image_corpus.jsonl`, `images/`).

The world: fictional teams, each with an emblem (a coloured shape) that appears as a
moving object in videos. Videos hold 4-5 objects of distinct colour+shape moving in
overlapping lanes, so they partly occlude one another; the target may enter late or
leave early. Queries come in the four abilities:

- in-video: "the blue triangle" (no search needed).
- one-hop: "the emblem of the team that won the 2031 Glimmer Cup"; one KB document
  (the cup) names the team AND describes its emblem.
- multi-hop: "the emblem of the team coached by the founder of the Velora Institute":
  the institute's document names a person, the person's document names the team
  and its emblem.
- relational: "the object just left of the emblem of <one-hop phrase>": the reference
  object needs search, the target is its left neighbour lane.

Every object in a video is some team's emblem, and the KB has documents for all of
them, so without search a guess is right about 1 in 4-5 times. Each search sample
stores its reference chain (queries and the document ids that answer them) in the
parquet column `reference_chain` (JSON) for a supervised warm start.

Train and test use disjoint entities and facts (names, cups, institutes): the test
knowledge cannot be memorised in training, the paper's premise. Output is a pure
function of the arguments and is cached under `out_dir` by a manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
from PIL import Image, ImageDraw

VERSION = 1
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 80, 220),
  "yellow": (235, 210, 40),
  "purple": (140, 60, 190),
  "orange": (245, 140, 30),
  "cyan": (40, 200, 210),
  "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
ABILITY_CYCLE = ("in-video", "one-hop", "multi-hop", "relational")
_SYLLABLES = (
  "zar nok vel ora mir ta quel bran dor fen lis kor ath ul vex imo sar pel tun gri "
  "hal obe ryn cas dru emi fal gor hin jas kel lum nar osk pry qua"
).split()
_NOUNS = (
  "Falcons Comets Otters Lynxes Herons Badgers Vipers Ravens Stags Wolves Pumas Hawks".split()
)
_CUPS = (
  "Glimmer Brass Ember Tidal Granite Willow Aurora Copper Frost Meadow Thunder Saffron".split()
)
_INSTITUTES = "Institute Academy Guild Society Observatory Conservatory Foundation Lyceum".split()


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where a built synthetic set lives: the raw OK-VOS folder and the KB folder."""

  okvos_dir: str
  kb_dir: str
  text_corpus: str
  image_corpus: str


@dataclasses.dataclass
class Team:
  name: str
  colour: str
  shape: str
  cup: str  # "the 2031 Glimmer Cup"
  founder_of: str  # "the Velora Institute"
  coach: str  # person name
  cup_doc: int = -1
  person_doc: int = -1
  institute_doc: int = -1
  team_doc: int = -1

  @property
  def emblem(self) -> str:
    return f"{self.colour} {self.shape}"


# ----------------------------------------------------------------------------
# The world (entities and knowledge base).
# ----------------------------------------------------------------------------


def _unique_words(rng: np.random.Generator, n: int, parts: int) -> list[str]:
  out, seen = [], set()
  while len(out) < n:
    word = "".join(rng.choice(_SYLLABLES, size=parts)).capitalize()
    if word not in seen:
      seen.add(word)
      out.append(word)
  return out


def make_teams(rng: np.random.Generator, counts: list[int], year0: int) -> list[list[Team]]:
  """Teams for each split: names, cups, coaches and institutes unique across ALL splits.

  Emblems (colour+shape) are unique within a split, so every object in a video is
  told apart by appearance; they may repeat across splits (appearance is not
  knowledge, the facts are).
  """
  emblems = [(c, s) for c in COLOURS for s in SHAPES]
  if max(counts) > len(emblems):
    raise ValueError(f"At most {len(emblems)} teams per split, asked for {max(counts)}.")
  total = sum(counts)
  words = _unique_words(rng, 4 * total, 2)
  out, i = [], 0
  for n in counts:
    emblem_order = rng.permutation(len(emblems))[:n]
    teams = []
    for j in range(n):
      colour, shape = emblems[emblem_order[j]]
      teams.append(
        Team(
          name=f"{words[4 * i]} {_NOUNS[i % len(_NOUNS)]}",
          colour=colour,
          shape=shape,
          cup=f"the {year0 + i // len(_CUPS)} {_CUPS[i % len(_CUPS)]} Cup",
          founder_of=f"the {words[4 * i + 1]} {_INSTITUTES[i % len(_INSTITUTES)]}",
          coach=f"{words[4 * i + 2]} {words[4 * i + 3]}",
        )
      )
      i += 1
    out.append(teams)
  return out


def _title(phrase: str) -> str:
  return phrase[4:] if phrase.startswith("the ") else phrase


def _sentence(text: str) -> str:
  return text[:1].upper() + text[1:]


def add_documents(teams: list[Team], corpus: list[dict]) -> None:
  """Appends each team's four documents (team, cup, person, institute) to `corpus`."""

  def add(title: str, body: str) -> int:
    corpus.append({"id": len(corpus), "contents": f"{title}\n{body}"})
    return len(corpus) - 1

  for t in teams:
    t.team_doc = add(
      t.name, f"The {t.name} play under a {t.emblem} emblem. They are coached by {t.coach}."
    )
    t.cup_doc = add(
      _title(t.cup),
      f"{_sentence(t.cup)} was won by the {t.name}, whose emblem is a {t.emblem}.",
    )
    t.person_doc = add(
      t.coach,
      f"{t.coach} founded {t.founder_of} and is the head coach of the {t.name}, "
      f"whose emblem is a {t.emblem}.",
    )
    t.institute_doc = add(
      _title(t.founder_of), f"{_sentence(t.founder_of)} was founded by {t.coach}."
    )


def render_emblem(colour: str, shape: str, size: int) -> Image.Image:
  """The object's appearance: a filled shape on a transparent square (RGBA)."""
  im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
  draw = ImageDraw.Draw(im)
  fill = COLOURS[colour] + (255,)
  s = size - 1
  if shape == "circle":
    draw.ellipse([0, 0, s, s], fill=fill)
  elif shape == "square":
    draw.rectangle([s * 0.1, s * 0.1, s * 0.9, s * 0.9], fill=fill)
  elif shape == "triangle":
    draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=fill)
  elif shape == "diamond":
    draw.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=fill)
  elif shape == "cross":
    draw.rectangle([s * 0.35, 0, s * 0.65, s], fill=fill)
    draw.rectangle([0, s * 0.35, s, s * 0.65], fill=fill)
  else:
    raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
  return im


# ----------------------------------------------------------------------------
# Videos.
# ----------------------------------------------------------------------------


def render_video(
  rng: np.random.Generator,
  teams: list[Team],
  num_frames: int,
  width: int,
  height: int,
  absent_target: int | None,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
  """Renders a video of the teams' emblems moving in left-to-right lanes.

  Lane i is centred at (i + 0.5) / n of the width; objects jitter horizontally by up
  to 0.3 of a lane and move vertically, so neighbours overlap and occlude one another
  (z-order is random per video). `absent_target`, when set, is an object index that
  is off-screen in a run of frames at the start or end.

  Returns:
    frames: uint8 [H, W, 3] per frame; masks[obj][frame]: bool [H, W] visible pixels.
  """
  n = len(teams)
  lane_w = width / n
  size = int(rng.integers(int(lane_w * 0.8), int(lane_w * 1.1) + 1))
  size = max(12, min(size, height // 2))
  sprites = [np.asarray(render_emblem(t.colour, t.shape, size))[..., 3] > 0 for t in teams]
  z_order = rng.permutation(n)
  phase = rng.uniform(0, 2 * np.pi, size=(n, 2))
  speed = rng.uniform(0.3, 0.8, size=(n, 2))
  visible = np.ones((n, num_frames), dtype=bool)
  if absent_target is not None:
    gap = int(rng.integers(1, max(2, num_frames // 3) + 1))
    if rng.random() < 0.5:
      visible[absent_target, :gap] = False
    else:
      visible[absent_target, num_frames - gap :] = False
  background = rng.integers(70, 110, size=3)
  noise_rng = np.random.default_rng(rng.integers(1 << 31))
  frames, masks = [], [[] for _ in range(n)]
  for f in range(num_frames):
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = background
    canvas = np.clip(canvas + noise_rng.integers(-8, 9, size=canvas.shape), 0, 255).astype(np.uint8)
    owner = np.full((height, width), -1, dtype=np.int32)
    for i in z_order:  # Back to front; later objects occlude earlier ones.
      if not visible[i, f]:
        continue
      cx = (i + 0.5) * lane_w + 0.3 * lane_w * np.sin(speed[i, 0] * f + phase[i, 0])
      cy = height / 2 + (height / 2 - size / 2) * 0.9 * np.sin(speed[i, 1] * f + phase[i, 1])
      x0, y0 = int(round(cx - size / 2)), int(round(cy - size / 2))
      ys, xs = np.nonzero(sprites[i])
      ys, xs = ys + y0, xs + x0
      keep = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
      owner[ys[keep], xs[keep]] = i
      canvas[ys[keep], xs[keep]] = COLOURS[teams[i].colour]
    frames.append(canvas)
    for i in range(n):
      masks[i].append(owner == i)
  return frames, masks


def _palette_png(mask: np.ndarray, path: pathlib.Path) -> None:
  """A palette PNG with the target at INDEX 255, drawn in a dark colour on purpose.

  The colour of index 255 is dark red, whose brightness is far from 255: a reader that
  converts to grayscale instead of reading the index finds an empty mask.
  """
  im = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="P")
  palette = [0, 0, 0] * 256
  palette[255 * 3 : 255 * 3 + 3] = [128, 0, 0]
  im.putpalette(palette)
  im.save(path)


# ----------------------------------------------------------------------------
# Queries.
# ----------------------------------------------------------------------------


def _question(expression: str) -> str:
  return f"Please find '{expression}' in the provided video."


def make_query(ability: str, teams: list[Team], target: int, rng: np.random.Generator) -> dict:
  """The expression, reference search steps and reference chain for one sample.

  For relational samples `target` must have a right neighbour (the reference object).
  """
  t = teams[target]
  if ability == "in-video":
    return {"expression": f"the {t.emblem}", "steps": [], "chain": []}
  if ability == "one-hop":
    q = f"Which team won {t.cup}?"
    return {
      "expression": f"the emblem of the team that won {t.cup}",
      "steps": [q],
      "chain": [{"tool": "text_search", "query": q, "doc_id": t.cup_doc, "answer": t.emblem}],
    }
  if ability == "multi-hop":
    q1 = f"Who founded {t.founder_of}?"
    q2 = f"Which team does {t.coach} coach?"
    return {
      "expression": f"the emblem of the team coached by the founder of {t.founder_of}",
      "steps": [q1, q2],
      "chain": [
        {"tool": "text_search", "query": q1, "doc_id": t.institute_doc, "answer": t.coach},
        {"tool": "text_search", "query": q2, "doc_id": t.person_doc, "answer": t.emblem},
      ],
    }
  if ability == "relational":
    ref = teams[target + 1]
    q = f"Which team won {ref.cup}?"
    return {
      "expression": f"the object just left of the emblem of the team that won {ref.cup}",
      "steps": [q],
      "chain": [{"tool": "text_search", "query": q, "doc_id": ref.cup_doc, "answer": ref.emblem}],
    }
  raise ValueError(f"Unknown ability {ability!r}.")


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------


def _write_split(
  rng: np.random.Generator,
  split: str,
  teams: list[Team],
  num_samples: int,
  okvos_dir: pathlib.Path,
  frame_range: tuple[int, int],
  size: tuple[int, int],
) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = []
  for s in range(num_samples):
    video = f"{split}_{s:04d}"
    ability = ABILITY_CYCLE[s % len(ABILITY_CYCLE)]
    n_obj = int(rng.integers(4, 6))
    chosen = [teams[i] for i in rng.choice(len(teams), size=n_obj, replace=False)]
    # Relational targets need a right neighbour; others may be any lane.
    target = int(rng.integers(0, n_obj - 1 if ability == "relational" else n_obj))
    num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
    absent = target if rng.random() < 0.3 else None
    for _ in range(10):  # Re-draw the rare video where the target is never visible.
      frames, masks = render_video(rng, chosen, num_frames, size[0], size[1], absent)
      if any(m.any() for m in masks[target]):
        break
    else:
      raise RuntimeError(f"Synthetic video {video}: target never visible after 10 draws.")
    # Frame numbers step by 5 (like sub-sampled DAVIS-style videos): numbers != indices.
    names = [f"{5 * f:05d}" for f in range(num_frames)]
    frame_dir = okvos_dir / split / "JPEGImages" / video
    frame_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names, frames):
      Image.fromarray(frame).save(frame_dir / f"{name}.jpg", quality=92)
    for oid in range(n_obj):
      mask_dir = okvos_dir / split / "Annotations" / video / str(oid)
      mask_dir.mkdir(parents=True, exist_ok=True)
      for name, mask in zip(names, masks[oid]):
        _palette_png(mask, mask_dir / f"{name}.png")
    query = make_query(ability, chosen, target, rng)
    rows.append(
      {
        "id": f"syn-{video}",
        "video": video,
        "oid": str(target),
        "ability": ability,
        "question": _question(query["expression"]),
        "images": names,
        "steps": query["steps"],
        "reference_chain": json.dumps(query["chain"]),
        "entities": json.dumps([t.name for t in chosen]),
      }
    )
  pq.write_table(pa.Table.from_pylist(rows), okvos_dir / f"{split}.parquet")


def build(
  out_dir: str | os.PathLike,
  seed: int = 0,
  num_train: int = 64,
  num_test: int = 32,
  *,
  teams_per_split: int = 24,
  frames: tuple[int, int] = (8, 14),
  size: tuple[int, int] = (192, 144),
  force: bool = False,
) -> Paths:
  """Builds (or reuses) the synthetic OK-VOS set and its knowledge base.

  Args:
    out_dir: the folder; gets `okvos/` (raw OK-VOS layout, splits train and test) and
      `kb/` (text_corpus.jsonl, image_corpus.jsonl, images/).
    seed: makes the output a pure function of the arguments.
    num_train, num_test: samples per split.
    teams_per_split: entities per split; train and test entities are disjoint.
    frames: (min, max) frames per video.
    size: (width, height) of the frames.
    force: rebuild even when a matching build is cached.

  Returns:
    The paths of the built set.
  """
  out = pathlib.Path(out_dir)
  paths = Paths(
    okvos_dir=str(out / "okvos"),
    kb_dir=str(out / "kb"),
    text_corpus=str(out / "kb" / "text_corpus.jsonl"),
    image_corpus=str(out / "kb" / "image_corpus.jsonl"),
  )
  params = {
    "version": VERSION,
    "seed": seed,
    "num_train": num_train,
    "num_test": num_test,
    "teams_per_split": teams_per_split,
    "frames": list(frames),
    "size": list(size),
  }
  manifest = out / "manifest.json"
  if not force and manifest.is_file():
    try:
      if json.loads(manifest.read_text())["params"] == params:
        return paths
    except (json.JSONDecodeError, KeyError):
      pass  # A broken manifest means a broken build: rebuild.
  for sub in ("okvos", "kb"):
    shutil.rmtree(out / sub, ignore_errors=True)
  manifest.unlink(missing_ok=True)

  rng = np.random.default_rng(seed)
  train_teams, test_teams = make_teams(rng, [teams_per_split, teams_per_split], year0=2031)
  split_teams = {"train": train_teams, "test": test_teams}
  all_teams = train_teams + test_teams
  corpus: list[dict] = []
  for teams in split_teams.values():
    add_documents(teams, corpus)
  # The KB holds both splits' facts (one KB, as officially); shuffled so document
  # ids carry no hint of the split.
  order = rng.permutation(len(corpus))
  new_id = {int(old): new for new, old in enumerate(order)}
  corpus = [{"id": new, "contents": corpus[int(old)]["contents"]} for new, old in enumerate(order)]
  for teams in split_teams.values():
    for t in teams:
      t.team_doc, t.cup_doc = new_id[t.team_doc], new_id[t.cup_doc]
      t.person_doc, t.institute_doc = new_id[t.person_doc], new_id[t.institute_doc]

  kb = pathlib.Path(paths.kb_dir)
  (kb / "images").mkdir(parents=True, exist_ok=True)
  with open(paths.text_corpus, "w", encoding="utf-8") as f:
    for doc in corpus:
      f.write(json.dumps(doc) + "\n")
  with open(paths.image_corpus, "w", encoding="utf-8") as f:
    for i, t in enumerate(all_teams):
      filename = f"{t.name}.png"
      render_emblem(t.colour, t.shape, 64).save(kb / "images" / filename)
      record = {"id": i, "name": t.name, "filename": filename, "image_path": f"images/{filename}"}
      f.write(json.dumps(record) + "\n")

  okvos_dir = pathlib.Path(paths.okvos_dir)
  okvos_dir.mkdir(parents=True, exist_ok=True)
  counts = {"train": num_train, "test": num_test}
  for split, teams in split_teams.items():
    split_rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    _write_split(split_rng, split, teams, counts[split], okvos_dir, frames, size)
  split_entities = {s: sorted(t.name for t in ts) for s, ts in split_teams.items()}
  manifest.write_text(json.dumps({"params": params, "entities": split_entities}, indent=1))
  return paths
