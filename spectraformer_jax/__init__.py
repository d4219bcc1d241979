"""spectraformer-jax: random-feature attention phi(x) = f(W x) for JAX and Flax.

The public API, in one namespace (``import spectraformer_jax as sfj``):

* layers: ``RFMultiHeadDotProductAttention`` (linen), ``RFMultiHeadAttention`` (nnx), their
  redraw helpers, and the exact-attention baselines' layer ``BaselineSelfAttention``;
* attention functions: ``rf_attention`` (Flax layout ``[batch..., len, heads, head_dim]``),
  ``linear_attention`` / ``causal_linear_attention`` / ``causal_log_attention`` (feature layout),
  the causal Pallas kernels ``causal_rf_attention_pallas`` (log-linear form),
  the exact references ``softmax_attention`` / ``flash_attention``, and ``make_attention_fn``
  for Flax's ``attention_fn`` hook;
* the registry of component functions ``f`` and weight matrices ``W``: ``component_names``,
  ``weight_names``, ``get_component``, ``get_weight``, ``check_pair``, ``valid_pairs``,
  ``supports_causal``.

Everything else lives in the submodules (``spectraformer_jax.weights``, ``.components``, ...).
"""

from spectraformer_jax.attention import make_attention_fn
from spectraformer_jax.attention import rf_attention
from spectraformer_jax.causal import causal_linear_attention
from spectraformer_jax.causal import causal_log_attention
from spectraformer_jax.exact import flash_attention
from spectraformer_jax.exact import softmax_attention
from spectraformer_jax.linear import linear_attention
from spectraformer_jax.pallas_causal import causal_rf_attention_pallas
from spectraformer_jax.baselines import BaselineSelfAttention
from spectraformer_jax.layers import redraw_random_features
from spectraformer_jax.layers import redraw_random_features_nnx
from spectraformer_jax.layers import RFMultiHeadAttention
from spectraformer_jax.layers import RFMultiHeadDotProductAttention
from spectraformer_jax.registry import check_pair
from spectraformer_jax.registry import component_names
from spectraformer_jax.registry import get_component
from spectraformer_jax.registry import get_weight
from spectraformer_jax.registry import supports_causal
from spectraformer_jax.registry import valid_pairs
from spectraformer_jax.registry import weight_names

__version__ = "0.1.0"

__all__ = (
    "BaselineSelfAttention",
    "RFMultiHeadAttention",
    "RFMultiHeadDotProductAttention",
    "causal_linear_attention",
    "causal_log_attention",
    "causal_rf_attention_pallas",
    "check_pair",
    "component_names",
    "flash_attention",
    "get_component",
    "get_weight",
    "linear_attention",
    "make_attention_fn",
    "redraw_random_features",
    "redraw_random_features_nnx",
    "rf_attention",
    "softmax_attention",
    "supports_causal",
    "valid_pairs",
    "weight_names",
)
