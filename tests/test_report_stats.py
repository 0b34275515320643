"""Paired statistics (difftori.eval.stats) against values computed independently: the exact McNemar
p from the binomial sum, Newcombe's method 10 from Wilson limits found by root finding, and a
published example."""

import math

import pytest
from difftori.eval.stats import PairedComparison, mcnemar_exact, newcombe_paired_interval
from scipy.optimize import brentq
from scipy.stats import binomtest, norm

Z = norm.ppf(0.975)


def wilson_by_roots(k: int, n: int) -> tuple[float, float]:
    """Wilson score limits as the roots of (k/n - pi)^2 = z^2 pi (1 - pi) / n."""
    p = k / n

    def f(pi: float) -> float:
        return (p - pi) ** 2 - Z * Z * pi * (1 - pi) / n

    tiny = 1e-12  # p itself is a root when k = 0 or k = n: bracket the other one
    lo = 0.0 if k == 0 else brentq(f, 0.0, p if k < n else 1 - tiny, xtol=1e-14)
    hi = 1.0 if k == n else brentq(f, p if k > 0 else tiny, 1.0, xtol=1e-14)
    return lo, hi


def newcombe10_reference(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    """Newcombe (1998), method 10, written out from the paper's definitions."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_by_roots(a + b, n)
    l2, u2 = wilson_by_roots(a + c, n)
    ad_bc = a * d - b * c
    if (a + b) * (c + d) * (a + c) * (b + d) == 0:
        phi = 0.0
    else:
        numerator = ad_bc - n / 2 if ad_bc > n / 2 else (ad_bc if ad_bc < 0 else 0)
        phi = numerator / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    eps = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2 - delta, p1 - p2 + eps


def mcnemar_reference(b: int, c: int) -> float:
    """Two-sided exact binomial p with p = 0.5: twice the smaller tail, at most 1."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def test_newcombe_published_example():
    # Cavo et al. 2012 (complete response before/after consolidation), a, b, c, d = 59, 6, 16, 80:
    # Newcombe square-and-add -0.0621 (95% CI -0.1186 to -0.0046), Fagerland, Lydersen & Laake,
    # "Statistical Analysis of Contingency Tables" (2017), ch. 8.
    lo, hi = newcombe_paired_interval(59, 6, 16, 80)
    assert (lo, hi) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    assert PairedComparison(59, 6, 16, 80).diff == pytest.approx(-0.0621, abs=5e-5)


@pytest.mark.parametrize(
    "a, b, c, d, lo, hi",
    [
        (53, 2, 1, 0, -0.0636, 0.1050),  # n = 56, difference 1/56 = 0.0179
        (36, 12, 2, 0, 0.0569, 0.3404),  # n = 50, difference 0.2
        (1, 1, 7, 12, -0.5069, -0.0256),  # ad - bc < 0
        (8, 6, 2, 4, -0.0804, 0.4396),  # ad - bc = 20 > n/2: the corrected phi
        (30, 0, 0, 0, -0.1135, 0.1135),  # no discordant pair, a margin of 0: phi = 0
        (0, 5, 0, 0, 0.3855, 1.0),  # every pair discordant one way
    ],
)
def test_newcombe_matches_the_formula_with_root_found_wilson_limits(a, b, c, d, lo, hi):
    got = newcombe_paired_interval(a, b, c, d)
    assert got == pytest.approx(newcombe10_reference(a, b, c, d), abs=1e-9)
    assert got == pytest.approx((lo, hi), abs=5e-5)


@pytest.mark.parametrize("a, b, d", [(10, 3, 7), (0, 4, 0), (5, 0, 5), (40, 1, 2)])
def test_newcombe_is_symmetric_about_zero_when_discordant_counts_are_equal(a, b, d):
    lo, hi = newcombe_paired_interval(a, b, b, d)
    assert lo == pytest.approx(-hi, abs=1e-12) and lo < 0 < hi


def test_newcombe_swapping_methods_or_events_mirrors_the_interval():
    lo, hi = newcombe_paired_interval(8, 6, 2, 4)
    assert newcombe_paired_interval(8, 2, 6, 4) == pytest.approx((-hi, -lo))  # method <-> base
    assert newcombe_paired_interval(4, 2, 6, 8) == pytest.approx((-hi, -lo))  # success <-> failure


@pytest.mark.parametrize("b, c", [(0, 0), (6, 2), (2, 6), (9, 0), (0, 1), (10, 10), (3, 12), (25, 11)])
def test_mcnemar_exact(b, c):
    p = mcnemar_exact(b, c)
    assert p == pytest.approx(mcnemar_reference(b, c), rel=1e-12)
    if b + c:
        assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert {(6, 2): 74 / 256, (9, 0): 2 / 512, (0, 0): 1.0}.get((b, c), p) == pytest.approx(p)


def test_paired_comparison_from_outcomes():
    pairs = [(True, True)] * 8 + [(True, False)] * 6 + [(False, True)] * 2 + [(False, False)] * 4
    pc = PairedComparison.from_outcomes(pairs)
    assert (pc.both, pc.method_only, pc.base_only, pc.neither, pc.n) == (8, 6, 2, 4, 20)
    assert (pc.method_rate, pc.base_rate, pc.diff) == pytest.approx((0.7, 0.5, 0.2))
    assert pc.p_value == pytest.approx(74 / 256)
    assert pc.interval() == pytest.approx(newcombe10_reference(8, 6, 2, 4))
    with pytest.raises(ValueError, match="no pairs"):
        newcombe_paired_interval(0, 0, 0, 0)
