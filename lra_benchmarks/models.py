"""Models: an encoder classifier, the retrieval dual encoder and a causal decoder (per-token
tasks: MQAR, language modelling), attention chosen by config.

The architecture follows the Spectraformer / Skyformer LRA setup: token and learned positional
embeddings, pre-LayerNorm transformer blocks (attention, then a GELU MLP), a final LayerNorm,
mean (over real tokens) or CLS pooling and a ReLU MLP head. The retrieval model encodes both
documents with one shared encoder and classifies ``[u, v, u * v, u - v]``.

Attention is ``spectraformer_jax.layers.RFMultiHeadDotProductAttention`` for
``"softmax"`` (exact), ``"flash"`` (``jax.nn.dot_product_attention``) or ``"spectraformer"``
(random features ``phi(x) = f(W x)`` with ``component``, ``weight`` and ``num_features``). A
fixed W lives in the ``"random_features"`` collection, learnable W and component parameters
in ``"params"``.  The efficient-attention baselines (``spectraformer_jax.baselines.KINDS``:
``"nystrom"``, ``"skyformer"``, ``"linformer"``, ``"bigbird"``, ``"reformer"``,
``"informer"``, ``"kernelized"``) run through ``baselines.BaselineSelfAttention`` with their
hyperparameters from ``config.model`` (fields of ``baselines.HYPERPARAMETERS``; the layer's
defaults, the study's values, where a field is absent).

``Decoder`` (per-token tasks) runs the same pre-LN blocks with causal self-attention and
returns logits at every position; with ``decode=True`` it follows Flax's autoregressive-cache
convention (``init_cache``, then one token per call), the attention layers carrying only their
recurrent state (``spectraformer_jax.recurrent``) or, for softmax and flash, a key-value cache.
The baselines are bidirectional and refused for causal tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectraformer_jax import baselines
from spectraformer_jax import layers
from spectraformer_jax import pallas_attention
from spectraformer_jax import registry

ATTENTION_KINDS = layers.ATTENTION_CHOICES + tuple(baselines.KINDS)
_BASELINE_FIELDS = sorted({f for fields in baselines.HYPERPARAMETERS.values() for f in fields})
POOLINGS = ("mean", "cls")
REDRAWS = layers.REDRAW_CHOICES
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the LRA models (``config.model`` plus the task's sizes)."""
  vocab_size: int
  num_classes: int
  max_len: int
  num_layers: int = 2
  emb_dim: int = 64
  num_heads: int = 2
  qkv_dim: int = 64
  mlp_dim: int = 128
  classifier_dim: int = 128
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pooling: str = "mean"
  attention: str = "softmax"
  component: str = "posrf"
  weight: str = "iid"
  num_features: int = 128
  redraw: str = "never"
  fused: bool = True
  implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION  # fused path: auto | pallas | xla
  dtype: str = "float32"
  baseline: tuple = ()  # (field, value) pairs of the baseline's hyperparameters

  @classmethod
  def from_config(cls, model_config: Any, *, vocab_size: int, num_classes: int,
                  max_len: int) -> "ModelConfig":
    """Builds from a ``config.model`` ConfigDict (unknown fields like ``redraw_every`` ignored;
    the baselines' hyperparameter fields go to ``baseline``)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"baseline"}
    fields = dict(model_config)
    kwargs = {k: v for k, v in fields.items() if k in names}
    baseline = tuple((k, fields[k]) for k in _BASELINE_FIELDS if k in fields)
    return cls(vocab_size=vocab_size, num_classes=num_classes, max_len=max_len,
               baseline=baseline, **kwargs)

  def validate(self) -> None:
    """Raises ValueError naming the offending ``config.model`` field."""
    def bad(field, value, why):
      raise ValueError(f"config.model.{field}={value!r}: {why}")
    if self.attention not in ATTENTION_KINDS:
      bad("attention", self.attention, f"must be one of {ATTENTION_KINDS}")
    if self.pooling not in POOLINGS:
      bad("pooling", self.pooling, f"must be one of {POOLINGS}")
    if self.redraw not in REDRAWS:
      bad("redraw", self.redraw, f"must be one of {REDRAWS}")
    if self.dtype not in DTYPES:
      bad("dtype", self.dtype, f"must be one of {tuple(DTYPES)}")
    for field in ("num_layers", "emb_dim", "num_heads", "qkv_dim", "mlp_dim", "classifier_dim",
                  "num_features"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        bad(field, value, "must be a positive integer")
    if self.qkv_dim % self.num_heads:
      bad("qkv_dim", self.qkv_dim, f"must be divisible by num_heads={self.num_heads}")
    for field in ("dropout_rate", "attention_dropout_rate"):
      value = getattr(self, field)
      if not 0.0 <= value < 1.0:
        bad(field, value, "must be in [0, 1)")
    if self.attention == "spectraformer":
      registry.check_pair(self.component, self.weight)
    for field, value in self.baseline:
      if field not in _BASELINE_FIELDS:
        bad(field, value, f"is not a baseline hyperparameter ({_BASELINE_FIELDS})")
      if field == "ridge":
        if not isinstance(value, (int, float)) or value < 0:
          bad(field, value, "must be a non-negative number")
      elif not isinstance(value, int) or value <= 0:
        bad(field, value, "must be a positive integer")

  def validate_causal(self) -> None:
    """Raises ValueError unless the attention runs causally: softmax, flash, or random
    features with a component of ``registry.supports_causal``."""
    causal_components = [c for c in registry.component_names() if registry.supports_causal(c)]
    if self.attention in baselines.KINDS:
      raise ValueError(
          f"config.model.attention={self.attention!r}: the efficient-attention baselines are "
          "bidirectional and this task is causal; choose 'softmax', 'flash' or 'spectraformer' "
          f"with a causal component ({causal_components}).")
    if self.attention == "spectraformer" and not registry.supports_causal(self.component):
      raise ValueError(
          f"config.model.component={self.component!r} has no causal form (its features use "
          f"statistics of the whole sequence); causal components: {causal_components}.")


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    out_dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, dtype=self.dtype)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).  ``causal``:
  causal self-attention; ``decode``: the attention's autoregressive cache (one token a call)."""
  config: ModelConfig
  causal: bool = False
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, *, deterministic: bool):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    y = nn.LayerNorm(dtype=dtype)(x)
    attention_kwargs = {}
    if cfg.attention == "flash":
      # LRA pads at the end, so the key mask is a prefix: it goes to cuDNN as sequence lengths.
      attention_kwargs = dict(kv_mask_is_prefix=True)
    if cfg.attention == "spectraformer":
      attention_kwargs = dict(component=cfg.component, weight=cfg.weight,
                              num_features=cfg.num_features, redraw=cfg.redraw,
                              fused=cfg.fused, implementation=cfg.implementation)
    if cfg.attention in baselines.KINDS:  # self-attention: padded queries give zeros
      y = baselines.BaselineSelfAttention(
          kind=cfg.attention, num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim,
          out_features=cfg.emb_dim, dropout_rate=cfg.attention_dropout_rate, dtype=dtype,
          name="attention", **dict(cfg.baseline))(y, kv_mask=mask, deterministic=deterministic)
    else:
      y = layers.RFMultiHeadDotProductAttention(
          num_heads=cfg.num_heads, qkv_features=cfg.qkv_dim, out_features=cfg.emb_dim,
          dropout_rate=cfg.attention_dropout_rate, dtype=dtype, attention=cfg.attention,
          is_causal=self.causal, decode=self.decode, name="attention",
          **attention_kwargs)(y, kv_mask=mask, q_mask=mask, deterministic=deterministic)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    x = x + y
    y = nn.LayerNorm(dtype=dtype)(x)
    y = MlpBlock(cfg.mlp_dim, cfg.dropout_rate, dtype=dtype, name="mlp")(
        y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Embeds tokens, runs the blocks and pools to one vector per sequence."""
  config: ModelConfig
  padded: bool = True  # True: id 0 is padding (mask = inputs != 0); False: every token is real

  @nn.compact
  def __call__(self, inputs, *, deterministic: bool):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    batch, length = inputs.shape
    if length > cfg.max_len:
      raise ValueError(f"Input length {length} exceeds the model's max_len {cfg.max_len}.")
    max_len = cfg.max_len + (cfg.pooling == "cls")  # the CLS token takes one more position
    mask = inputs != 0 if self.padded else jnp.ones(inputs.shape, bool)
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=_EMBED_INIT, name="embed")(inputs)
    if cfg.pooling == "cls":
      cls = self.param("cls", _EMBED_INIT, (1, 1, cfg.emb_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.emb_dim)), x], axis=1)
      mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    pos = self.param("pos_embedding", _EMBED_INIT, (1, max_len, cfg.emb_dim))
    x = (x + pos[:, :x.shape[1]]).astype(dtype)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    for i in range(cfg.num_layers):
      x = EncoderBlock(cfg, name=f"block_{i}")(x, mask, deterministic=deterministic)
    x = nn.LayerNorm(dtype=dtype, name="final_norm")(x).astype(jnp.float32)
    if cfg.pooling == "cls":
      return x[:, 0]
    weights = mask.astype(jnp.float32)[..., None]
    return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


class ClassifierHead(nn.Module):
  """Dense -> ReLU -> Dense to logits (float32)."""
  hidden_dim: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(x))
    return nn.Dense(self.num_classes, name="logits")(x)


class Classifier(nn.Module):
  """Encoder classifier (ListOps, Text, Image, Pathfinder): ``inputs int[B, L] -> logits``."""
  config: ModelConfig
  padded: bool = True

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    pooled = Encoder(self.config, self.padded, name="encoder")(inputs, deterministic=not train)
    return ClassifierHead(self.config.classifier_dim, self.config.num_classes, name="head")(pooled)


class DualEncoderClassifier(nn.Module):
  """Retrieval: one shared encoder for both documents, head on ``[u, v, u * v, u - v]``."""
  config: ModelConfig
  padded: bool = True

  @nn.compact
  def __call__(self, inputs1, inputs2, *, train: bool = False):
    encoder = Encoder(self.config, self.padded, name="encoder")
    u = encoder(inputs1, deterministic=not train)
    v = encoder(inputs2, deterministic=not train)
    features = jnp.concatenate([u, v, u * v, u - v], axis=-1)
    return ClassifierHead(self.config.classifier_dim, self.config.num_classes, name="head")(
        features)


class Decoder(nn.Module):
  """Per-token model: ``inputs int[B, L] -> logits float32[B, L, num_classes]``.

  Token and learned position embeddings, ``num_layers`` pre-LN blocks of (``causal``)
  self-attention, a final LayerNorm and a linear read-out at every position.  Every position
  is a real token (no padding).  ``decode=True``: Flax's autoregressive-cache convention; the
  ``"cache"`` collection (``init_cache``) holds the next position and each attention layer's
  state, and every call takes one token per row, ``inputs int[B, 1]`` (at most ``max_len``
  tokens: positions past it reuse the last position embedding).
  """
  config: ModelConfig
  causal: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    cfg = self.config
    dtype = DTYPES[cfg.dtype]
    length = inputs.shape[-1]
    if length > cfg.max_len:
      raise ValueError(f"Input length {length} exceeds the model's max_len {cfg.max_len}.")
    x = nn.Embed(cfg.vocab_size, cfg.emb_dim, embedding_init=_EMBED_INIT, name="embed")(inputs)
    pos = self.param("pos_embedding", _EMBED_INIT, (1, cfg.max_len, cfg.emb_dim))
    decoding = self.decode and self.has_variable("cache", "index")
    if self.decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if decoding:
      if length != 1:
        raise ValueError(f"decode=True takes one token per call after init_cache, got inputs "
                         f"of shape {inputs.shape}.")
      x = x + jax.lax.dynamic_slice_in_dim(pos, index.value, 1, axis=1)  # clamped at max_len
      index.value = index.value + 1
    else:
      x = x + pos[:, :length]
    x = nn.Dropout(cfg.dropout_rate)(x.astype(dtype), deterministic=not train)
    for i in range(cfg.num_layers):
      x = EncoderBlock(cfg, causal=self.causal, decode=self.decode, name=f"block_{i}")(
          x, None, deterministic=not train)
    x = nn.LayerNorm(dtype=dtype, name="final_norm")(x)
    return nn.Dense(cfg.num_classes, dtype=dtype, name="logits")(x).astype(jnp.float32)


def init_cache(model: Decoder, variables: dict, inputs: jax.Array) -> Any:
  """The empty ``"cache"`` collection of ``model.clone(decode=True)`` (position 0, every
  state zero), made by Flax's initialisation call: one call with full-length ``inputs``
  ``int[B, L]`` (only their shape matters).  ``variables`` holds ``params`` (and
  ``random_features``).  Random-feature layers' states do not depend on ``L``; softmax and
  flash hold a key-value cache of length ``L``."""
  init_call = lambda variables, inputs: model.clone(decode=True).apply(
      variables, inputs, mutable=["cache"])[1]["cache"]
  # Jitted, the forward pass of the initialisation call is dead code: only the cache is built.
  return jax.jit(init_call)(variables, inputs)


def build_model(config: ModelConfig, *, dual: bool, padded: bool = True,
                per_token: bool = False, causal: bool = False) -> nn.Module:
  """The model of a task: the classifier (``dual``: retrieval's two-document model) or, for a
  ``per_token`` task, the ``Decoder`` (``causal``: causal self-attention)."""
  config.validate()
  if causal:
    config.validate_causal()
  if per_token:
    return Decoder(config, causal=causal)
  cls = DualEncoderClassifier if dual else Classifier
  return cls(config, padded=padded)


def model_inputs(batch: dict, *, dual: bool) -> tuple:
  """The positional model inputs from a batch dict."""
  return (batch["inputs1"], batch["inputs2"]) if dual else (batch["inputs"],)


def param_count(params: Any) -> int:
  """Number of trainable parameters."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def init_variables(model: nn.Module, key: jax.Array, example_inputs: tuple,
                   ) -> dict[str, Any]:
  """Initialises ``params`` and ``random_features`` (W drawn from ``key``)."""
  params_key, dropout_key, features_key = jax.random.split(key, 3)
  rngs = {"params": params_key, "dropout": dropout_key, "features": features_key}
  variables = model.init(rngs, *example_inputs, train=False)
  return dict(variables)


def apply(model: nn.Module, params: Any, random_features: Optional[Any], inputs: tuple, *,
          train: bool, rng: Optional[jax.Array] = None):
  """Logits; ``rng`` feeds dropout and, with ``redraw="always"``, the ``features`` stream."""
  variables = {"params": params}
  if random_features:
    variables["random_features"] = random_features
  rngs = {}
  if rng is not None:
    dropout_key, features_key = jax.random.split(rng)
    rngs = {"dropout": dropout_key, "features": features_key}
  return model.apply(variables, *inputs, train=train, rngs=rngs)
