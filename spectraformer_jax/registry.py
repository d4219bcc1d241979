"""The one table of names -> implementations, with validation and helpful errors.

A random-feature attention is named by a *component function* ``f`` and a *weight
matrix* ``W`` (``phi(x) = f(W x)``).

Contracts (everything downstream relies on these and nothing else):

``WeightSpec``
  * ``init(key, num_features, dim) -> (params, buffers)``: ``params`` are trainable
    (empty dict for fixed matrices), ``buffers`` are non-trainable arrays (for fixed
    matrices ``{"W": float32[num_features, dim]}``). Works under ``jax.jit`` with a
    traced key and static ``num_features``/``dim``.
  * ``matrix(params, buffers) -> float32[num_features, dim]``: differentiable in
    ``params``.

``ComponentSpec``
  * ``features(x, y, W, *, x_mask=None, y_mask=None, params=None, stabilize=True,
    causal=False)
    -> (phi_x, phi_y)``: ``x`` float[..., n, d] (queries, already scaled by
    ``d**-0.25``), ``y`` float[..., l, d] (keys, scaled likewise), ``W``
    float32[m, d]; masks are bool[..., n] / bool[..., l] (True = real token).
    Returns float32 ``phi_x[..., n, F]`` and ``phi_y[..., l, F]`` with
    ``F = feature_dim(m)``; rows of ``phi_y`` at masked keys are zero. With
    ``stabilize=False``, ``phi_x @ phi_y.T`` estimates ``exp(x . y)`` (unbiased
    where ``unbiased``); with ``stabilize=True`` the estimate is scaled by a
    positive constant per query row (and, for signed components, one constant per
    leading index), which cancels in the attention normalisation.
  * ``feature_dim(m) -> F``; ``init_params(key, dim) -> params`` for learnable
    component parameters, or ``None`` when the component has none.
  * ``weights``: the weight matrices the component pairs with (None: every random one, i.e.
    every entry of ``WEIGHTS``); ``check_pair`` refuses the others, naming the valid ones.
    Deterministic and learnable feature maps (``elu``, ``hedgehog``) take the deterministic
    weight ``identity`` (``DETERMINISTIC_WEIGHTS``), which no estimator takes.
  * ``log_linear(x, y, W, *, x_mask=None, y_mask=None, params=None) -> components.LogLinear``
    for positive components whose log-features are ``x' . w_r + col_r + row_i``
    (``features`` is then ``exp`` of those); ``None`` otherwise.  Attention uses it for the
    fused path (``fused.positive_rf_attention``), which never stores the feature maps.
  * ``log_features(x, y, W, *, x_mask=None, y_mask=None, params=None, causal=False)
    -> components.SignedLogFeatures`` for signed components (TrigRF): causal attention
    stabilises log-features prefix by prefix; positive components derive theirs from
    ``log_linear``.
  * ``causal=True`` (``features``, ``log_linear``, ``log_features``): statistics are replaced
    by data-independent neutral values, so nothing computed can see a future token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from spectraformer_jax import components
from spectraformer_jax import discrete
from spectraformer_jax import feature_maps
from spectraformer_jax import full_aderf
from spectraformer_jax import hybrid
from spectraformer_jax import learned
from spectraformer_jax import weights

Params = Any


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """A weight matrix W: how it is drawn (or parameterised) and materialised."""
  name: str
  init: Callable[..., tuple[Params, Params]]
  matrix: Callable[[Params, Params], Any]
  learnable: bool
  description: str


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """A component function f: features of both sides and their properties."""
  name: str
  features: Callable[..., tuple[Any, Any]]
  feature_dim: Callable[[int], int]
  init_params: Optional[Callable[..., Params]]
  positive: bool
  unbiased: bool
  description: str
  log_linear: Optional[Callable[..., components.LogLinear]] = None
  log_features: Optional[Callable[..., components.SignedLogFeatures]] = None
  weights: Optional[tuple[str, ...]] = None
  # True: ``features`` use no statistic of the sequence and no stabiliser shared across keys,
  # so causal attention may run on them directly (components without log-features).
  causal_features: bool = False


def _fixed(name: str, generator: Callable[..., Any], description: str) -> WeightSpec:
  """Wraps a keyed generator ``generator(key, m, d, **kw) -> W`` as a WeightSpec."""

  def init(key, num_features: int, dim: int, **kwargs):
    return {}, {"W": generator(key, num_features, dim, **kwargs)}

  return WeightSpec(name, init, lambda params, buffers: buffers["W"], False, description)


# Weight matrices (owned by weights.py / learned.py). Aliases map to the same spec.
WEIGHTS: dict[str, WeightSpec] = {
    "iid": _fixed("iid", weights.iid, "i.i.d. Gaussian rows, omega ~ N(0, I)."),
    "orf": _fixed("orf", weights.orf, "Orthogonal blocks with chi(d) row norms (norm='fixed': sqrt(d))."),
    "sorf": _fixed("sorf", weights.sorf, "Structured orthogonal: sqrt(d) H D1 H D2 H D3."),
    "scrf": _fixed("scrf", weights.scrf, "Signed circulant random features."),
    "rom": _fixed("rom", weights.rom, "Random orthogonal via Hadamard products (S-Hybrid)."),
    "simrf": _fixed("simrf", weights.simrf, "Simplex random features."),
    "qmc": _fixed("qmc", weights.qmc, "Randomised Sobol/Halton points through the normal inverse CDF."),
    "mm": _fixed("mm", weights.mm, "Moment matching: centred and whitened Gaussian sample."),
    "sgq": _fixed("sgq", weights.sgq, "Sparse-grid Gauss-Hermite quadrature nodes."),
    "fastfood": _fixed("fastfood", weights.fastfood, "Fastfood S H G Pi H B, fixed."),
    "fastfoodl": WeightSpec("fastfoodl", learned.fastfoodl_init, learned.fastfoodl_matrix, True,
                            "Fastfood with learnable S, G, B."),
    "gmm": WeightSpec("gmm", learned.gmm_init, learned.gmm_matrix, True,
                      "Learnable Gaussian-mixture spectral density (reparameterised)."),
}
WEIGHT_ALIASES: dict[str, str] = {"gaus": "iid"}
# Deterministic "weights" of the feature maps that are not kernel estimators (no draw).
DETERMINISTIC_WEIGHTS: dict[str, WeightSpec] = {
    "identity": _fixed("identity", feature_maps.identity_weight,
                       "Deterministic W = I (rows e_(r mod d)): W x = x, for elu/relu/hedgehog."),
}

# Component functions (owned by components.py / stats.py).
def _same(m: int) -> int:
  return m


def _double(m: int) -> int:
  return 2 * m


_RANDOM = tuple(sorted(WEIGHTS))
# Weight matrices whose rows are exactly N(0, I_d) (weights.py's table): the quantile transform
# of the discretely-induced components keeps their law only for these.
_GAUSSIAN = ("fastfood", "iid", "orf", "qmc", "scrf", "simrf")
# Why a component takes only its ``weights`` (components with ``weights=None`` take _RANDOM).
_RESTRICTED_BECAUSE = {
    "poisrf": "its integer frequencies are F^-1(Phi(W)), which has the Poisson law only for "
              "exactly Gaussian rows",
    "geomrf": "its integer frequencies are F^-1(Phi(W)), which has the geometric law only for "
              "exactly Gaussian rows",
    "hrf": "its mixture weight is unbiased only if its rows are independent of the base "
           "estimators' rows, which structured and quasi-random matrices couple",
    "elu": "it is a deterministic feature map",
    "relu": "it is a feature map without Monte-Carlo structure",
    "hedgehog": "it is a learned feature map",
}


COMPONENTS: dict[str, ComponentSpec] = {
    "trigrf": ComponentSpec(
        "trigrf", components.trigrf_features, _double, None, positive=False, unbiased=True,
        description="exp(|x|^2/2)/sqrt(m) [cos Wx, sin Wx] (2m features); unbiased, not positive.",
        log_features=components.trigrf_log_features),
    "posrf": ComponentSpec(
        "posrf", components.posrf_features, _same, None, positive=True, unbiased=True,
        description="FAVOR+: exp(Wx - |x|^2/2)/sqrt(m); positive, unbiased.",
        log_linear=components.posrf_log_linear),
    "oprf": ComponentSpec(
        "oprf", components.oprf_features, _same, None, positive=True, unbiased=True,
        description="Optimal positive RF: GERF(s=+1) with the variance-minimising A* per head "
                    "from q/k statistics; positive, unbiased given A*.",
        log_linear=components.oprf_log_linear),
    "gerf": ComponentSpec(
        "gerf", components.gerf_features, _same, components.gerf_init_params, positive=True,
        unbiased=True,
        description="Generalised exponential RF, s=+1, learnable scalar A = 1/8 - softplus(raw) "
                    "initialised at 0 (= PosRF); positive, unbiased for every A < 1/8.",
        log_linear=components.gerf_log_linear),
    "sderf": ComponentSpec(
        "sderf", components.sderf_features, _same, None, positive=True, unbiased=True,
        description="Symmetric dense-exponential RF: eigenbasis of mean (x+y)(x+y)^T with a "
                    "per-direction optimal A; positive, unbiased given the statistics.",
        log_linear=components.sderf_log_linear),
    "aderf": ComponentSpec(
        "aderf", components.aderf_features, _same, None, positive=True, unbiased=True,
        description="Asymmetric dense-exponential RF (diagonal): Psi rescaling and a "
                    "per-coordinate optimal A; positive, unbiased given the statistics.",
        log_linear=components.aderf_log_linear),
    "saderf": ComponentSpec(
        "saderf", components.saderf_features, _same, None, positive=True, unbiased=True,
        description="Simplified ADERF: x -> Psi x, y -> Psi^-1 y, then OPRF; positive, "
                    "unbiased given the statistics.",
        log_linear=components.saderf_log_linear),
    "aderf_full": ComponentSpec(
        "aderf_full", full_aderf.aderf_full_features, _same, None, positive=True, unbiased=True,
        description="Asymmetric dense-exponential RF with full matrices: geometric-mean "
                    "whitening of q/k second moments, then the per-coordinate optimum; "
                    "positive, unbiased given the statistics.",
        log_linear=full_aderf.aderf_full_log_linear),
    "poisrf": ComponentSpec(
        "poisrf", discrete.poisrf_features, _same, None, positive=False, unbiased=True,
        description="Discretely-induced RF, Poisson(lambda) integer frequencies from W by the "
                    "quantile transform, lambda per coordinate from q/k statistics; signed, "
                    "unbiased.", weights=_GAUSSIAN),
    "geomrf": ComponentSpec(
        "geomrf", discrete.geomrf_features, _same, None, positive=False, unbiased=True,
        description="Discretely-induced RF, geometric integer frequencies from W by the quantile "
                    "transform; signed, unbiased.", weights=_GAUSSIAN),
    "hrf": ComponentSpec(
        "hrf", hybrid.hrf_features, hybrid.feature_dim, None, positive=False, unbiased=True,
        description="Hybrid RF: angular-kernel-weighted mix of PosRF and TrigRF, the weight "
                    "estimated by sign features ((r+1)(m1+2m2) features); signed, unbiased.",
        weights=("iid",)),
    "elu": ComponentSpec(
        "elu", feature_maps.elu_features, _same, None, positive=True, unbiased=False,
        description="Deterministic elu(Wx) + 1 (linear transformer), W = identity.",
        causal_features=True, weights=("identity",)),
    "relu": ComponentSpec(
        "relu", feature_maps.relu_features, _same, None, positive=True, unbiased=False,
        description="relu(Wx)/sqrt(m): deterministic with W = identity, Performer's generalised "
                    "(ReLU-kernel) attention with a random W.",
        causal_features=True, weights=("identity",) + _RANDOM),
    "hedgehog": ComponentSpec(
        "hedgehog", feature_maps.hedgehog_features, _double, feature_maps.hedgehog_init_params,
        positive=True, unbiased=False,
        description="Learnable softmax-mimicking map [softmax(W(Ax+b)), softmax(-W(Ax+b))], "
                    "A, b trained with the model (2m features), W = identity.",
        causal_features=True, weights=("identity",)),
}

# (component, weight) pairs that make no sense -> the reason.  Every estimator component is a
# function of the projections W x only (plus |omega|^2 for the GERF/DERF family, whose
# importance weight exp(A|omega|^2) is exact for any omega), so every random weight matrix
# yields a valid estimator; whether it is *unbiased* is a property of the weight matrix's row
# distribution (see WeightSpec descriptions), not of the pair.  Refused are only the pairs
# outside a component's ``weights``: estimators with the deterministic ``identity``, the
# deterministic or learned maps with random frequencies, and the few estimators whose
# construction needs more of W than Gaussian marginals (``_RESTRICTED_BECAUSE``).
def _refusals() -> dict[tuple[str, str], str]:
  refused = {}
  for cname, comp in COMPONENTS.items():
    valid = comp.weights if comp.weights is not None else _RANDOM
    for wname in sorted([*WEIGHTS, *DETERMINISTIC_WEIGHTS]):
      if wname not in valid:
        why = _RESTRICTED_BECAUSE.get(
            cname, "it estimates the softmax kernel by Monte Carlo and needs random frequencies")
        refused[(cname, wname)] = (f"component {cname!r} does not take weight {wname!r}: {why}. "
                                   f"Valid weights for {cname!r}: {', '.join(valid)}.")
  return refused


REFUSED_PAIRS: dict[tuple[str, str], str] = _refusals()


def _unknown(kind: str, name: Any, valid: list[str]) -> ValueError:
  return ValueError(f"Unknown {kind} {name!r}. Valid {kind}s: {', '.join(sorted(valid))}.")


def weight_names() -> list[str]:
  """All weight-matrix names, aliases included."""
  return sorted([*WEIGHTS, *DETERMINISTIC_WEIGHTS, *WEIGHT_ALIASES])


def component_names() -> list[str]:
  """All component-function names."""
  return sorted(COMPONENTS)


def get_weight(name: str) -> WeightSpec:
  """Returns the WeightSpec for ``name`` (aliases resolved); ValueError if unknown."""
  key = WEIGHT_ALIASES.get(name, name) if isinstance(name, str) else name
  if key in DETERMINISTIC_WEIGHTS:
    return DETERMINISTIC_WEIGHTS[key]
  if key not in WEIGHTS:
    raise _unknown("weight matrix", name, weight_names())
  return WEIGHTS[key]


def get_component(name: str) -> ComponentSpec:
  """Returns the ComponentSpec for ``name``; ValueError if unknown."""
  if name not in COMPONENTS:
    raise _unknown("component function", name, component_names())
  return COMPONENTS[name]


def check_pair(component: str, weight: str) -> tuple[ComponentSpec, WeightSpec]:
  """Validates a (component, weight) combination; ValueError names why it is refused."""
  comp, spec = get_component(component), get_weight(weight)
  reason = REFUSED_PAIRS.get((comp.name, spec.name))
  if reason is not None:
    raise ValueError(f"The combination component={component!r}, weight={weight!r} is refused: {reason}")
  return comp, spec


def supports_causal(name: str) -> bool:
  """Whether component ``name`` runs in causal attention: it has log-features (positive
  log-linear or signed) or causal-safe features (``ComponentSpec.causal_features``)."""
  spec = get_component(name)
  return (spec.log_linear is not None or spec.log_features is not None
          or spec.causal_features)


def valid_pairs() -> list[tuple[str, str]]:
  """Every allowed (component, weight) pair, aliases excluded."""
  return [(c, w) for c in sorted(COMPONENTS) for w in sorted([*WEIGHTS, *DETERMINISTIC_WEIGHTS])
          if (c, w) not in REFUSED_PAIRS]
