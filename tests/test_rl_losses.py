"""GRPO math against hand-computed numbers, and the update step's accumulation and guards."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import LossRows, loss_config, optimizer_config

from configs import okvos as okvos_config
from segresearch_jax.rl import advantages, losses, update


def test_group_advantages_unbiased_std():
  r = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], np.float32)
  a = advantages.group_advantages(r, 3)
  np.testing.assert_allclose(a[:3], [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], rtol=1e-6)
  np.testing.assert_allclose(a[3:], 0.0)  # zero variance: no signal
  np.testing.assert_array_equal(advantages.group_advantages(r, 1), r)  # group of 1: A = R
  np.testing.assert_allclose(
    np.asarray(advantages.group_advantages(jnp.asarray(r), 3)), a, rtol=1e-6
  )
  with pytest.raises(ValueError, match="groups of 4"):
    advantages.group_advantages(r, 4)


def test_dapo_filters():
  r = np.array([1, 1, 1, 0, 1, 0], np.float32)
  np.testing.assert_array_equal(advantages.zero_variance_groups(r, 3), [True, False])
  in_jit = jax.jit(advantages.zero_variance_groups, static_argnums=1)(jnp.asarray(r), 3)
  np.testing.assert_array_equal(np.asarray(in_jit), [True, False])
  pen = advantages.overlong_penalty(np.array([10, 80, 90, 100, 120]), 100, 20, 1.0)
  np.testing.assert_allclose(pen, [0, 0, -0.5, -1.0, -1.0])


def _clip(ratio, adv, cfg):
  loss, clipped = losses.ppo_clip(
    jnp.log(jnp.asarray([ratio])), jnp.zeros(1), jnp.asarray([adv]), cfg
  )
  return float(loss[0]), bool(clipped[0])


def test_ppo_clip_branches():
  cfg = loss_config(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
  assert _clip(1.1, 1.0, cfg) == pytest.approx((-1.1, False))
  assert _clip(1.5, 1.0, cfg)[0] == pytest.approx(-1.28)  # clip-higher caps the gain
  assert _clip(0.5, 1.0, cfg) == pytest.approx((-0.5, False))  # no clip below for A > 0
  assert _clip(0.5, -1.0, cfg) == pytest.approx((0.8, True))  # clip low for A < 0
  assert _clip(2.0, -1.0, cfg) == pytest.approx((2.0, False))
  assert _clip(5.0, -1.0, cfg)[0] == pytest.approx(3.0)  # dual clip bounds it at -A * c
  assert _clip(5.0, -1.0, loss_config(dual_clip=0.0))[0] == pytest.approx(5.0)


def test_log_ratio_is_clamped():
  loss, _ = losses.ppo_clip(
    jnp.asarray([100.0]), jnp.asarray([0.0]), jnp.asarray([-1e-9]), loss_config(dual_clip=0.0)
  )
  assert np.isfinite(float(loss[0])) and float(loss[0]) == pytest.approx(
    1e-9 * math.exp(20), rel=1e-4
  )


def test_kl_estimators():
  logp, ref = jnp.asarray([-1.0]), jnp.asarray([-1.5])
  assert float(losses.kl_penalty(logp, ref, "k1")[0]) == pytest.approx(0.5)
  assert float(losses.kl_penalty(logp, ref, "low_var_kl")[0]) == pytest.approx(
    math.exp(-0.5) + 0.5 - 1
  )
  assert float(losses.kl_penalty(jnp.asarray([-30.0]), jnp.asarray([0.0]), "low_var_kl")[0]) == 10.0


def test_aggregations():
  v = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
  m = jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert [float(x) for x in losses.aggregate(v, m, "token-mean")] == [10.0, 4.0]
  assert [float(x) for x in losses.aggregate(v, m, "seq-mean-token-mean")] == [6.0, 2.0]
  assert [float(x) for x in losses.aggregate(v, m, "seq-mean-token-sum")] == [10.0, 2.0]
  with pytest.raises(ValueError, match="aggregation"):
    loss_config(aggregation="mean")


def _toy(n=8, length=5, seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.standard_normal((length, 3)), jnp.float32)}
  batch = LossRows(
    inputs=jnp.asarray(rng.standard_normal((n, length, 3)), jnp.float32),
    loss_mask=jnp.asarray(rng.random((n, length)) < 0.7),
    old_logprobs=jnp.asarray(-rng.random((n, length)), jnp.float32),
    advantages=jnp.asarray(rng.standard_normal(n), jnp.float32),
  )

  def logprob_fn(p, b):
    logits = jnp.sum(b.inputs * p["w"], axis=-1)  # [n, L]
    return jax.nn.log_sigmoid(logits), jnp.zeros_like(logits)

  return params, batch, logprob_fn


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_micro_batches_give_the_exact_global_mean(aggregation):
  params, batch, logprob_fn = _toy()
  cfg = loss_config(aggregation=aggregation)
  opt = optax.sgd(1.0)
  one = update.make_update_fn(logprob_fn, opt, cfg, micro_batches=1)
  four = update.make_update_fn(logprob_fn, opt, cfg, micro_batches=4)
  s1, m1 = jax.jit(one)(update.init_state(params, opt), batch, jax.random.PRNGKey(0))
  s4, m4 = jax.jit(four)(update.init_state(params, opt), batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(s1.params["w"]), np.asarray(s4.params["w"]), rtol=1e-5, atol=1e-7
  )

  # And it is the gradient of the plain global mean.
  def global_loss(p):
    logp, ent = logprob_fn(p, batch)
    s, c, _ = losses.grpo_loss(logp, ent, batch, cfg)
    return s / c

  g = jax.grad(global_loss)(params)
  np.testing.assert_allclose(
    np.asarray(params["w"] - g["w"]), np.asarray(s1.params["w"]), rtol=1e-5, atol=1e-7
  )


def test_non_finite_gradient_skips_the_update():
  params, batch, logprob_fn = _toy()
  batch = batch.replace(advantages=batch.advantages.at[0].set(jnp.nan))
  opt = update.make_optimizer(optimizer_config(lr=1e-2, warmup_steps=2, updates_per_step=1))
  state = update.init_state(params, opt)
  new, metrics = jax.jit(update.make_update_fn(logprob_fn, opt, loss_config()))(
    state, batch, jax.random.PRNGKey(0)
  )
  assert float(metrics["skipped"]) == 1.0 and int(new.step) == 0
  np.testing.assert_array_equal(np.asarray(new.params["w"]), np.asarray(params["w"]))


def test_warmup_starts_at_step_one():
  schedule = update.learning_rate_schedule(1e-6, 10)
  assert float(schedule(0)) == pytest.approx(1e-7)  # the first update is not at lr 0
  assert float(schedule(9)) == pytest.approx(1e-6) and float(schedule(50)) == pytest.approx(1e-6)


def test_vision_lr_scale_scales_only_the_vision_tower():
  params = {"visual": {"w": jnp.ones((3,))}, "layers_0": {"w": jnp.ones((3,))}}
  grads = {"visual": {"w": jnp.full((3,), 0.5)}, "layers_0": {"w": jnp.full((3,), 0.5)}}
  steps = {}
  for scale in (1.0, 0.5, 0.0):
    opt = update.make_optimizer(
      optimizer_config(lr=1e-2, warmup_steps=0, weight_decay=0.1, vision_lr_scale=scale)
    )
    delta, _ = opt.update(grads, opt.init(params), params)
    steps[scale] = jax.tree.map(np.asarray, delta)
  # The language model's step does not depend on the scale; the tower's is scaled
  # (weight decay included) and 0 leaves it where it is.
  for scale in (0.5, 0.0):
    np.testing.assert_array_equal(steps[scale]["layers_0"]["w"], steps[1.0]["layers_0"]["w"])
    np.testing.assert_allclose(steps[scale]["visual"]["w"], scale * steps[1.0]["visual"]["w"])
  assert np.all(steps[1.0]["visual"]["w"] != 0)
  with pytest.raises(ValueError, match="vision_lr_scale"):
    update.make_optimizer(optimizer_config(vision_lr_scale=-1.0))


def test_vision_lr_scale_comes_from_the_run_config_per_phase():
  config = okvos_config.get_config()
  config.sft.vision_lr_scale, config.optim.vision_lr_scale = 0.0, 0.25
  assert update.OptimizerConfig.from_config(config, sft=True).vision_lr_scale == 0.0
  assert update.OptimizerConfig.from_config(config).vision_lr_scale == 0.25
