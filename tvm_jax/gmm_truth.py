"""Exact ground truth for class-conditional Gaussian mixtures (velocity, flow map, W2).

Conventions (shared with the rest of tvm-jax)
---------------------------------------------
* Interpolation: ``x_t = (1 - t) x0 + t eps`` with ``eps ~ N(0, I)``; ``t = 1`` is pure noise,
  ``t = 0`` is data.
* Conditional velocity ``v = eps - x0``; marginal velocity
  ``u(x, t) = E[eps - x0 | x_t = x]`` (optionally also conditioned on a class label ``c``).
* Flow map ``psi(x, t, s)`` transports ``x`` at time ``t`` to time ``s`` along
  ``dx/dt = u(x, t)``.  Sampling goes from ``t = 1`` to ``s = 0``; any ``s`` in [0, 1] is allowed.
* Classifier-free guidance (CFG) with weight ``w``:
  ``u_w(x, t | c) = w u(x, t | c) + (1 - w) u(x, t)`` (``w = 1``: plain conditional).
* Data: ``p(x0) = sum_k pi_k N(x0; mu_k, Sigma_k)``; component ``k`` carries class label
  ``label_k``; the class prior is ``p(c) = sum_{k: label_k = c} pi_k`` and
  ``p(x0 | c)`` is the mixture of the class-``c`` components with weights ``pi_k / p(c)``.

Mathematics (per component ``k``; ``Sigma_k = Q_k diag(lam_k) Q_k^T``)
-----------------------------------------------------------------------
``x_t | k ~ N((1 - t) mu_k, A_k)`` with ``A_k = (1 - t)^2 Sigma_k + t^2 I
= Q_k diag(a_k) Q_k^T``, ``a_k = (1 - t)^2 lam_k + t^2 > 0`` for every ``t`` in [0, 1]
(``Sigma_k`` is SPD), so everything below is finite at ``t = 0`` and ``t = 1``.  With
``y = x - (1 - t) mu_k``::

    E[x0  | x_t, k] = mu_k + (1 - t) Sigma_k A_k^{-1} y
    E[eps | x_t, k] = t A_k^{-1} y
    r_k(x) ∝ pi_k N(x; (1 - t) mu_k, A_k)          (softmax in log space)
    u(x, t) = sum_k r_k (E[eps | x_t, k] - E[x0 | x_t, k])

The responsibilities run over the components of class ``c`` (conditional) or over all
components (unconditional).  Boundary values: ``u(x, 0) = -x`` (data is observed exactly)
and ``u(x, 1) = x - E[x0]`` (resp. ``x - E[x0 | c]``).

For a single Gaussian the flow is linear in the eigenbasis of ``Sigma``:
with ``z = Q^T (x - (1 - t) mu)``, ``dz_i/dt = (t - (1 - t) lam_i) / a_i(t) z_i
= d log sd_i(t)/dt z_i`` where ``sd_i(t) = sqrt(a_i(t))``, hence::

    psi(x, t, s) = (1 - s) mu + Q diag(sd(s) / sd(t)) Q^T (x - (1 - t) mu)

(:func:`single_gaussian_flow_map`; the linear map sends ``N((1-t)mu, A_t)`` exactly onto
``N((1-s)mu, A_s)``).

What is exact and what is numerical
-----------------------------------
* Exact (closed form, float64, errors at the level of float64 round-off ~1e-13 relative):
  :meth:`GaussianMixture.velocity`, :meth:`GaussianMixture.posterior_mean`,
  :meth:`GaussianMixture.responsibilities`,
  :meth:`GaussianMixture.log_prob`, :meth:`GaussianMixture.sample` (exact sampler),
  :func:`single_gaussian_flow_map`, :func:`w2_distance` (exact optimal assignment between two
  empirical sets; it is of course only a *statistical* estimate of W2 between the underlying
  distributions).
* Numerical: :func:`flow_map` / :func:`pushforward_samples` / :func:`displacement_error`
  integrate the exact velocity with scipy's adaptive DOP853 (order 8) in float64 with
  ``rtol = atol = 1e-10`` by default; the global error is then typically ~1e-9 and, in the
  tests, below 1e-7 against the closed form.  ``psi(x, t, t) = x`` holds exactly.  A solver
  failure raises ``RuntimeError``.
* :meth:`GaussianMixture.velocity_jax` is the same formula in JAX, in the dtype of ``x``
  (float32 unless x64 is enabled), usable under ``jit``/``grad``/``vmap``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

__all__ = [
    "GaussianMixture",
    "ring_mixture",
    "random_mixture",
    "flow_map",
    "single_gaussian_flow_map",
    "w2_distance",
    "pushforward_samples",
    "displacement_error",
]

ArrayLike = Union[np.ndarray, float, int, list, tuple]

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# input validation helpers
# --------------------------------------------------------------------------------------------
def _as_float_array(a, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a real numeric array, got {type(a).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return arr


def _as_int_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must contain integers, got non-integer values")
    return arr.astype(np.int64)


def _check_points(x, d: int, name: str = "x") -> np.ndarray:
    x = _as_float_array(x, name)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{name} must have shape (n, {d}), got {x.shape}")
    return x


def _check_times(t, n: int, name: str = "t") -> np.ndarray:
    """Scalar or (n,) times in [0, 1] -> (n,) float64."""
    t = _as_float_array(t, name)
    if t.ndim == 0:
        t = np.full((n,), float(t))
    elif t.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {t.shape}")
    if np.any(t < 0.0) or np.any(t > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values in [{t.min()}, {t.max()}]")
    return t


def _check_w(w) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError) as e:
        raise ValueError(f"guidance weight w must be a real scalar, got {w!r}") from e
    if not math.isfinite(w):
        raise ValueError(f"guidance weight w must be finite, got {w}")
    return w


# --------------------------------------------------------------------------------------------
# the mixture
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Class-conditional Gaussian mixture ``sum_k weights[k] N(means[k], covariances[k])``.

    Fields (validated in ``__post_init__``; arrays are stored read-only in float64/int64):
      means:        (K, d)
      covariances:  (K, d, d), symmetric positive definite
      weights:      (K,), positive, summing to 1
      labels:       (K,), ints in [0, num_classes); every class needs >= 1 component
      num_classes:  int >= 1

    Use :meth:`make` to build one with defaults and automatic weight normalisation.
    """

    means: np.ndarray
    covariances: np.ndarray
    weights: np.ndarray
    labels: np.ndarray
    num_classes: int

    # derived (eigen-decomposition Sigma_k = Q_k diag(lam_k) Q_k^T, Cholesky factors)
    _eigvals: np.ndarray = dataclasses.field(init=False, repr=False)
    _eigvecs: np.ndarray = dataclasses.field(init=False, repr=False)
    _chol: np.ndarray = dataclasses.field(init=False, repr=False)
    _log_weights: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        means = _as_float_array(self.means, "means")
        if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {means.shape}")
        K, d = means.shape
        covs = _as_float_array(self.covariances, "covariances")
        if covs.shape != (K, d, d):
            raise ValueError(f"covariances must have shape (K, d, d) = ({K}, {d}, {d}), got {covs.shape}")
        asym = np.max(np.abs(covs - np.swapaxes(covs, 1, 2)), axis=(1, 2))
        scale = np.maximum(np.max(np.abs(covs), axis=(1, 2)), 1e-300)
        bad = np.nonzero(asym > 1e-10 * scale)[0]
        if bad.size:
            raise ValueError(f"covariances[{bad[0]}] is not symmetric (max |S - S^T| = {asym[bad[0]]:.3g})")
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        eigvals, eigvecs = np.linalg.eigh(covs)
        bad = np.nonzero(eigvals[:, 0] <= 1e-12 * np.maximum(eigvals[:, -1], 0.0))[0]
        bad = np.union1d(bad, np.nonzero(eigvals[:, 0] <= 0.0)[0])
        if bad.size:
            raise ValueError(
                f"covariances[{bad[0]}] is not positive definite (smallest eigenvalue {eigvals[bad[0], 0]:.3g})"
            )
        chol = np.linalg.cholesky(covs)

        weights = _as_float_array(self.weights, "weights")
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), got {weights.shape}")
        if np.any(weights <= 0.0):
            raise ValueError("weights must be strictly positive")
        if abs(weights.sum() - 1.0) > 1e-10:
            raise ValueError(f"weights must sum to 1 (got {weights.sum():.12g}); use GaussianMixture.make to normalise")

        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, got {self.num_classes!r}")
        num_classes = int(self.num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        labels = _as_int_array(self.labels, "labels")
        if labels.shape != (K,):
            raise ValueError(f"labels must have shape ({K},), got {labels.shape}")
        if np.any(labels < 0) or np.any(labels >= num_classes):
            raise ValueError(f"component labels must lie in [0, {num_classes}), got {labels.tolist()}")
        missing = np.setdiff1d(np.arange(num_classes), labels)
        if missing.size:
            raise ValueError(f"class(es) {missing.tolist()} have no component; every class needs at least one")

        for arr in (means, covs, weights, labels, eigvals, eigvecs, chol):
            arr.setflags(write=False)
        log_w = np.log(weights)
        log_w.setflags(write=False)
        set_ = object.__setattr__
        set_(self, "means", means)
        set_(self, "covariances", covs)
        set_(self, "weights", weights)
        set_(self, "labels", labels)
        set_(self, "num_classes", num_classes)
        set_(self, "_eigvals", eigvals)
        set_(self, "_eigvecs", eigvecs)
        set_(self, "_chol", chol)
        set_(self, "_log_weights", log_w)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def make(cls, means, covariances, weights=None, labels=None, num_classes: Optional[int] = None) -> "GaussianMixture":
        """Build a mixture.  ``weights=None`` -> uniform; positive weights are normalised.
        ``labels=None`` -> all components in class 0.  ``num_classes=None`` -> ``max(labels) + 1``."""
        means = _as_float_array(means, "means")
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        K = means.shape[0]
        if weights is None:
            weights = np.full((K,), 1.0 / max(K, 1))
        else:
            weights = _as_float_array(weights, "weights")
            if weights.shape != (K,):
                raise ValueError(f"weights must have shape ({K},), got {weights.shape}")
            if np.any(weights <= 0.0):
                raise ValueError("weights must be strictly positive")
            weights = weights / weights.sum()
        if labels is None:
            labels = np.zeros((K,), dtype=np.int64)
        labels = _as_int_array(labels, "labels")
        if num_classes is None:
            if labels.size == 0:
                raise ValueError("need at least one component")
            num_classes = int(labels.max()) + 1
        return cls(means=means, covariances=covariances, weights=weights, labels=labels, num_classes=num_classes)

    # ---------------------------------------------------------------- basic properties
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def class_prior(self) -> np.ndarray:
        """p(c) = sum of the weights of the components of class c, shape (num_classes,)."""
        return np.bincount(self.labels, weights=self.weights, minlength=self.num_classes)

    def mean(self, label: Optional[int] = None) -> np.ndarray:
        """E[x0] (or E[x0 | c])."""
        if label is None:
            return self.weights @ self.means
        c = self._check_labels(label, 1)[0]
        m = self.labels == c
        return self.weights[m] @ self.means[m] / self.weights[m].sum()

    def covariance(self, label: Optional[int] = None) -> np.ndarray:
        """Cov[x0] (or Cov[x0 | c]) = sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T, shape (d, d)."""
        if label is None:
            m = np.ones((self.num_components,), dtype=bool)
        else:
            c = self._check_labels(label, 1)[0]
            m = self.labels == c
        p = self.weights[m] / self.weights[m].sum()
        mu = self.means[m]
        mean = p @ mu
        second = np.einsum("k,kij->ij", p, self.covariances[m]) + np.einsum("k,ki,kj->ij", p, mu, mu)
        return second - np.outer(mean, mean)

    # ---------------------------------------------------------------- validation
    def _check_labels(self, labels, n: int) -> np.ndarray:
        labels = _as_int_array(labels, "labels")
        if labels.ndim == 0:
            labels = np.full((n,), int(labels), dtype=np.int64)
        elif labels.shape != (n,):
            raise ValueError(f"labels must be a scalar or have shape ({n},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got values in [{labels.min()}, {labels.max()}]"
            )
        return labels

    def _check_guidance(self, labels, w, n):
        w = _check_w(w)
        if labels is None:
            if w != 1.0:
                raise ValueError(f"guidance weight w={w} needs labels (CFG mixes conditional and unconditional)")
            return None, w
        return self._check_labels(labels, n), w

    # ---------------------------------------------------------------- sampling
    def sample(self, rng: np.random.Generator, n: int, labels=None) -> Tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` data points.  Returns ``(x0 (n, d), labels (n,))``.

        ``labels=None``: ancestral sampling from p(x0) (labels are those of the drawn components).
        ``labels`` given (scalar or (n,)): x0_i ~ p(x0 | labels_i)."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        n = int(n)
        K = self.num_components
        if labels is None:
            comp = rng.choice(K, size=n, p=self.weights)
        else:
            labels = self._check_labels(labels, n)
            comp = np.empty((n,), dtype=np.int64)
            for c in np.unique(labels):
                idx = np.nonzero(labels == c)[0]
                ks = np.nonzero(self.labels == c)[0]
                p = self.weights[ks] / self.weights[ks].sum()
                comp[idx] = ks[rng.choice(ks.size, size=idx.size, p=p)]
        z = rng.standard_normal((n, self.dim))
        x0 = self.means[comp] + np.einsum("nij,nj->ni", self._chol[comp], z)
        return x0, self.labels[comp].copy()

    # ---------------------------------------------------------------- exact posterior quantities
    def _component_terms(self, x: np.ndarray, t: np.ndarray):
        """Per-component quantities, all (n, K, ...): eigen-coordinates z, variances a, log N."""
        omt = (1.0 - t)[:, None, None]
        y = x[:, None, :] - omt * self.means[None]  # (n, K, d)
        z = np.einsum("nkd,kde->nke", y, self._eigvecs)  # Q_k^T y
        a = omt**2 * self._eigvals[None] + (t**2)[:, None, None]  # (n, K, d), > 0
        log_n = -0.5 * np.sum(z * z / a, axis=-1) - 0.5 * np.sum(np.log(a), axis=-1) - 0.5 * self.dim * _LOG_2PI
        return z, a, log_n

    def _responsibilities(self, log_n: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
        logits = self._log_weights[None, :] + log_n  # (n, K)
        if labels is not None:
            logits = np.where(self.labels[None, :] == labels[:, None], logits, -np.inf)
        return np.exp(logits - logsumexp(logits, axis=1, keepdims=True))

    def _component_posteriors(self, z, a, t):
        """E[x0 | x_t, k] and E[eps | x_t, k], each (n, K, d)."""
        omt = (1.0 - t)[:, None, None]
        Q = self._eigvecs
        x0_k = self.means[None] + np.einsum("kde,nke->nkd", Q, omt * self._eigvals[None] / a * z)
        eps_k = np.einsum("kde,nke->nkd", Q, t[:, None, None] / a * z)
        return x0_k, eps_k

    def responsibilities(self, x, t, labels=None) -> np.ndarray:
        """Exact posterior over components ``p(k | x_t = x (, c))``, shape (n, K) (zero off class c)."""
        x = _check_points(x, self.dim)
        n = x.shape[0]
        t = _check_times(t, n)
        labels = None if labels is None else self._check_labels(labels, n)
        _, _, log_n = self._component_terms(x, t)
        return self._responsibilities(log_n, labels)

    def posterior_mean(self, x, t, labels=None) -> Tuple[np.ndarray, np.ndarray]:
        """Exact ``(E[x0 | x_t = x (, c)], E[eps | x_t = x (, c)])``, each (n, d), float64."""
        x = _check_points(x, self.dim)
        n = x.shape[0]
        t = _check_times(t, n)
        labels = None if labels is None else self._check_labels(labels, n)
        z, a, log_n = self._component_terms(x, t)
        r = self._responsibilities(log_n, labels)
        x0_k, eps_k = self._component_posteriors(z, a, t)
        return np.einsum("nk,nkd->nd", r, x0_k), np.einsum("nk,nkd->nd", r, eps_k)

    def velocity(self, x, t, labels=None, w: float = 1.0) -> np.ndarray:
        """Exact marginal velocity ``u(x, t) = E[eps - x0 | x_t = x]`` in float64, shape (n, d).

        x: (n, d); t: scalar or (n,) in [0, 1]; labels: None (unconditional), a scalar class or
        (n,) classes; w: CFG weight, result ``w u(x, t | c) + (1 - w) u(x, t)`` (needs labels
        unless w == 1)."""
        x = _check_points(x, self.dim)
        n = x.shape[0]
        t = _check_times(t, n)
        labels, w = self._check_guidance(labels, w, n)
        z, a, log_n = self._component_terms(x, t)
        # u_k = E[eps|k] - E[x0|k] = -mu_k + Q_k diag((t - (1-t) lam_k) / a_k) z_k
        coef = (t[:, None, None] - (1.0 - t)[:, None, None] * self._eigvals[None]) / a
        u_k = np.einsum("kde,nke->nkd", self._eigvecs, coef * z) - self.means[None]
        if labels is None:
            r = self._responsibilities(log_n, None)
        else:
            r = self._responsibilities(log_n, labels)
            if w != 1.0:
                r = w * r + (1.0 - w) * self._responsibilities(log_n, None)
        return np.einsum("nk,nkd->nd", r, u_k)

    def log_prob(self, x, t=0.0, labels=None) -> np.ndarray:
        """Exact log-density of x_t at x: ``log p_t(x)`` or ``log p_t(x | c)``, shape (n,)."""
        x = _check_points(x, self.dim)
        n = x.shape[0]
        t = _check_times(t, n)
        _, _, log_n = self._component_terms(x, t)
        logits = self._log_weights[None, :] + log_n
        if labels is not None:
            labels = self._check_labels(labels, n)
            logits = np.where(self.labels[None, :] == labels[:, None], logits, -np.inf)
            return logsumexp(logits, axis=1) - np.log(self.class_prior[labels])
        return logsumexp(logits, axis=1)

    # ---------------------------------------------------------------- JAX version
    def velocity_jax(self, x, t, labels=None, w=1.0):
        """Same as :meth:`velocity` in JAX (dtype of ``x``; traceable in x, t, labels, w).

        Shapes as in :meth:`velocity`; values of traced inputs are not range-checked."""
        import jax.numpy as jnp
        from jax.scipy.special import logsumexp as jlogsumexp

        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {x.shape}")
        n = x.shape[0]
        dt = x.dtype
        t = jnp.asarray(t, dt)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (n,))
        elif t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {t.shape}")
        if labels is None and isinstance(w, (int, float)) and w != 1.0:
            raise ValueError(f"guidance weight w={w} needs labels (CFG mixes conditional and unconditional)")
        means = jnp.asarray(self.means, dt)
        lam = jnp.asarray(self._eigvals, dt)
        Q = jnp.asarray(self._eigvecs, dt)
        log_w = jnp.asarray(self._log_weights, dt)
        omt = (1.0 - t)[:, None, None]
        y = x[:, None, :] - omt * means[None]
        z = jnp.einsum("nkd,kde->nke", y, Q)
        a = omt**2 * lam[None] + (t**2)[:, None, None]
        log_n = -0.5 * jnp.sum(z * z / a, axis=-1) - 0.5 * jnp.sum(jnp.log(a), axis=-1)
        coef = (t[:, None, None] - omt * lam[None]) / a
        u_k = jnp.einsum("kde,nke->nkd", Q, coef * z) - means[None]
        logits = log_w[None, :] + log_n
        r_u = jnp.exp(logits - jlogsumexp(logits, axis=1, keepdims=True))
        if labels is None:
            r = r_u
        else:
            labels = jnp.asarray(labels)
            if labels.ndim == 0:
                labels = jnp.broadcast_to(labels, (n,))
            elif labels.shape != (n,):
                raise ValueError(f"labels must be a scalar or have shape ({n},), got {labels.shape}")
            mask = jnp.asarray(self.labels)[None, :] == labels[:, None]
            logits_c = jnp.where(mask, logits, -jnp.inf)
            r_c = jnp.exp(logits_c - jlogsumexp(logits_c, axis=1, keepdims=True))
            w = jnp.asarray(w, dt)
            r = w * r_c + (1.0 - w) * r_u
        return jnp.einsum("nk,nkd->nd", r, u_k)


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------
def ring_mixture(
    num_classes: int = 4,
    components_per_class: int = 2,
    radius: float = 2.0,
    std: float = 0.15,
    d: int = 2,
    seed: Optional[int] = 0,
    anisotropy: float = 3.0,
) -> GaussianMixture:
    """2-D benchmark: ``num_classes * components_per_class`` Gaussians equally spaced on a circle
    of ``radius`` in the first two coordinates.  Component ``k`` sits at angle ``2 pi k / K`` and
    belongs to class ``k % num_classes`` (classes interleave around the ring).

    Covariances are anisotropic: tangential std ``std * sqrt(anisotropy)``, radial std
    ``std / sqrt(anisotropy)`` (``anisotropy=1`` -> isotropic); extra dimensions (``d > 2``) have
    zero mean and std ``std``.  ``seed=None`` -> uniform weights, otherwise weights
    ∝ Uniform(0.5, 1.5) drawn from ``seed``."""
    for name, v in (("num_classes", num_classes), ("components_per_class", components_per_class), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if num_classes < 1 or components_per_class < 1:
        raise ValueError("num_classes and components_per_class must be >= 1")
    if d < 2:
        raise ValueError(f"ring_mixture needs d >= 2, got {d}")
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"std must be finite and > 0, got {std}")
    if not (anisotropy > 0 and math.isfinite(anisotropy)):
        raise ValueError(f"anisotropy must be finite and > 0, got {anisotropy}")
    K = num_classes * components_per_class
    ang = 2.0 * np.pi * np.arange(K) / K
    means = np.zeros((K, d))
    means[:, 0] = radius * np.cos(ang)
    means[:, 1] = radius * np.sin(ang)
    covs = np.zeros((K, d, d))
    s_tan2, s_rad2 = std**2 * anisotropy, std**2 / anisotropy
    for k, th in enumerate(ang):
        radial = np.array([np.cos(th), np.sin(th)])
        tangent = np.array([-np.sin(th), np.cos(th)])
        covs[k, :2, :2] = s_rad2 * np.outer(radial, radial) + s_tan2 * np.outer(tangent, tangent)
        covs[k, 2:, 2:] = std**2 * np.eye(d - 2)
    if seed is None:
        weights = None
    else:
        weights = np.random.default_rng(seed).uniform(0.5, 1.5, size=K)
    labels = np.arange(K) % num_classes
    return GaussianMixture.make(means, covs, weights=weights, labels=labels, num_classes=num_classes)


def random_mixture(
    num_components: int,
    d: int,
    num_classes: int = 1,
    seed: int = 0,
    mean_scale: float = 2.0,
    std_range: Tuple[float, float] = (0.2, 0.6),
) -> GaussianMixture:
    """Random mixture in ``d`` dims: means ~ N(0, mean_scale^2 I), covariances
    ``Q diag(std^2) Q^T`` with a Haar-random rotation Q and stds ~ Uniform(std_range), weights
    ∝ Uniform(0.5, 1.5), component ``k`` in class ``k % num_classes``."""
    for name, v in (("num_components", num_components), ("d", d), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_components < num_classes:
        raise ValueError(f"num_components ({num_components}) must be >= num_classes ({num_classes})")
    lo, hi = std_range
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"std_range must satisfy 0 < lo <= hi < inf, got {std_range}")
    rng = np.random.default_rng(seed)
    means = mean_scale * rng.standard_normal((num_components, d))
    covs = np.empty((num_components, d, d))
    for k in range(num_components):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))[None, :]
        sd = rng.uniform(lo, hi, size=d)
        covs[k] = (q * sd**2) @ q.T
    weights = rng.uniform(0.5, 1.5, size=num_components)
    labels = np.arange(num_components) % num_classes
    return GaussianMixture.make(means, covs, weights=weights, labels=labels, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# flow maps
# --------------------------------------------------------------------------------------------
def flow_map(
    mixture: GaussianMixture,
    x,
    t,
    s,
    labels=None,
    w: float = 1.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> np.ndarray:
    """Exact flow map ``psi(x, t, s)`` by a float64 DOP853 solve of ``dx/dt = u_w(x, t | c)``.

    x: (n, d); t, s: scalars or (n,) in [0, 1] (any order, s < t is the sampling direction).
    The whole batch is one ODE in normalised time tau in [0, 1]:
    ``dx/dtau = (s - t) u(x, t + tau (s - t))``.  Samples with ``t == s`` are returned unchanged
    (bit-exact).  Raises ``RuntimeError`` if the solver fails.

    Cost: one adaptive solve for the whole batch, so the step count is set by the hardest sample
    and each step costs O(n K d^2); ~1 s for n = 1000 on the 8-component 2-D ring (CPU)."""
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
    x = _check_points(x, mixture.dim)
    n, d = x.shape
    t = _check_times(t, n, "t")
    s = _check_times(s, n, "s")
    labels, w = mixture._check_guidance(labels, w, n)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    out = x.copy()
    move = t != s
    if n == 0 or not np.any(move):
        return out
    xm, tm, sm = x[move], t[move], s[move]
    lm = None if labels is None else labels[move]
    m = xm.shape[0]
    delta = sm - tm

    def rhs(tau, y):
        time = np.clip(tm + tau * delta, 0.0, 1.0)  # clip guards round-off at the end points
        u = mixture.velocity(y.reshape(m, d), time, labels=lm, w=w)
        return (delta[:, None] * u).ravel()

    sol = solve_ivp(rhs, (0.0, 1.0), xm.ravel(), method="DOP853", rtol=rtol, atol=atol, t_eval=[1.0])
    if not sol.success:
        raise RuntimeError(f"flow_map ODE solve failed: {sol.message}")
    xs = sol.y[:, -1].reshape(m, d)
    if not np.all(np.isfinite(xs)):
        raise RuntimeError("flow_map ODE solve produced non-finite values")
    out[move] = xs
    return out


def single_gaussian_flow_map(mu, Sigma, x, t, s) -> np.ndarray:
    """Closed-form flow map for data ``N(mu, Sigma)`` (see the module docstring):
    ``psi(x, t, s) = (1 - s) mu + Q diag(sd_s / sd_t) Q^T (x - (1 - t) mu)`` with
    ``Sigma = Q diag(lam) Q^T`` and ``sd_t = sqrt((1 - t)^2 lam + t^2)``.

    mu: (d,); Sigma: (d, d) SPD; x: (n, d); t, s: scalars or (n,) in [0, 1]."""
    mu = _as_float_array(mu, "mu")
    if mu.ndim != 1:
        raise ValueError(f"mu must have shape (d,), got {mu.shape}")
    d = mu.shape[0]
    Sigma = _as_float_array(Sigma, "Sigma")
    if Sigma.shape != (d, d):
        raise ValueError(f"Sigma must have shape ({d}, {d}), got {Sigma.shape}")
    if np.max(np.abs(Sigma - Sigma.T)) > 1e-10 * max(np.max(np.abs(Sigma)), 1e-300):
        raise ValueError("Sigma is not symmetric")
    lam, Q = np.linalg.eigh(0.5 * (Sigma + Sigma.T))
    if lam[0] <= 0:
        raise ValueError(f"Sigma is not positive definite (smallest eigenvalue {lam[0]:.3g})")
    x = _check_points(x, d)
    n = x.shape[0]
    t = _check_times(t, n, "t")
    s = _check_times(s, n, "s")
    sd_t = np.sqrt((1.0 - t)[:, None] ** 2 * lam[None] + (t**2)[:, None])
    sd_s = np.sqrt((1.0 - s)[:, None] ** 2 * lam[None] + (s**2)[:, None])
    z = (x - (1.0 - t)[:, None] * mu[None]) @ Q  # Q^T y per row
    return (1.0 - s)[:, None] * mu[None] + (z * (sd_s / sd_t)) @ Q.T


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def w2_distance(a, b) -> float:
    """Exact W2 between two equal-size empirical measures (uniform weights):
    ``sqrt(min_perm mean_i |a_i - b_perm(i)|^2)`` via ``linear_sum_assignment``.
    a, b: (n, d) (or (n,) for 1-D points)."""
    a = _as_float_array(a, "a")
    b = _as_float_array(b, "b")
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"a and b must be point sets of shape (n, d), got {a.shape} and {b.shape}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"w2_distance needs equal-size point sets, got {a.shape[0]} and {b.shape[0]} points")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] == 0:
        raise ValueError("w2_distance needs non-empty point sets")
    cost = cdist(a, b, metric="sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def pushforward_samples(
    mixture: GaussianMixture, eps, labels=None, w: float = 1.0, rtol: float = 1e-10, atol: float = 1e-10
) -> np.ndarray:
    """``psi(eps, 1, 0)`` under the exact (CFG-``w``) flow: what a perfect one-step sampler
    produces from noise ``eps`` (n, d).  For ``w = 1`` these are exact samples of p(x0) / p(x0|c)."""
    return flow_map(mixture, eps, 1.0, 0.0, labels=labels, w=w, rtol=rtol, atol=atol)


def displacement_error(
    f_pred,
    x_t,
    t,
    s,
    mixture: GaussianMixture,
    labels=None,
    w: float = 1.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> float:
    """``mean_i |f_pred_i - psi(x_t_i, t_i, s_i)|^2`` (squared Euclidean norm, mean over samples)."""
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
    x_t = _check_points(x_t, mixture.dim, "x_t")
    f_pred = _as_float_array(f_pred, "f_pred")
    if f_pred.shape != x_t.shape:
        raise ValueError(f"f_pred must have the shape of x_t {x_t.shape}, got {f_pred.shape}")
    target = flow_map(mixture, x_t, t, s, labels=labels, w=w, rtol=rtol, atol=atol)
    return float(np.mean(np.sum((f_pred - target) ** 2, axis=1)))
