"""Paired comparisons of two methods' binary outcomes on the same units (episodes).

Every method of a task is rolled out on the same env seeds, so a method and its base form a paired
2x2 table: ``both`` (a), ``method_only`` (b), ``base_only`` (c) and ``neither`` (d) count the pairs
where the event (a success, or a failure) happened for both, the method only, the base only, or
neither. The difference of the two rates is ``(b - c) / n``.

- Interval: Newcombe's method 10 (Newcombe 1998, "Improved confidence intervals for the difference
  between binomial proportions based on paired data", Stat. Med. 17:2635-2650): the Wilson score
  intervals of the two rates combined by "square and add", corrected for the correlation of the
  pairs (phi, with Newcombe's adjustment of its numerator ``ad - bc``).
- p-value: the exact McNemar test, a two-sided binomial test of ``b`` successes in ``b + c``
  discordant pairs with p = 0.5 (p = 1 when there is no discordant pair).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from difftori.eval.results import Z95, wilson_interval
from scipy.stats import binomtest


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar p-value: two-sided binomial test of ``b`` in ``b + c`` trials, p = 0.5."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def newcombe_paired_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998) method 10 interval for ``p1 - p2 = (b - c) / n`` of a paired 2x2 table.

    ``p1 = (a + b) / n`` and ``p2 = (a + c) / n``; ``(l1, u1)``, ``(l2, u2)`` are their Wilson
    score intervals. With ``phi = C / sqrt((a+b)(c+d)(a+c)(b+d))`` (0 if a margin is 0), where
    ``C = ad - bc - n/2`` if ``ad - bc > n/2``, 0 if ``0 <= ad - bc <= n/2``, else ``ad - bc``:
    ``L = D - sqrt(dl1^2 - 2 phi dl1 du2 + du2^2)``, ``U = D + sqrt(du1^2 - 2 phi du1 dl2 + dl2^2)``
    with ``dl1 = p1 - l1``, ``du1 = u1 - p1``, ``dl2 = p2 - l2``, ``du2 = u2 - p2``.
    """
    n = a + b + c + d
    if n == 0:
        raise ValueError("no pairs")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    numerator = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = numerator / math.sqrt(margins) if margins > 0 else 0.0
    dl1, du1, dl2, du2 = p1 - l1, u1 - p1, p2 - l2, u2 - p2
    diff = p1 - p2
    lower = diff - math.sqrt(max(0.0, dl1 * dl1 - 2 * phi * dl1 * du2 + du2 * du2))
    upper = diff + math.sqrt(max(0.0, du1 * du1 - 2 * phi * du1 * dl2 + dl2 * dl2))
    return max(-1.0, lower), min(1.0, upper)


@dataclass(frozen=True)
class PairedComparison:
    """The paired 2x2 table of a method against its base (counts of pairs by whose event it was)."""

    both: int
    method_only: int
    base_only: int
    neither: int

    @classmethod
    def from_outcomes(cls, pairs: Iterable[tuple[bool, bool]]) -> PairedComparison:
        """From ``(method_event, base_event)`` per pair."""
        counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
        for m, b in pairs:
            counts[(bool(m), bool(b))] += 1
        return cls(counts[True, True], counts[True, False], counts[False, True], counts[False, False])

    @property
    def n(self) -> int:
        return self.both + self.method_only + self.base_only + self.neither

    @property
    def method_rate(self) -> float:
        return (self.both + self.method_only) / self.n

    @property
    def base_rate(self) -> float:
        return (self.both + self.base_only) / self.n

    @property
    def diff(self) -> float:
        """Method rate minus base rate."""
        return (self.method_only - self.base_only) / self.n

    def interval(self, z: float = Z95) -> tuple[float, float]:
        """Newcombe's method 10 interval of :attr:`diff` (95% by default)."""
        return newcombe_paired_interval(self.both, self.method_only, self.base_only, self.neither, z)

    @property
    def p_value(self) -> float:
        """Exact McNemar p-value."""
        return mcnemar_exact(self.method_only, self.base_only)
