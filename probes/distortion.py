"""Round-edit, conflict and distortion metrics (docs/METRICS.md §4) as pure functions of numbers.

No model, no torch: probes compute the probabilities P_θ(o | s, r) (mean of
p_θ(o | x) over the relation prompt and its paraphrase templates) and hand
them here. As in the Pitfalls code, p_θ(o | x) is exp(−mean token NLL) of o
(the chain probe's default ``p=meantok``; ``p=seq``, the whole answer's
probability, is a named variant whose values are not Pitfalls'). Natural logs
throughout. Functions that compare two numbers accept scalars or equal-shaped
arrays (vectorised over edits) and return a float for scalar input, an array
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import rel_entr

LN2 = math.log(2.0)


def _prob_vector(p, name: str) -> np.ndarray:
    a = np.asarray(p, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite entries")
    if np.any(a < 0):
        raise ValueError(f"{name} has negative entries")
    total = a.sum()
    if total <= 0:
        raise ValueError(f"{name} sums to zero: cannot normalise")
    a = a / total
    # Subnormal masses are zero for our purposes: halving one in m = (p+q)/2 underflows
    # to 0 and would turn a vanishing KL term into an infinite one.
    a[a < np.finfo(float).tiny] = 0.0
    return a / a.sum()


def object_distribution(probs: Mapping[str, float] | Sequence[float], objects: Sequence) -> np.ndarray:
    """q = P(· | s, r) restricted to the object set Obj and L1-normalised.

    ``probs`` is a mapping object -> probability (``objects`` are its keys, in the
    order wanted: o first, o* left out) or an array indexed by ``objects``
    (integer positions). Raises if an object is missing or the mass is zero.
    """
    objects = list(objects)
    if not objects:
        raise ValueError("objects (Obj) is empty")
    if isinstance(probs, Mapping):
        missing = [o for o in objects if o not in probs]
        if missing:
            raise KeyError(f"no probability for object(s) {missing!r}")
        values = [probs[o] for o in objects]
    else:
        values = np.asarray(probs, dtype=float)[np.asarray(objects, dtype=int)]
    return _prob_vector(values, "object probabilities")


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in nats, ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2; in [0, ln 2].

    Inputs are L1-normalised first (they need not sum to 1). This is the
    *square* of ``scipy.spatial.distance.jensenshannon`` (natural log).
    """
    p = _prob_vector(p, "p")
    q = _prob_vector(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q differ in length ({p.size} vs {q.size})")
    m = 0.5 * (p + q)
    d = 0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum()
    return float(min(max(d, 0.0), LN2))


def js_pitfalls(p, q) -> float:
    """The Pitfalls variant of the distortion: ``js_divergence(p, q) / |Obj| * 100``.

    The Pitfalls code uses ``KLDivLoss(reduction="batchmean")`` on a 1-D
    tensor, which divides each KL by the vector length |Obj|; its tables
    print the value ×100. Report it under its own name, never as D.
    """
    n = np.asarray(p).size
    return js_divergence(p, q) / n * 100.0


def _out(x):
    x = np.asarray(x, dtype=float)
    return float(x) if x.ndim == 0 else x


def round_success(p_a_true, p_a_new, p_b_true, p_b_new):
    """½·1{P_θa(o*) > P_θa(o)} + ½·1{P_θb(o) > P_θb(o*)}.

    ``p_a_*``: after the round-out step a; ``p_b_*``: after the round-back step b;
    ``true`` is o, ``new`` is o*.
    """
    a = np.asarray(p_a_new, dtype=float) > np.asarray(p_a_true, dtype=float)
    b = np.asarray(p_b_true, dtype=float) > np.asarray(p_b_new, dtype=float)
    return _out(0.5 * a + 0.5 * b)


def ignore_rate(p0_others, pb_others) -> float:
    """IR = mean over o' in Obj∖{o} of 1{P_θ0(o') > P_θb(o')} (strict drops only).

    Both vectors list the *other* true objects (o and o* left out), in the same
    order, with unnormalised probabilities. Returns NaN when there are none
    (a 1-to-1 relation: IR is undefined).
    """
    p0 = np.asarray(p0_others, dtype=float).ravel()
    pb = np.asarray(pb_others, dtype=float).ravel()
    if p0.shape != pb.shape:
        raise ValueError(f"p0_others and pb_others differ in length ({p0.size} vs {pb.size})")
    if p0.size == 0:
        return float("nan")
    return float(np.mean(p0 > pb))


def failure_rate(ignore_rates, threshold: float = 0.5, *, nan_policy: str = "omit") -> float:
    """FR = fraction of round edits whose ignore rate is > ``threshold`` (strictly).

    ``nan_policy="omit"`` leaves undefined (NaN) ignore rates out of numerator
    and denominator; ``"raise"`` refuses them. NaN if nothing is left.
    """
    ir = np.asarray(ignore_rates, dtype=float).ravel()
    nan = np.isnan(ir)
    if nan.any():
        if nan_policy == "raise":
            raise ValueError(f"{int(nan.sum())} ignore rate(s) are NaN")
        if nan_policy != "omit":
            raise ValueError(f"nan_policy must be 'omit' or 'raise', got {nan_policy!r}")
        ir = ir[~nan]
    if ir.size == 0:
        return float("nan")
    return float(np.mean(ir > threshold))


def conflict_score(p_challenger, p_e1_new):
    """1{P_θb(challenger) > P_θb(o1* | s1, r1)}: the later / implied fact wins over e1's."""
    return _out(np.asarray(p_challenger, dtype=float) > np.asarray(p_e1_new, dtype=float))


def conflict_score_explicit(p_b_e2_new, p_b_e1_new):
    """CS explicit = 1{P_θb(o2* | s2, r2) > P_θb(o1* | s1, r1)}."""
    return conflict_score(p_b_e2_new, p_b_e1_new)


def conflict_score_implicit(p_b_implied, p_b_e1_new):
    """CS implicit = 1{P_θb(implied fact) > P_θb(o1* | s1, r1)}.

    The implied fact: reverse conflicts, o1* under subject o2* and r1;
    composite conflicts, o2* under s1 and r1.
    """
    return conflict_score(p_b_implied, p_b_e1_new)


def _ratio(num, den, name: str):
    den = np.asarray(den, dtype=float)
    if np.any(den <= 0):
        raise ValueError(f"{name} must be > 0")
    return num / den


def conflict_magnitude(p_m, p_b):
    """CM = max((P_θm(o1*) − P_θb(o1*)) / P_θm(o1*), −1); θm right after e1, θb after e2."""
    p_m = np.asarray(p_m, dtype=float)
    return _out(np.maximum(_ratio(p_m - np.asarray(p_b, dtype=float), p_m, "p_m"), -1.0))


def tied_fact_damage(p_ref, pb):
    """TFD = (P_ref(k_f) − P_θb(k_f)) / P_ref(k_f), unclamped (a gain gives a negative value).

    The reference is the caller's choice, and rows name it: θ0, the unedited model, as the
    Pitfalls code computes it (``summarize.py``: ``(fact_0 - fact_2) / fact_0``; the default), or
    θm, the model right after e1, as the paper's equation writes it (protocol ``ref=thetam``).
    """
    p_ref = np.asarray(p_ref, dtype=float)
    return _out(_ratio(p_ref - np.asarray(pb, dtype=float), p_ref, "p_ref"))


__all__ = [
    "object_distribution",
    "js_divergence",
    "js_pitfalls",
    "round_success",
    "ignore_rate",
    "failure_rate",
    "conflict_score",
    "conflict_score_explicit",
    "conflict_score_implicit",
    "conflict_magnitude",
    "tied_fact_damage",
]
