"""Float64 NumPy/SciPy references for the mixing math, written straight from DESIGN §2.

Deliberately naive: explicit sums over the joint support, brentq for roots.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - logsumexp(x)


def joint(lp_b, lp_t):
    m = np.isfinite(lp_b) & np.isfinite(lp_t)
    b, t = lp_b[m], lp_t[m]
    return b - logsumexp(b), t - logsumexp(t)  # both renormalised on the joint support


def log_q(lp_b, lp_t, alpha):
    with np.errstate(invalid="ignore"):
        a = np.where(alpha == 1.0, 0.0, (1 - alpha) * lp_b) + np.where(alpha == 0.0, 0.0, alpha * lp_t)
    return a - logsumexp(a)


def kl(p_log, q_log):
    p = np.exp(p_log)
    m = p > 0
    return float(np.sum(p[m] * (p_log[m] - q_log[m])))


def _bracketed_root(fn, lo, hi, increasing=True):
    f_lo, f_hi = fn(lo), fn(hi)
    if not increasing:
        f_lo, f_hi = -f_lo, -f_hi
    if f_lo >= 0:
        return lo
    if f_hi <= 0:
        return hi
    return brentq(fn, lo, hi, xtol=1e-13, rtol=1e-13, maxiter=500)


def alpha_reference(lp_b, lp_t, method, lo=0.5, hi=1.0, fixed=0.5):
    lp_b = np.asarray(lp_b, np.float64)
    lp_t = np.asarray(lp_t, np.float64)
    if method == "fixed":
        return fixed
    b, t = joint(lp_b, lp_t)
    if kl(b, t) + kl(t, b) <= 1e-9:
        return (lo + hi) / 2
    if method == "kl_symmetry":
        m = np.isfinite(lp_b) & np.isfinite(lp_t)
        b_raw, t_raw = lp_b[m], lp_t[m]  # KL(q||pi) against the policies themselves, q lives on S

        def f(a):
            q = log_q(b, t, a)
            return kl(q, b_raw) - kl(q, t_raw)

        return _bracketed_root(f, lo, hi)
    if method == "ess_balance":

        def g(a):  # log ESS_teacher(q) - log ESS_base(q) is increasing in alpha
            q = log_q(b, t, a)
            return logsumexp(2 * b - q) - logsumexp(2 * t - q)

        return _bracketed_root(g, lo, hi)
    if method == "reverse_kl_symmetry":

        def h(a):  # KL(b||q) - KL(t||q) increases with alpha
            q = log_q(b, t, a)
            return kl(b, q) - kl(t, q)

        return _bracketed_root(h, lo, hi)
    if method == "entropy":
        h_b = -np.sum(np.where(np.isfinite(lp_b), np.exp(lp_b) * lp_b, 0.0))
        h_t = -np.sum(np.where(np.isfinite(lp_t), np.exp(lp_t) * lp_t, 0.0))
        if h_b + h_t == 0:
            return (lo + hi) / 2
        return float(np.clip(h_b / (h_b + h_t), lo, hi))
    raise ValueError(method)


def ess(pi_log, q_log):
    s = np.isfinite(q_log)
    mass = np.exp(logsumexp(pi_log[s]))
    return mass**2 / np.exp(logsumexp(2 * pi_log[s] - q_log[s]))
