"""The statistics reviewers use on records, without scipy: Student-t CDF and quantile, the two record rules
(`readme`: one-sample test of a 0.005-nat improvement at p < 0.01; `welch`: two-sample test against the previous
record's seeds at p < 0.25), and a paired confidence interval for a difference of two bpb ratios."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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

README_MIN_IMPROVEMENT_NATS = 0.005  # readme rule: a new record beats the previous one by this much in val_loss ...
README_ALPHA = 0.01  # ... at p below this, one-sided, over the seeds
WELCH_ALPHA = 0.25  # welch rule: below the previous record's seeds at p below this


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def improvement_test(val_losses: list[float], best_val_loss: float,
                     min_improvement: float = README_MIN_IMPROVEMENT_NATS, alpha: float = README_ALPHA) -> dict:
    """One-sample, one-sided t-test over the seeds' val_loss (nats): the `readme` rule.

    H0: mean >= best - min_improvement; H1: mean < best - min_improvement.
    t = (mean - (best - min_improvement)) / (s / sqrt(n)), df = n - 1, p = P(T_df <= t).
    """
    n = len(val_losses)
    if n < 2:
        raise ValueError(f"the readme rule needs at least 2 seeds, got {n}")
    mean, std = mean_std(val_losses)
    threshold = best_val_loss - min_improvement
    se = std / math.sqrt(n)
    t = _t_statistic(mean - threshold, se)
    p = student_t_cdf(t, n - 1)
    return {"rule": "readme", "n": n, "mean": mean, "std": std, "se": se, "best_val_loss": best_val_loss,
            "min_improvement": min_improvement, "threshold": threshold, "t": t, "df": n - 1,
            "p_value": p, "alpha": alpha, "significant": p < alpha}


def welch_test(val_bpbs: list[float], previous_bpbs: list[float], alpha: float = WELCH_ALPHA) -> dict:
    """One-sided Welch two-sample t-test of the seeds' val_bpb against the previous record's: the `welch` rule.

    H0: mean >= previous mean; H1: mean < previous mean. With v = s^2 / n for each sample,
    t = (mean - previous mean) / sqrt(v1 + v2), df = (v1 + v2)^2 / (v1^2 / (n1 - 1) + v2^2 / (n2 - 1))
    (Welch-Satterthwaite), p = P(T_df <= t).
    """
    n, m = len(val_bpbs), len(previous_bpbs)
    if n < 2 or m < 2:
        raise ValueError(f"the welch rule needs at least 2 seeds on each side, got {n} and {m} previous")
    mean, std = mean_std(val_bpbs)
    prev_mean, prev_std = mean_std(previous_bpbs)
    v1, v2 = std * std / n, prev_std * prev_std / m
    se = math.sqrt(v1 + v2)
    # both samples constant: t is +-inf or 0 and df does not matter; take the equal-variance value n + m - 2
    df = (v1 + v2) ** 2 / (v1 * v1 / (n - 1) + v2 * v2 / (m - 1)) if se > 0 else float(n + m - 2)
    t = _t_statistic(mean - prev_mean, se)
    p = student_t_cdf(t, df)
    return {"rule": "welch", "n": n, "mean": mean, "std": std, "previous": list(previous_bpbs),
            "previous_n": m, "previous_mean": prev_mean, "previous_std": prev_std, "se": se, "t": t, "df": df,
            "p_value": p, "alpha": alpha, "significant": p < alpha}


def _t_statistic(diff: float, se: float) -> float:
    if se > 0:
        return diff / se
    return -math.inf if diff < 0 else (math.inf if diff > 0 else 0.0)  # identical seeds: the sign alone decides


# -----------------------------
# RECORD RULES
# -----------------------------

RULES = {
    "readme": f"the challenge README's rule: mean val_loss below the previous record's by at least "
              f"{README_MIN_IMPROVEMENT_NATS} nats, one-sample one-sided t-test over the seeds, p < {README_ALPHA}",
    "welch": f"the rule the maintainers applied in openai/parameter-golf #1902 and #2146: mean val_bpb below the "
             f"previous record's, one-sided Welch two-sample t-test against its seeds, p < {WELCH_ALPHA}",
}


def apply_rule(rule: str, val_losses: list[float], val_bpbs: list[float], best_val_loss: float | None = None,
               previous_bpbs: list[float] | None = None) -> dict:
    """The named rule's test on the seeds' scores; ValueError names the missing input or too few seeds."""
    if rule == "readme":
        if best_val_loss is None:
            raise ValueError("the readme rule needs the previous record's val_loss (--best-val-loss)")
        return improvement_test(val_losses, best_val_loss)
    if rule == "welch":
        if previous_bpbs is None:
            raise ValueError("the welch rule needs the previous record's seeds' val_bpb (--previous-seeds)")
        return welch_test(val_bpbs, previous_bpbs)
    raise ValueError(f"unknown rule {rule!r}; one of {', '.join(RULES)}")


def describe(result: dict) -> str:
    """One line: the test's numbers and its verdict, as verify prints it and freeze's README states it."""
    verdict = f"one-sided p = {result['p_value']:.6f} {'<' if result['significant'] else '>='} {result['alpha']}"
    if result["rule"] == "readme":
        return (f"t = {result['t']:.4f}, df = {result['df']}, {verdict} (val_loss mean {result['mean']:.8f} of "
                f"{result['n']} seeds vs previous record {result['best_val_loss']:.8f} - "
                f"{result['min_improvement']})")
    return (f"t = {result['t']:.4f}, df = {result['df']:.2f}, {verdict} (val_bpb mean {result['mean']:.8f} "
            f"± {result['std']:.8f} of {result['n']} seeds vs previous {result['previous_mean']:.8f} "
            f"± {result['previous_std']:.8f} of {result['previous_n']})")


def read_previous_seeds(spec: str) -> list[float]:
    """The previous record's per-seed val_bpb: 'x,y,z', a text file of numbers, or its submission.json."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json":
            try:
                return [float(r["val_bpb"]) for r in json.loads(text)["seed_results"]]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{spec}: no seed_results with val_bpb in it") from None
    else:
        text = spec
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise ValueError(f"--previous-seeds {spec!r}: not numbers separated by commas or spaces, nor a file") from None


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
