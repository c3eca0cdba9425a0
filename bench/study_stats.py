"""Intervals for the SmolLM2 studies: t-intervals over seeds and bootstraps over seeds and items.

Two sources of noise decide whether two methods differ: the seed (data order, LIFT's selection) and
the finite sample of held-out problems / texts. The bootstrap here resamples both: seeds of each
method independently, and items (problems or texts) once per replicate for all methods together,
because every method is scored on the same items (a paired design, which narrows differences).
"""
from __future__ import annotations

import math
import random
import statistics

# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); normal beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (low = high = mean for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    lo = samples[int(0.025 * (len(samples) - 1))]
    hi = samples[int(math.ceil(0.975 * (len(samples) - 1)))]
    return lo, hi


def _resampled_mean(per_seed: list[list[float]], seeds: list[int], items: list[int]) -> float:
    """Mean over the resampled seeds of the mean over the resampled items."""
    return statistics.fmean(statistics.fmean(per_seed[s][i] for i in items) for s in seeds)


def bootstrap(groups: dict[str, list[list[float]]], stat, replicates: int = 2000, seed: int = 0):
    """95% percentile interval of ``stat(means)`` under a two-level bootstrap.

    ``groups`` maps a method to its per-seed item scores (each a list over the same items, in the
    same order for every method). Each replicate draws seeds with replacement per method and one
    shared draw of items, and calls ``stat`` with {method: resampled mean}; returns (low, high).
    """
    rng = random.Random(seed)
    n_items = len(next(iter(groups.values()))[0])
    draws = []
    for _ in range(replicates):
        items = [rng.randrange(n_items) for _ in range(n_items)]
        means = {}
        for name, per_seed in groups.items():
            seeds = [rng.randrange(len(per_seed)) for _ in range(len(per_seed))]
            means[name] = _resampled_mean(per_seed, seeds, items)
        draws.append(stat(means))
    return _percentiles(draws)


def ratio_bootstrap(groups: dict[str, list[tuple[list[float], list[float]]]], base: tuple[list[float], list[float]],
                    stat, replicates: int = 2000, seed: int = 0):
    """Like :func:`bootstrap` for perplexity changes: items are texts with (nll sum, token count).

    ``groups`` maps a method to per-seed (nll per text, tokens per text); ``base`` is the base model's.
    ``stat`` gets {method: perplexity change in %} of each replicate, pooled over its resampled texts.
    """
    rng = random.Random(seed)
    base_nll, tokens = base
    n_items = len(base_nll)
    draws = []
    for _ in range(replicates):
        items = [rng.randrange(n_items) for _ in range(n_items)]
        count = sum(tokens[i] for i in items)
        base_ppl = math.exp(sum(base_nll[i] for i in items) / count)
        changes = {}
        for name, per_seed in groups.items():
            seeds = [rng.randrange(len(per_seed)) for _ in range(len(per_seed))]
            ppl = statistics.fmean(math.exp(sum(per_seed[s][0][i] for i in items) / count) for s in seeds)
            changes[name] = 100 * (ppl / base_ppl - 1)
        draws.append(stat(changes))
    return _percentiles(draws)
