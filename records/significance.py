"""The statistics reviewers use on records, without scipy: Student-t CDF and quantile, the one-sided test of
an improvement over the seeds, and a paired confidence interval for a difference of two bpb ratios."""

from __future__ import annotations

import math

# -----------------------------
# STUDENT-T DISTRIBUTION
# -----------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        # even step, then odd step of the fraction's terms
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a} b={b} x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def student_t_ppf(q: float, df: float) -> float:
    """The t with P(T <= t) = q, by bisection on the CDF."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level {q} outside (0, 1)")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > q:
        lo *= 2.0
    while student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# -----------------------------
# TESTS AND INTERVALS
# -----------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def improvement_test(val_losses: list[float], best_val_loss: float, min_improvement: float = 0.005,
                     alpha: float = 0.01) -> dict:
    """One-sample, one-sided t-test over the seeds' val_loss (nats).

    H0: mean >= best - min_improvement; H1: mean < best - min_improvement.
    t = (mean - (best - min_improvement)) / (s / sqrt(n)), df = n - 1, p = P(T_df <= t).
    """
    n = len(val_losses)
    if n < 2:
        raise ValueError(f"the test needs at least 2 seeds, got {n}")
    mean, std = mean_std(val_losses)
    threshold = best_val_loss - min_improvement
    se = std / math.sqrt(n)
    if se > 0:
        t = (mean - threshold) / se
    else:  # identical seeds: the sign alone decides
        t = -math.inf if mean < threshold else (math.inf if mean > threshold else 0.0)
    p = student_t_cdf(t, n - 1)
    return {"n": n, "mean": mean, "std": std, "se": se, "best_val_loss": best_val_loss,
            "min_improvement": min_improvement, "threshold": threshold, "t": t, "df": n - 1,
            "p_value": p, "alpha": alpha, "significant": p < alpha}


def paired_ratio_ci(numerators, denominators, level: float = 0.95) -> dict:
    """Interval for D = sum(num) / sum(den) over n paired units (documents or blocks of documents).

    Linearized (ratio estimator): r_k = num_k - D den_k, se(D) = sqrt(n / (n - 1) * sum r_k^2) / sum den,
    and D +- t_{n-1} se. num_k is the unit's loss difference in bits, den_k its bytes, so D is in bpb.
    """
    num = [float(v) for v in numerators]
    den = [float(v) for v in denominators]
    n = len(num)
    total_den = sum(den)
    if n < 2 or total_den <= 0:
        raise ValueError(f"need at least 2 units with bytes, got {n} units and {total_den} bytes")
    d = sum(num) / total_den
    sum_r2 = sum((a - d * b) ** 2 for a, b in zip(num, den))
    se = math.sqrt(n / (n - 1) * sum_r2) / total_den
    q = student_t_ppf(0.5 + level / 2.0, n - 1)
    return {"diff": d, "se": se, "lo": d - q * se, "hi": d + q * se, "level": level, "units": n, "t_quantile": q}
