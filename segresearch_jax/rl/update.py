"""The GRPO update step: one pure function, jitted with the train state donated.

    update_fn(state, batch, rng) -> (state, metrics)

`logprob_fn(params, micro_batch) -> (logp [n, L], entropy [n, L])` is injected by
the trainer, so this module does not know how images enter the batch. The batch (a
pytree of row-major arrays: `rows.TrainingRows` in training) is split into
micro-batches along its first axis; their loss sums, counts and gradients are
accumulated and divided once, which gives exactly the gradient of the mini-batch's
global mean. An update whose gradient norm is not finite is skipped:
params and optimizer state are returned unchanged and `skipped` is 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from segresearch_jax.rl import losses

Array = jax.Array
LogprobFn = Callable[[Any, Any], tuple[Array, Array]]


@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: Array  # optimizer updates applied so far


def learning_rate_schedule(
  lr: float, warmup_steps: int, updates_per_step: int = 1
) -> optax.Schedule:
  """Linear warmup over training steps, then constant.

  The schedule is called with the optimizer's update count; a training step applies
  `updates_per_step` updates, all at that step's rate, so training step s (from 1)
  runs at lr * min(1, s / warmup_steps). The first step's rate is lr / warmup_steps,
  not 0 as in the official schedule, which therefore reaches lr one step later
  (docs/differences.md).
  """
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda count: lr * jnp.minimum(1.0, (count // updates_per_step + 1) / warmup_steps)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping and a linear warmup (docs/method.md §6).

  Attributes:
    lr: the peak learning rate.
    warmup_steps: training steps of the linear warmup (see `learning_rate_schedule`).
    b1, b2, eps, weight_decay: AdamW's.
    grad_clip: the global gradient norm is clipped to this.
    updates_per_step: optimizer updates a training step applies (GRPO's mini-batches).
    vision_lr_scale: the vision tower's updates (weight decay included) are scaled by
      this: 1 trains it like the rest, 0 freezes it.
  """

  lr: float
  warmup_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float
  grad_clip: float
  updates_per_step: int
  vision_lr_scale: float

  @classmethod
  def from_config(cls, config: Any, *, sft: bool = False) -> OptimizerConfig:
    """The optimizer of a run config: `config.optim`, with `loss.mini_batches` updates a
    step for GRPO; the supervised warm start (`sft=True`) takes `sft.lr` and
    `sft.warmup_steps` instead and applies one update a step."""
    o = config.optim
    if sft:
      lr, warmup_steps, updates_per_step = config.sft.lr, config.sft.warmup_steps, 1
      vision_lr_scale = config.sft.vision_lr_scale
    else:
      lr, warmup_steps, updates_per_step = o.lr, o.warmup_steps, config.loss.mini_batches
      vision_lr_scale = o.vision_lr_scale
    return cls(
      lr=lr,
      warmup_steps=warmup_steps,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
      grad_clip=o.grad_clip,
      updates_per_step=updates_per_step,
      vision_lr_scale=vision_lr_scale,
    )

  def schedule(self) -> optax.Schedule:
    """The learning rate by optimizer update count."""
    return learning_rate_schedule(self.lr, self.warmup_steps, self.updates_per_step)


def is_vision_param(path: tuple[Any, ...]) -> bool:
  """Whether a parameter (its pytree key path) belongs to the vision tower and its mergers."""
  return any(getattr(k, "key", None) == "visual" for k in path)


def scale_vision_updates(scale: float) -> optax.GradientTransformation:
  """Multiplies the vision tower's updates by `scale` (0 freezes it); stateless."""

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
      lambda path, u: u * jnp.asarray(scale, u.dtype) if is_vision_param(path) else u, updates
    )
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; the warmup counts training steps of
  `cfg.updates_per_step` updates each (see `learning_rate_schedule`). With
  `cfg.vision_lr_scale != 1` the vision tower's updates are scaled after AdamW by a
  stateless step (AdamW's moments are unchanged; the chain's state gains an empty
  entry, so resume a run with the setting it was saved with)."""
  if cfg.vision_lr_scale < 0:
    raise ValueError(f"vision_lr_scale must be >= 0, got {cfg.vision_lr_scale}.")
  parts = [
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  ]
  if cfg.vision_lr_scale != 1.0:
    parts.append(scale_vision_updates(cfg.vision_lr_scale))
  return optax.chain(*parts)


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def make_update_fn(
  logprob_fn: LogprobFn,
  optimizer: optax.GradientTransformation,
  loss_config: losses.LossConfig,
  *,
  micro_batches: int = 1,
  schedule: optax.Schedule | None = None,
  loss_fn: Callable[..., Any] = losses.grpo_loss,
  freeze_vision: bool = False,
) -> Callable[[TrainState, Any, Array], tuple[TrainState, dict[str, Array]]]:
  """Builds the (unjitted) update function; jit it with `donate_argnums=0`.

  `loss_fn(logp, entropy, micro_batch, loss_config) -> (sum, count, metric sums)`:
  `losses.grpo_loss` (default) or `losses.sft_loss` for the warm start. With
  `freeze_vision` no gradient flows into the vision tower (`is_vision_param`): its
  backward pass is not computed, and its zero gradient leaves the global norm (and so
  the clipping of the rest) to the trained parameters.
  """

  def micro_loss(params, micro):
    if freeze_vision:
      params = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if is_vision_param(path) else x, params
      )
    logp, entropy = logprob_fn(params, micro)
    loss_sum, count, metrics = loss_fn(logp, entropy, micro, loss_config)
    return loss_sum, (count, metrics)

  def update_fn(state: TrainState, batch: Any, rng: Array):
    del rng  # The loss is deterministic; kept for a uniform step signature.
    n = jax.tree.leaves(batch)[0].shape[0]
    if n % micro_batches:
      raise ValueError(f"Batch of {n} does not split into {micro_batches} micro-batches.")
    # Strided micro-batches (rows i, i + m, i + 2m, ...): with rows sharded over
    # devices, each device keeps its share of every micro-batch (no resharding).
    split = jax.tree.map(
      lambda x: x.reshape(n // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch
    )

    # 1. Accumulate gradient sums, loss sums and counts over micro-batches.
    zeros = jax.tree.map(jnp.zeros_like, state.params)

    def accumulate(carry, micro):
      grads, total_loss, total_count, total_metrics = carry
      (loss_sum, (count, metrics)), g = jax.value_and_grad(micro_loss, has_aux=True)(
        state.params, micro
      )
      grads = jax.tree.map(jnp.add, grads, g)
      total_metrics = jax.tree.map(jnp.add, total_metrics, metrics)
      return (grads, total_loss + loss_sum, total_count + count, total_metrics), None

    metric_zeros = {k: jnp.zeros(()) for k in ("clip_fraction", "kl", "entropy", "ratio", "tokens")}
    init = (zeros, jnp.zeros(()), jnp.zeros(()), metric_zeros)
    (grads, loss_sum, count, sums), _ = jax.lax.scan(accumulate, init, split)
    # 2. Divide once: the exact mean over the whole mini-batch.
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.global_norm(grads)
    # 3. Apply, unless the gradient is not finite.
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      step=state.step + ok.astype(jnp.int32),
    )
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
      "loss": loss_sum / denom,
      "grad_norm": grad_norm,
      "param_norm": optax.global_norm(new_state.params),
      "update_norm": jnp.where(ok, optax.global_norm(updates), 0.0),
      "skipped": 1.0 - ok.astype(jnp.float32),
      "clip_fraction": sums["clip_fraction"] / tokens,
      "kl": sums["kl"] / tokens,
      "entropy": sums["entropy"] / tokens,
      "ratio": sums["ratio"] / tokens,
      "tokens": sums["tokens"],
    }
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new_state, metrics

  return update_fn
