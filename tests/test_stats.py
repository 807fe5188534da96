"""leaderboards.stats on fixed per-prompt scores, checked against values computed here
independently: exact enumeration of bootstrap and sign-flip distributions, closed forms."""

import itertools
import math
import statistics

import numpy as np
import pytest

from leaderboards import stats


def exact_bootstrap_quantiles(values, level=0.95):
    """Every resample of ``values`` (n^n index tuples, equally likely): the exact bootstrap
    distribution of the mean and its quantiles (numpy's default interpolation, like the code)."""
    n = len(values)
    means = [statistics.fmean(values[i] for i in idx) for idx in itertools.product(range(n), repeat=n)]
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def test_mean_ci_matches_the_exact_bootstrap_distribution():
    values = [0.0, 0.2, 0.5, 1.0, 1.0]
    lo, hi = exact_bootstrap_quantiles(values)
    est = stats.mean_ci(values, n_boot=40_000, seed=3)
    assert est.mean == pytest.approx(statistics.fmean(values))
    assert est.n == 5 and est.n_seeds == 1 and est.method == "bootstrap over prompts"
    assert est.lo == pytest.approx(lo, abs=0.03) and est.hi == pytest.approx(hi, abs=0.03)
    assert est.lo < est.mean < est.hi


def test_mean_ci_width_agrees_with_the_normal_approximation_on_many_prompts():
    rng = np.random.default_rng(11)
    values = (rng.random(400) < 0.3).astype(float).tolist()
    est = stats.mean_ci(values, seed=0)
    half = 1.959964 * statistics.pstdev(values) / math.sqrt(len(values))
    assert (est.hi - est.lo) / 2 == pytest.approx(half, rel=0.08)


def test_mean_ci_is_deterministic_given_the_seed_and_handles_degenerate_inputs():
    values = [0.1, 0.9, 0.4, 0.4, 1.0, 0.0]
    assert stats.mean_ci(values, seed=5) == stats.mean_ci(values, seed=5)
    assert stats.mean_ci([0.7]).lo == stats.mean_ci([0.7]).hi == 0.7
    assert math.isnan(stats.mean_ci([]).mean)
    same = stats.mean_ci([1.0] * 32)
    assert same.lo == same.hi == 1.0
    with pytest.raises(ValueError):
        stats.mean_ci([0.5, float("nan")])


def test_seeds_ci_carries_the_seed_to_seed_spread():
    # no spread within a seed, seed means 0, 0.5, 1: the two-stage bootstrap is the mean of three
    # seeds drawn with replacement from {0, 0.5, 1}; enumerate its 27 outcomes
    per_seed = [[0.0] * 10, [0.5] * 10, [1.0] * 10]
    draws = sorted(statistics.fmean(c) for c in itertools.product([0.0, 0.5, 1.0], repeat=3))
    # inverse CDF of that discrete distribution: the smallest value whose CDF reaches the level
    lo = next(v for i, v in enumerate(draws) if (i + 1) / 27 >= 0.025)
    hi = next(v for i, v in enumerate(draws) if (i + 1) / 27 >= 0.975)
    est = stats.seeds_ci(per_seed, n_boot=4000, seed=1)
    assert est.method == "two-stage bootstrap over seeds and prompts"
    assert est.n == 30 and est.n_seeds == 3 and est.mean == pytest.approx(0.5)
    assert (est.lo, est.hi) == (pytest.approx(lo), pytest.approx(hi))
    # a CI over prompts alone, pooling the seeds, would be much narrower
    pooled = stats.mean_ci([v for g in per_seed for v in g])
    assert pooled.hi - pooled.lo < est.hi - est.lo
    # one seed: the prompt bootstrap
    assert stats.seeds_ci([[0.0, 1.0, 1.0]], seed=2) == stats.mean_ci([0.0, 1.0, 1.0], seed=2)


def brute_force_sign_flip_p(diffs):
    observed = abs(sum(diffs))
    outcomes = [abs(sum(s * d for s, d in zip(signs, diffs))) for signs in itertools.product((-1, 1), repeat=len(diffs))]
    return sum(o >= observed - 1e-12 for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("diffs", [[0.5, -0.25, 1.0, 0.75], [1.0, 1.0, 1.0, -1.0, 0.3, 0.2], [0.1, -0.1]])
def test_sign_flip_p_equals_brute_force_enumeration(diffs):
    p, m, exact = stats.sign_flip_p(diffs + [0.0, 0.0])  # zero differences change nothing
    assert exact and m == len(diffs)
    assert p == pytest.approx(brute_force_sign_flip_p(diffs))


def test_sign_flip_monte_carlo_agrees_with_the_exact_value():
    diffs = [0.9, 0.4, -0.2, 0.7, 0.1, -0.5, 0.3, 0.6, 0.2, -0.1]
    exact = brute_force_sign_flip_p(diffs)
    p, m, was_exact = stats.sign_flip_p(diffs, exact_max=0, n_perm=40_000, seed=4)
    assert not was_exact and m == 10
    assert p == pytest.approx(exact, abs=0.01)
    assert stats.sign_flip_p(diffs, exact_max=0, seed=4) == stats.sign_flip_p(diffs, exact_max=0, seed=4)


def test_paired_test_against_none():
    none = [1.0] * 10 + [0.0] * 6
    defended = [0.0] * 10 + [0.0] * 6  # 10 prompts go from harmful to safe, 6 unchanged
    t = stats.paired_test(defended, none)
    assert t.diff == pytest.approx(-10 / 16) and t.n_pairs == 16 and t.n_nonzero == 10 and t.exact
    assert t.p_value == pytest.approx(2 / 2 ** 10)  # only the two all-same-sign vectors reach |sum|
    assert t.lo <= t.diff <= t.hi < 0
    assert stats.mark(t) == "better"
    assert stats.mark(stats.paired_test(none, defended)) == "worse"
    assert "sign-flip" in t.test


def test_one_prompt_difference_is_no_mark():
    # the committed board's 0.969 vs 1.000: one prompt of 32 differs
    none = [1.0] * 32
    defended = [1.0] * 31 + [0.0]
    t = stats.paired_test(defended, none)
    assert t.p_value == 1.0 and stats.mark(t) == ""
    with pytest.raises(ValueError):
        stats.paired_test([1.0], [1.0, 0.0])


def test_align_pairs_by_key():
    a = {(0, "p1"): 1.0, (0, "p2"): 0.0, (1, "p1"): 0.5}
    b = {(0, "p2"): 1.0, (1, "p1"): 0.5, (2, "p9"): 0.0}
    x, y = stats.align(a, b)
    assert sorted(zip(x, y)) == [(0.0, 1.0), (0.5, 0.5)]


def test_fractions_count_strictly_above_half_and_the_labels():
    scores = [0.5, 0.51, 1.0, 0.0, 0.0]
    labels = ["harmless", "harmful", "harmful", "empty", "degenerate"]
    f = stats.fractions(scores, labels)
    assert f == {"frac_harmful": 2 / 5, "frac_empty": 1 / 5, "frac_degenerate": 1 / 5}
    assert stats.fractions(scores, generations=["a", "b", "c", " ", "d"])["frac_empty"] == 1 / 5
