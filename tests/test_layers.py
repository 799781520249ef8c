"""`layers.SwiGLU`: the same parameters, forward and gradients as three `nn.Dense`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segresearch_jax.models import layers


class _DenseSwiGLU(nn.Module):
  """The textbook form: autodiff through three `nn.Dense` layers."""

  intermediate_size: int
  bias: bool

  @nn.compact
  def __call__(self, x):
    dense = lambda features, name: nn.Dense(features, use_bias=self.bias, name=name)
    gate = dense(self.intermediate_size, "gate_proj")(x)
    up = dense(self.intermediate_size, "up_proj")(x)
    return dense(x.shape[-1], "down_proj")(nn.silu(gate) * up)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_dense_layers_in_params_forward_and_gradients(bias):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
  ours, ref = layers.SwiGLU(24, bias=bias), _DenseSwiGLU(24, bias)
  params = ours.init(jax.random.PRNGKey(0), x)
  ref_params = ref.init(jax.random.PRNGKey(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same init too
  # Non-zero biases, so that their gradients and their effect are both checked.
  params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape), params)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-6)
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  loss = lambda module: jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * weights), (0, 1))
  got, want = jax.jit(loss(ours))(params, x), loss(ref)(params, x)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=str(path))


def test_swiglu_in_bfloat16_keeps_the_dtypes():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 16)), jnp.bfloat16)
  module = layers.SwiGLU(24, dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  assert module.apply(params, x).dtype == jnp.bfloat16
  grads, d_x = jax.grad(lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32)), (0, 1))(
    params, x
  )
  assert d_x.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # fp32 master params
