"""Pairwise agreement and Krippendorff's alpha (ordinal) against hand-computed values."""

import math

import pytest

from lmtrain.feedback import agreement


def test_alpha_ordinal_by_hand():
  # Units (values from two raters each): (1, 1), (1, 2), (2, 2), (3, 3).
  # Coincidences o[c][k] (each unit adds 1/(m-1) = 1 per ordered pair):
  #   o11 = 2, o12 = o21 = 1, o22 = 2, o33 = 2; marginals n1 = 3, n2 = 3, n3 = 2, n = 8.
  # Ordinal delta^2: (1,2): (3 + 3 - 3)^2 = 9; (1,3): (3 + 3 + 2 - 2.5)^2 = 30.25;
  #   (2,3): (3 + 2 - 2.5)^2 = 6.25.
  # Observed: 2 * 1 * 9 = 18. Expected: 2 * (3*3*9 + 3*2*30.25 + 3*2*6.25) = 2 * 300 = 600.
  # alpha = 1 - (n - 1) * 18 / 600 = 1 - 7 * 18 / 600 = 0.79.
  alpha = agreement.krippendorff_alpha_ordinal([[1, 1], [1, 2], [2, 2], [3, 3]])
  assert alpha == pytest.approx(0.79)


def test_alpha_ordinal_matches_krippendorffs_published_example():
  # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units,
  # missing values; the paper's ordinal alpha is 0.815.
  observers = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3",
               ". 3 3 3 2 3 4 2 2 5 1 .", "1 2 3 3 2 4 4 1 2 5 1 ."]
  columns = zip(*(row.split() for row in observers))
  units = [[int(v) for v in column if v != "."] for column in columns]
  assert agreement.krippendorff_alpha_ordinal(units) == pytest.approx(0.8154, abs=1e-4)


def test_alpha_edges():
  assert agreement.krippendorff_alpha_ordinal([[1, 1], [2, 2], [3, 3]]) == 1.0
  # Two units in perfect disagreement: o12 = o21 = 2, n1 = n2 = 2, delta^2 = (4 - 2)^2 = 4;
  # alpha = 1 - 3 * 16 / 32.
  assert agreement.krippendorff_alpha_ordinal([[1, 2], [2, 1]]) == pytest.approx(-0.5)
  # Units with one value are not pairable; no variation at all leaves alpha undefined.
  assert math.isnan(agreement.krippendorff_alpha_ordinal([[1], [2]]))
  assert math.isnan(agreement.krippendorff_alpha_ordinal([[1, 1], [1, 1]]))


def test_pairwise_agreement_by_hand():
  # Task A: the raters agree on (0,1) and (0,2), not on (1,2). Task B: a tie against an order
  # disagrees; the other two pairs agree. Task C has one rater: no comparison.
  tasks = [{"ann": [1, 2, 3], "bob": [1, 3, 2]},
           {"ann": [1, 1, 2], "bob": [1, 2, 3]},
           {"ann": [1, 2]}]
  share, comparisons = agreement.pairwise_agreement(tasks)
  assert comparisons == 6 and share == pytest.approx(4 / 6)


def test_summary_from_labels():
  labels = [{"task_id": 1, "rater_id": 1, "ranking": [1, 2, 3]},
            {"task_id": 1, "rater_id": 2, "ranking": [1, 2, 3]},
            {"task_id": 2, "rater_id": 1, "ranking": [2, 1]}]
  stats = agreement.summary(labels)
  assert stats["tasks"] == 1 and stats["comparisons"] == 3 and stats["agreement"] == 1.0
  assert stats["alpha"] == 1.0
