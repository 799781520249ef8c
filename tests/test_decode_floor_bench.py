"""benchmarks/decode_floor.py: the yardsticks the decode benchmarks print."""

import dataclasses
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from segresearch_jax.models import config as config_lib
from segresearch_jax.models import policy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
  spec = importlib.util.spec_from_file_location(
    "decode_floor", ROOT / "benchmarks" / "decode_floor.py"
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


floor = _load()


@pytest.mark.parametrize("tied", [True, False])
def test_bytes_match_the_policy_and_its_cache_and_dots_run(tied):
  cfg = config_lib.get_preset(
    "tiny", image_token_id=100, vision_start_token_id=101, vision_end_token_id=102
  )
  cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
  params = policy.init_params(cfg, jax.random.PRNGKey(0))
  cache = policy.init_cache(cfg, 3, 40)
  assert floor.kv_bytes(cfg, 3, 40) == sum(x.nbytes for x in cache["k"] + cache["v"])
  language = {k: v for k, v in params.items() if k != "visual"}
  assert floor.text_bytes(params) == sum(x.nbytes for x in jax.tree.leaves(language))
  assert ("lm_head" in params) is not tied
  seconds = floor.dots_alone_s(params, cfg, 3, 40)
  assert np.isfinite(seconds) and seconds > 0
