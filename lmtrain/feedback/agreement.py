"""Inter-rater agreement on the tasks two raters ranked: pairwise agreement and Krippendorff's alpha.

A ranking is a rank per response (1 = best, ties equal). Pairwise agreement is the share of
(rater pair, response pair) comparisons in which both raters order the two responses the same way,
a tie counting as an order of its own. Krippendorff's alpha treats each (task, response) as a unit
and the ranks the raters gave it as ordinal values; it is computed from the coincidence matrix
(Krippendorff, "Computing Krippendorff's Alpha-Reliability", 2011):

  o[c][k] = sum over units u of (pairs of values (c, k) from different raters in u) / (m_u - 1)
  n_c     = sum_k o[c][k],   n = sum_c n_c
  ordinal delta^2(c, k) = (sum of n_g for g from c to k  -  (n_c + n_k) / 2) ** 2
  alpha   = 1 - (n - 1) * sum o[c][k] delta^2(c, k) / sum n_c n_k delta^2(c, k)

Units with fewer than two values are not pairable and are left out.
"""

import collections
import itertools
from typing import Hashable, Sequence


def _order(a: int, b: int) -> int:
  return (a > b) - (a < b)


def pairwise_agreement(tasks: Sequence[dict[Hashable, Sequence[int]]]) -> tuple[float, int]:
  """(share of agreeing comparisons, number of comparisons) over tasks given as {rater: ranking};
  nan when no task has two raters."""
  agree = total = 0
  for by_rater in tasks:
    for first, second in itertools.combinations(by_rater.values(), 2):
      for i, j in itertools.combinations(range(len(first)), 2):
        agree += _order(first[i], first[j]) == _order(second[i], second[j])
        total += 1
  return (agree / total if total else float("nan")), total


def krippendorff_alpha_ordinal(units: Sequence[Sequence[int]]) -> float:
  """Ordinal alpha of units, each the list of values its raters gave (missing ones left out);
  nan when there is no pairable unit or no variation at all."""
  coincidences = collections.Counter()
  for values in units:
    m = len(values)
    if m < 2:
      continue
    for a, b in itertools.permutations(range(m), 2):
      coincidences[values[a], values[b]] += 1 / (m - 1)
  marginals = collections.Counter()
  for (c, _), weight in coincidences.items():
    marginals[c] += weight
  n = sum(marginals.values())
  categories = sorted(marginals)
  position = {c: i for i, c in enumerate(categories)}
  # Running sums of the marginals, so that the sum over g in [c, k] is one subtraction.
  cumulative = list(itertools.accumulate(marginals[c] for c in categories))

  def delta2(c, k):
    lo, hi = sorted((position[c], position[k]))
    between = cumulative[hi] - (cumulative[lo - 1] if lo else 0)
    return (between - (marginals[c] + marginals[k]) / 2) ** 2

  observed = sum(w * delta2(c, k) for (c, k), w in coincidences.items())
  expected = sum(marginals[c] * marginals[k] * delta2(c, k) for c in categories
                 for k in categories)
  if n < 2 or expected == 0:
    return float("nan")
  return 1 - (n - 1) * observed / expected


def ranking_units(tasks: Sequence[dict[Hashable, Sequence[int]]]) -> list[list[int]]:
  """Alpha's units from rankings: one per (task, response), holding each rater's rank for it."""
  units = []
  for by_rater in tasks:
    rankings = list(by_rater.values())
    for i in range(len(rankings[0]) if rankings else 0):
      units.append([ranking[i] for ranking in rankings])
  return units


def summary(labels: Sequence[dict]) -> dict:
  """Agreement over the tasks with at least two rankings, from `db.all_labels` rows."""
  by_task = collections.defaultdict(dict)
  for label in labels:
    by_task[label["task_id"]][label["rater_id"]] = label["ranking"]
  shared = [rankings for rankings in by_task.values() if len(rankings) >= 2]
  agreement, comparisons = pairwise_agreement(shared)
  return {"tasks": len(shared), "comparisons": comparisons, "agreement": agreement,
          "alpha": krippendorff_alpha_ordinal(ranking_units(shared))}
