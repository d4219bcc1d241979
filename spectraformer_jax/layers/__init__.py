"""Flax layers: drop-in multi-head attention with random-feature (or exact) attention.

* linen ``RFMultiHeadDotProductAttention``: drop-in for ``flax.linen.MultiHeadDotProductAttention``
  (same fields that make sense, same ``query/key/value/out`` parameters and shapes, same call).
* nnx ``RFMultiHeadAttention``: drop-in for ``flax.nnx.MultiHeadAttention``.

Extras of both: ``attention`` ("spectraformer" | "softmax" | "flash": the exact baselines run
through the same layer, so a model switches by config), ``component``, ``weight``,
``num_features`` (m, the number of frequencies per head; one W of shape [m, head_dim] shared by the
heads of a layer), ``weight_kwargs``, ``redraw`` ("never" | "always"), ``is_causal``,
``chunk_size`` (causal prefix sums), ``eps`` (normaliser guard), ``kv_mask_is_prefix`` (flash),
``fused`` (default True: positive components recompute their feature maps in the backward pass
instead of storing them, see ``attention.rf_attention``), ``implementation`` ("auto" | "pallas" |
"xla": the fused path's backend, see ``attention.rf_attention``),
and call arguments ``kv_mask [batch..., kv_len]`` / ``q_mask [batch..., q_len]`` (linear memory).
In self-attention ``q_mask`` defaults to ``kv_mask``, so statistics see real tokens only and
outputs at padded positions are zeros.
linen ``decode=True`` (with ``is_causal=True``) follows Flax's autoregressive-cache convention:
the first call (any length) runs in parallel and creates the empty ``"cache"`` collection;
later calls (``mutable=["cache"]``) take one token each.  Random features carry only the
recurrent state of ``recurrent`` (``S``, ``z``, the running key maximum): O(1) memory in the
sequence length; softmax and flash carry Flax's key-value cache.  nnx: ``init_cache(shape)``,
then ``decode=True`` calls (constructor or call argument), as ``nnx.MultiHeadAttention``.
Decoding uses the stored W, no dropout and no masks.
Flax's dense ``mask`` is accepted too: used as is by the softmax modes, reduced to key/query
masks (``attention.reduce_dense_mask``, separable padding mask assumed) by the RF mode.

State
-----
* linen: the collection ``"random_features"`` holds, per layer, the fixed W (``W``,
  float32[m, head_dim]) drawn at init from the ``"features"`` rng stream (falling back to
  ``"params"``), so no call regenerates it (orthogonal and moment-matched draws need QR /
  eigendecompositions, which cost more than the attention on a GPU).
  ``redraw_random_features(module, variables, key, *example_inputs)`` redraws every layer's W
  of any model with a pure, jittable re-init of the collection.  Learnable weights
  (``WeightSpec.learnable``: fastfoodl, gmm) keep their trainable parameters in
  ``params/weight`` and their non-trainable buffers under ``buffers`` (never redrawn);
  learnable component parameters live in ``params/component``.
* nnx: the fixed W (the weight's buffers) is stored in ``RandomFeatures`` variables
  (``self.random_features``), learnable weights in ``nnx.Param`` (``self.weight``) with their
  buffers in ``WeightBuffers``; ``redraw_random_features_nnx(model, key)`` redraws in place.
* ``redraw="always"``: a fresh W at every call from the rng stream ``"features"`` (linen:
  ``rngs={"features": k}``; nnx: the ``rngs`` call argument or the layer's own forked stream);
  without that stream the stored W is used.  Only for fixed weights.

Dropout
-------
Key dropout on the values (see ``attention`` module doc): equal to attention-weight dropout
with a mask shared along the query axis; the same rule in all three ``attention`` modes.

Modules
-------
``core`` (the shared pure logic), ``linen`` and ``nnx`` (one per Flax API); everything
public is importable from here.
"""

from spectraformer_jax.layers.core import ATTENTION_CHOICES
from spectraformer_jax.layers.core import default_kernel_init
from spectraformer_jax.layers.core import FEATURES_STREAM
from spectraformer_jax.layers.core import REDRAW_CHOICES
from spectraformer_jax.layers.core import RF_COLLECTION
from spectraformer_jax.layers.linen import redraw_random_features
from spectraformer_jax.layers.linen import RFMultiHeadDotProductAttention
# Private, kept importable here for tests/test_layers.py.
from spectraformer_jax.layers.nnx import RandomFeatures
from spectraformer_jax.layers.nnx import redraw_random_features_nnx
from spectraformer_jax.layers.nnx import RFMultiHeadAttention
from spectraformer_jax.layers.nnx import WeightBuffers

__all__ = [
    "ATTENTION_CHOICES",
    "FEATURES_STREAM",
    "REDRAW_CHOICES",
    "RF_COLLECTION",
    "RFMultiHeadAttention",
    "RFMultiHeadDotProductAttention",
    "RandomFeatures",
    "WeightBuffers",
    "default_kernel_init",
    "redraw_random_features",
    "redraw_random_features_nnx",
]
