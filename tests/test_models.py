"""The LRA classifier and dual encoder with each attention kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lra_benchmarks import models

TINY = dict(vocab_size=12, num_classes=3, max_len=16, num_layers=1, emb_dim=16, num_heads=2,
            qkv_dim=16, mlp_dim=32, classifier_dim=16, num_features=16)


def _inputs(batch=2, length=16, pad_from=10, seed=0):
  x = np.random.default_rng(seed).integers(1, 12, (batch, length)).astype(np.int32)
  x[:, pad_from:] = 0
  return jnp.asarray(x)


def _init(config, inputs, dual=False):
  model = models.build_model(config, dual=dual)
  variables = jax.jit(lambda key: models.init_variables(model, key, inputs))(
      jax.random.PRNGKey(0))
  return model, variables


@pytest.mark.parametrize("attention,pooling", [("softmax", "mean"), ("flash", "cls"),
                                               ("spectraformer", "mean")])
def test_classifier_shapes_and_collections(attention, pooling):
  config = models.ModelConfig(**TINY, attention=attention, pooling=pooling, component="posrf",
                              weight="qmc")
  x = _inputs()
  model, variables = _init(config, (x,))
  apply = jax.jit(lambda v, x, rng: models.apply(model, v["params"], v.get("random_features"),
                                                  (x,), train=True, rng=rng))
  logits = apply(variables, x, jax.random.PRNGKey(1))
  assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())
  if attention == "spectraformer":
    assert jax.tree.leaves(variables["random_features"])  # fixed W drawn at init, not a param
  assert models.param_count(variables["params"]) > 0


@pytest.mark.parametrize("attention", ["softmax", "spectraformer"])
def test_padding_does_not_change_logits(attention):
  """Mean pooling and attention ignore padding: extra trailing padding leaves logits as they are."""
  config = models.ModelConfig(**TINY, attention=attention, dropout_rate=0.0,
                              attention_dropout_rate=0.0)
  x = _inputs(length=16, pad_from=10)
  model, variables = _init(config, (x,))
  short = models.apply(model, variables["params"], variables.get("random_features"),
                       (x[:, :12],), train=False)
  full = models.apply(model, variables["params"], variables.get("random_features"), (x,),
                      train=False)
  np.testing.assert_allclose(short, full, rtol=1e-5, atol=1e-5)


def test_dual_encoder_shares_one_encoder():
  config = models.ModelConfig(**TINY)
  x1, x2 = _inputs(seed=0), _inputs(seed=1)
  model, variables = _init(config, (x1, x2), dual=True)
  assert set(variables["params"]) == {"encoder", "head"}
  assert variables["params"]["head"]["hidden"]["kernel"].shape[0] == 4 * TINY["emb_dim"]
  logits = models.apply(model, variables["params"], None, (x1, x2), train=False)
  swapped = models.apply(model, variables["params"], None, (x2, x1), train=False)
  assert logits.shape == (2, 3)
  assert not np.allclose(logits, swapped)  # [u, v, u*v, u-v] is order-aware


@pytest.mark.parametrize("field,value,match", [
    ("attention", "linear", "config.model.attention"),
    ("pooling", "max", "config.model.pooling"),
    ("qkv_dim", 15, "num_heads"),
    ("num_features", 0, "config.model.num_features"),
    ("dropout_rate", 1.5, "config.model.dropout_rate"),
])
def test_bad_model_config_is_a_clear_error(field, value, match):
  config = models.ModelConfig(**{**TINY, field: value})
  with pytest.raises(ValueError, match=match):
    config.validate()


def test_unknown_combination_is_a_clear_error():
  config = models.ModelConfig(**TINY, attention="spectraformer", component="posrf",
                              weight="nope")
  with pytest.raises(ValueError, match="nope"):
    config.validate()
