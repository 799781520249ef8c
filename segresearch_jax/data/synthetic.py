"""An embedded, synthetic OK-VOS: videos, masks, queries and a knowledge base.

No real dataset can be downloaded on a fresh machine, so the default config trains on
data made here, written in the SAME raw layout as OK-VOS (docs/method.md §4.1) so the real reader
(`okvos.py`) ingests it unchanged, plus a knowledge base in the official format
(`text_corpus.jsonl`, `image_corpus.jsonl`, `images/`).

The world: fictional teams, each with an emblem (a coloured shape). A video shows
as many teams as its board has cells (2 x 2 by default), their emblems in distinct
colours, each in its own cell for the whole video. In every frame exactly one object
is drawn big (filling its cell) and the others small (half the size, a quarter of the
area), and which one is big changes from frame to frame: the target is big in exactly
one of the frames the reader shows, look-alikes in the others. So the target's
identity decides everything the reward's accuracy terms score: which frame is right
(the target's max_conn_area is 1 in its big frame and about 0.25 elsewhere),
and which cell the box and point must cover. The target is on screen in every frame,
so an empty mask scores ~0 J&F. Without that identity a policy picks the right frame
about one time in three (with the default 3 shown frames) and the right cell one time
in four. Boxes depend only on the cell and the size, so a policy that finds the object
can name its box exactly.

Queries come in the four abilities:

- in-video: "the blue triangle" (no search needed).
- one-hop: "the emblem of the team that won the 2031 Glimmer Cup"; one KB document
  (the cup) names the team AND describes its emblem. Or "the emblem of the Zarnok
  Falcons": one image_search returns the team's emblem picture, while the text route
  takes two hops (the team's document names its coach, the coach's document its
  emblem).
- multi-hop: "the emblem of the team coached by the founder of the Velora Institute":
  the institute's document names a person, the person's document names the team
  and its emblem.
- relational: "the object beside the emblem of <one-hop phrase>": the reference
  object needs search, the target is its neighbour in the same row of the board.

Each search sample stores its reference chain (tool, query, the id and title of the
text document or image that answers it, and the fact it reveals) in the parquet column
`reference_chain` (JSON), and every sample what its frames show in `reference_frames`
(JSON: each object's colour and cell, which object each frame draws big, and the
object the question names), for a supervised warm start whose reasoning reads the
frames (`episodes.expert_turns`).

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

VERSION = 4
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
# Query kinds in turn: the four abilities, one-hop both by text and by picture.
QUERY_CYCLE = ("in-video", "one-hop", "multi-hop", "relational", "one-hop-image")
# Linear size of the small objects of a frame, as a fraction of the big one's: their
# max_conn_area is about its square (0.25), the keyframe term of a look-alike's frame.
SMALL_SCALE = 0.5
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
  image_doc: int = -1  # id in the image corpus

  @property
  def emblem(self) -> str:
    return f"{self.colour} {self.shape}"


# ----------------------------------------------------------------------------
# The world (entities and knowledge base).
# ----------------------------------------------------------------------------


def _unique_words(rng: np.random.Generator, n: int, parts: int) -> list[str]:
  """n distinct words of `parts` random syllables each."""
  if n > len(_SYLLABLES) ** parts:
    raise ValueError(
      f"{n} distinct words of {parts} syllables asked for; there are only "
      f"{len(_SYLLABLES) ** parts} (fewer entities per split)."
    )
  out, seen = [], set()
  while len(out) < n:
    word = "".join(rng.choice(_SYLLABLES, size=parts)).capitalize()
    if word not in seen:
      seen.add(word)
      out.append(word)
  return out


def _emblem_order(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """n (colour, shape) emblems: rounds of all colours in a random order, each colour
  with its shapes in a random order, all 40 before any repeats."""
  shapes = {c: list(rng.permutation(SHAPES)) for c in COLOURS}
  out = []
  while len(out) < n:
    r = len(out) // len(COLOURS)
    out += [(str(c), str(shapes[c][r % len(SHAPES)])) for c in rng.permutation(list(COLOURS))]
  return out[:n]


def make_teams(rng: np.random.Generator, counts: list[int], year0: int) -> list[list[Team]]:
  """Teams for each split: names, cups, coaches and institutes unique across ALL splits.

  Emblems (colour+shape) are unique within a split up to the 40 there are, then
  repeat; each block of len(COLOURS) teams has every colour, so a split of 4 teams or
  more can fill a 2 x 2 board. A video only ever shows emblems of distinct colours,
  so its objects are always told apart by colour. Emblems repeat across splits
  (appearance is not knowledge, the facts are). Many teams make the facts too many to memorise: the
  policy has to read them from the retrieved documents.
  """
  total = sum(counts)
  if 4 * total > len(_SYLLABLES) ** 2:  # Four distinct two-syllable words a team.
    raise ValueError(
      f"{total} teams asked for ({counts} by split); the name syllables give at most "
      f"{len(_SYLLABLES) ** 2 // 4}."
    )
  words = _unique_words(rng, 4 * total, 2)
  # Cups: distinct (year, name) pairs drawn from twice as many as needed, so both
  # splits use every year and cup name (a policy learns to copy them) while no test
  # cup is a train cup.
  years = 2 * -(-total // len(_CUPS))
  cups = [(year0 + k // len(_CUPS), _CUPS[k % len(_CUPS)]) for k in range(years * len(_CUPS))]
  cups = [cups[k] for k in rng.permutation(len(cups))[:total]]
  out, i = [], 0
  for n in counts:
    emblem_order = _emblem_order(rng, n)
    teams = []
    for j in range(n):
      colour, shape = emblem_order[j]
      teams.append(
        Team(
          name=f"{words[4 * i]} {_NOUNS[i % len(_NOUNS)]}",
          colour=colour,
          shape=shape,
          cup=f"the {cups[i][0]} {cups[i][1]} Cup",
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
    t.team_doc = add(t.name, f"The {t.name} are a club coached by {t.coach}.")
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
    draw.rectangle([0, 0, s, s], fill=fill)
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


def cell_box(cell: int, width: int, height: int, grid: int) -> tuple[int, int, int]:
  """(x0, y0, size) of the square sprite drawn in `cell` (row-major on a grid x grid board)."""
  cw, ch = width // grid, height // grid
  size = max(6, int(min(cw, ch) * 0.8))
  row, col = divmod(cell, grid)
  return col * cw + (cw - size) // 2, row * ch + (ch - size) // 2, size


def cell_name(cell: int, grid: int) -> str:
  """A board cell in words: "top left" ... "bottom right" on 2 x 2 and 3 x 3 boards
  (the middle one of 3 x 3 is "centre"), "row 1 column 4" on larger ones."""
  row, col = divmod(cell, grid)
  if grid > 3:
    return f"row {row + 1} column {col + 1}"
  rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
  cols = ("left", "right") if grid == 2 else ("left", "middle", "right")
  return "centre" if rows[row] == cols[col] == "middle" else f"{rows[row]} {cols[col]}"


def reference_frames(
  teams: list[Team], big: np.ndarray, frame_numbers: list[int], grid: int, reference: int
) -> dict:
  """What a video's frames show, for reasoning that reads them: each object's colour and
  cell by object id (team i sits in cell i, so the list is also the cells' reading
  order), which object each frame draws big, by frame number, and the object the
  question names (the target, or a relational target's neighbour)."""
  return {
    "reference": int(reference),
    "objects": [{"colour": t.colour, "cell": cell_name(i, grid)} for i, t in enumerate(teams)],
    "big": {str(n): int(b) for n, b in zip(frame_numbers, big)},
  }


def big_schedule(
  rng: np.random.Generator, num_frames: int, num_objects: int, target: int, shown: int = 3
) -> np.ndarray:
  """Which object each frame draws big: int [num_frames].

  The target is big in exactly one frame, one of the `shown` frames the reader picks
  for evaluation (`okvos.sample_frame_indices` without an anchor); the other shown
  frames are dealt to the look-alikes in turn and every other frame gets a random
  look-alike. One big frame makes the keyframe unambiguous, and a tracker that starts
  there never has to follow the target from small to big.
  """
  from segresearch_jax.data import okvos  # The reader's own sampling rule.

  shown = okvos.sample_frame_indices(num_frames, shown)
  others = np.asarray([o for o in rng.permutation(num_objects) if o != target])
  big = rng.choice(others, size=num_frames)
  for k, f in enumerate(rng.permutation(shown)):
    big[f] = target if k == 0 else others[(k - 1) % len(others)]
  return big


def render_video(
  rng: np.random.Generator,
  teams: list[Team],
  big: np.ndarray,
  width: int,
  height: int,
  grid: int,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
  """Renders a video with team i's emblem in cell i, big in the frames where `big == i`.

  A big object fills its cell's sprite square (`cell_box`); a small one is
  SMALL_SCALE of that size, centred in the same square. Objects never overlap and
  never leave their cells, so each is fully visible in every frame and its box
  depends only on its cell and its size.

  Returns:
    frames: uint8 [H, W, 3] per frame; masks[obj][frame]: bool [H, W] visible pixels.
  """
  n = len(teams)
  size = cell_box(0, width, height, grid)[2]
  small = max(3, int(round(size * SMALL_SCALE)))
  inset = (size - small) // 2
  sprites = {
    (i, s): np.asarray(render_emblem(t.colour, t.shape, s))[..., 3] > 0
    for i, t in enumerate(teams)
    for s in (size, small)
  }
  background = rng.integers(70, 110, size=3)
  noise_rng = np.random.default_rng(rng.integers(1 << 31))
  frames, masks = [], [[] for _ in range(n)]
  for big_object in big:
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = background
    canvas = np.clip(canvas + noise_rng.integers(-8, 9, size=canvas.shape), 0, 255).astype(np.uint8)
    owner = np.full((height, width), -1, dtype=np.int32)
    for i in range(n):
      x0, y0, _ = cell_box(i, width, height, grid)
      s, offset = (size, 0) if i == big_object else (small, inset)
      ys, xs = np.nonzero(sprites[i, s])
      owner[ys + y0 + offset, xs + x0 + offset] = i
      canvas[ys + y0 + offset, xs + x0 + offset] = COLOURS[teams[i].colour]
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


def beside(index: int, grid: int = 2) -> int:
  """The object beside object `index` in its row of the board (object i sits in cell i):
  columns 0 and 1 are neighbours, 2 and 3, ...; an odd last column pairs with the one
  before it."""
  row, col = divmod(index, grid)
  other = col ^ 1 if col ^ 1 < grid else col - 1
  return row * grid + other


def _step(tool: str, query: str, doc_id: int, title: str, answer: str) -> dict:
  """One reference search: the query, the document (text id or image id) that answers
  it, that document's title (an image's name) and the fact it reveals."""
  return {"tool": tool, "query": query, "doc_id": doc_id, "title": title, "answer": answer}


def make_query(kind: str, teams: list[Team], target: int, grid: int = 2) -> dict:
  """The ability, expression, reference search steps and reference chain of one sample.

  `kind` is an ability, or "one-hop-image": a one-hop question naming the team, whose
  picture (image_search) identifies it at once while the text route takes two hops
  (the team's own document does not describe its emblem).
  """
  t = teams[target]
  if kind == "in-video":
    return {"ability": kind, "expression": f"the {t.emblem}", "steps": [], "chain": []}
  if kind == "one-hop":
    q = f"Which team won {t.cup}?"
    return {
      "ability": kind,
      "expression": f"the emblem of the team that won {t.cup}",
      "steps": [q],
      "chain": [_step("text_search", q, t.cup_doc, _title(t.cup), t.emblem)],
    }
  if kind == "one-hop-image":
    return {
      "ability": "one-hop",
      "expression": f"the emblem of the {t.name}",
      "steps": [t.name],
      "chain": [_step("image_search", t.name, t.image_doc, t.name, t.emblem)],
    }
  if kind == "multi-hop":
    q1 = f"Who founded {t.founder_of}?"
    q2 = f"Which team does {t.coach} coach?"
    return {
      "ability": kind,
      "expression": f"the emblem of the team coached by the founder of {t.founder_of}",
      "steps": [q1, q2],
      "chain": [
        _step("text_search", q1, t.institute_doc, _title(t.founder_of), t.coach),
        _step("text_search", q2, t.person_doc, t.coach, t.emblem),
      ],
    }
  if kind == "relational":
    ref = teams[beside(target, grid)]
    q = f"Which team won {ref.cup}?"
    return {
      "ability": kind,
      "expression": f"the object beside the emblem of the team that won {ref.cup}",
      "steps": [q],
      "chain": [_step("text_search", q, ref.cup_doc, _title(ref.cup), ref.emblem)],
    }
  raise ValueError(f"Unknown query kind {kind!r}; expected one of {QUERY_CYCLE}.")


# ----------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------


def _pick_teams(rng: np.random.Generator, teams: list[Team], n: int) -> list[Team]:
  """n teams of the split whose emblem colours differ (colour alone tells them apart)."""
  chosen, colours = [], set()
  for i in rng.permutation(len(teams)):
    if teams[i].colour not in colours:
      chosen.append(teams[i])
      colours.add(teams[i].colour)
    if len(chosen) == n:
      break
  return chosen


def _write_split(
  rng: np.random.Generator,
  split: str,
  teams: list[Team],
  num_samples: int,
  okvos_dir: pathlib.Path,
  frame_range: tuple[int, int],
  size: tuple[int, int],
  grid: int,
  shown: int,
) -> None:
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = []
  num_objects = grid * grid
  num_colours = len({t.colour for t in teams})
  if num_colours < num_objects:
    raise ValueError(
      f"The {split} split has {num_colours} emblem colours, fewer than the {num_objects} "
      f"cells of a {grid} x {grid} board; give it more teams or a smaller grid."
    )
  for s in range(num_samples):
    video = f"{split}_{s:04d}"
    kind = QUERY_CYCLE[s % len(QUERY_CYCLE)]
    num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
    chosen = _pick_teams(rng, teams, num_objects)  # In random order: team i in cell i.
    target = int(rng.integers(0, num_objects))
    big = big_schedule(rng, num_frames, num_objects, target, shown)
    frames, masks = render_video(rng, chosen, big, size[0], size[1], grid)
    # Frame numbers step by 5 (like sub-sampled DAVIS-style videos): numbers != indices.
    frame_numbers = [5 * f for f in range(num_frames)]
    names = [f"{n:05d}" for n in frame_numbers]
    frame_dir = okvos_dir / split / "JPEGImages" / video
    frame_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in zip(names, frames):
      Image.fromarray(frame).save(frame_dir / f"{name}.jpg", quality=92)
    for oid in range(len(chosen)):
      mask_dir = okvos_dir / split / "Annotations" / video / str(oid)
      mask_dir.mkdir(parents=True, exist_ok=True)
      for name, mask in zip(names, masks[oid]):
        _palette_png(mask, mask_dir / f"{name}.png")
    query = make_query(kind, chosen, target, grid)
    named = beside(target, grid) if query["ability"] == "relational" else target
    rows.append(
      {
        "id": f"syn-{video}",
        "video": video,
        "oid": str(target),
        "ability": query["ability"],
        "question": _question(query["expression"]),
        "images": names,
        "steps": query["steps"],
        "reference_chain": json.dumps(query["chain"]),
        "reference_frames": json.dumps(reference_frames(chosen, big, frame_numbers, grid, named)),
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
  teams_per_split: int | tuple[int, int] = (96, 24),
  frames: tuple[int, int] = (3, 3),
  size: tuple[int, int] = (64, 64),
  grid: int = 2,
  shown: int = 3,
  force: bool = False,
) -> Paths:
  """Builds (or reuses) the synthetic OK-VOS set and its knowledge base.

  Args:
    out_dir: the folder; gets `okvos/` (raw OK-VOS layout, splits train and test) and
      `kb/` (text_corpus.jsonl, image_corpus.jsonl, images/).
    seed: makes the output a pure function of the arguments.
    num_train, num_test: samples per split.
    teams_per_split: entities per split, one number or (train, test); train and
      test entities are disjoint.
    frames: (min, max) frames per video.
    size: (width, height) of the frames.
    grid: the board is grid x grid cells (grid >= 2), one object per cell. The
      default 2 x 2 on 64-pixel frames shown at 64 pixels puts each cell in 2 x 2
      16-pixel patches of the embedded policy, i.e. one merged vision token a cell.
    shown: how many frames the reader shows the policy (`config.data.num_frames`);
      the target is drawn big in exactly one of those frames.
    force: rebuild even when a matching build is cached.

  Returns:
    The paths of the built set.
  """
  if grid < 2:
    raise ValueError(f"grid must be >= 2 (a board with neighbours), got {grid}.")
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
    "teams_per_split": list(np.broadcast_to(teams_per_split, 2).tolist()),
    "frames": list(frames),
    "size": list(size),
    "grid": grid,
    "shown": shown,
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
  train_teams, test_teams = make_teams(rng, params["teams_per_split"], year0=2031)
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
      t.image_doc = i
      filename = f"{t.name}.png"
      render_emblem(t.colour, t.shape, 64).save(kb / "images" / filename)
      record = {"id": i, "name": t.name, "filename": filename, "image_path": f"images/{filename}"}
      f.write(json.dumps(record) + "\n")

  okvos_dir = pathlib.Path(paths.okvos_dir)
  okvos_dir.mkdir(parents=True, exist_ok=True)
  counts = {"train": num_train, "test": num_test}
  for split, teams in split_teams.items():
    split_rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    _write_split(split_rng, split, teams, counts[split], okvos_dir, frames, size, grid, shown)
  split_entities = {s: sorted(t.name for t in ts) for s, ts in split_teams.items()}
  manifest.write_text(json.dumps({"params": params, "entities": split_entities}, indent=1))
  return paths
