"""GRPO advantages and the DAPO sample filters (docs/method.md §6), on the host or in jit.

Rewards come one per trajectory, in groups of `group_size` consecutive rows that
share a prompt. The advantage is the group-normalised reward, broadcast over the
trajectory's generated tokens by the loss.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def group_advantages(rewards, group_size: int, eps: float = 1e-6):
  """(R - mean_group) / (std_group + eps) with the unbiased std; a group of 1 gives R.

  Args:
    rewards: [N] with N a multiple of group_size (numpy or jnp).
    group_size: rollouts per prompt.
    eps: added to the std.

  Returns:
    [N] advantages, same array type as `rewards`.
  """
  xp = jnp if not isinstance(rewards, np.ndarray) else np
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}.")
  if group_size == 1:
    return rewards
  r = rewards.reshape(-1, group_size)  # [P, n]
  mean = r.mean(axis=1, keepdims=True)
  std = xp.sqrt(((r - mean) ** 2).sum(axis=1, keepdims=True) / (group_size - 1))
  return ((r - mean) / (std + eps)).reshape(-1)


def zero_variance_groups(rewards, group_size: int):
  """bool [P]: groups whose rewards are all equal (no learning signal; DAPO drops them).

  Args:
    rewards: [N] with N a multiple of group_size (numpy or jnp, also inside jit).
    group_size: rollouts per prompt.

  Returns:
    [P] bool, same array type as `rewards`.
  """
  xp = jnp if not isinstance(rewards, np.ndarray) else np
  r = rewards.reshape(-1, group_size)  # [P, n]
  return xp.all(r == r[:, :1], axis=1)


def overlong_penalty(lengths, max_length: int, buffer: int, factor: float = 1.0):
  """DAPO's soft overlong punishment: 0 up to max_length - buffer, then a linear ramp
  to -factor at max_length (and below, clipped)."""
  xp = jnp if not isinstance(lengths, np.ndarray) else np
  start = max_length - buffer
  over = xp.clip((lengths - start) / max(buffer, 1), 0.0, 1.0)
  return -factor * over
