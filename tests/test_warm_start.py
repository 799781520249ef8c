"""The warm start's mini-batches: every expert row once an epoch, in batches of similar length."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from segresearch_jax import warm_start


def test_length_grouped_batches_cover_every_row_once_an_epoch():
  lengths = np.random.default_rng(0).integers(100, 385, size=103)
  batches = warm_start.length_grouped_batches(lengths, 8, np.random.default_rng(1), pool_batches=4)
  epoch = list(itertools.islice(batches, 103 // 8))
  assert all(b.shape == (8,) for b in epoch)
  seen = np.concatenate(epoch)
  assert len(np.unique(seen)) == len(seen) == 96  # 7 rows wait for the next shuffle
  # The next epoch is a new shuffle that again holds each row at most once.
  second = np.concatenate(list(itertools.islice(batches, 103 // 8)))
  assert len(np.unique(second)) == 96 and not np.array_equal(second, seen)


def test_length_grouped_batches_pad_less_than_random_ones():
  rng = np.random.default_rng(0)
  lengths = rng.integers(100, 385, size=1536)
  grouped = warm_start.length_grouped_batches(lengths, 8, np.random.default_rng(1))
  padded = lambda batches: np.mean([lengths[b].max() - lengths[b].min() for b in batches])
  random = [rng.choice(len(lengths), 8, replace=False) for _ in range(192)]
  assert padded(itertools.islice(grouped, 192)) < 0.3 * padded(random)


def test_length_grouped_batches_reject_a_batch_larger_than_the_rows():
  with pytest.raises(ValueError, match="batch_size"):
    next(warm_start.length_grouped_batches(np.ones(4, int), 8, np.random.default_rng(0)))
