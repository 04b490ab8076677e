"""Reward-model ensembles: each aggregation against a loop over members, the ensemble against its members called
one by one, and its errors naming the member."""
import math
import statistics

import numpy as np
import pytest

from rmcore.align.rewards import ENSEMBLE_AGGREGATIONS, EnsembleReward, load_ensemble
from rmcore.errors import ConfigError, RewardError


def loop_aggregate(rows, name, lam):
    """The aggregation of each column by Python loops and the statistics module (population std)."""
    out = []
    for j in range(len(rows[0])):
        column = [row[j] for row in rows]
        if name == "mean":
            out.append(sum(column) / len(column))
        elif name == "min":
            out.append(min(column))
        else:
            out.append(statistics.fmean(column) - lam * statistics.pstdev(column))
    return out


@pytest.mark.parametrize("name", list(ENSEMBLE_AGGREGATIONS))
@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_aggregations_equal_a_loop(name, lam):
    rows = np.random.default_rng(0).normal(size=(4, 7)).tolist()
    got = ENSEMBLE_AGGREGATIONS[name](np.array(rows), lam=lam)
    assert np.allclose(got, loop_aggregate(rows, name, lam), atol=1e-12, rtol=0)


def test_an_ensemble_aggregates_its_members_and_keeps_their_disagreement():
    prompts, responses = ["p"] * 3, ["eee one", "two words here", "e"]
    ens = load_ensemble(["helpers.rewards:count_e", "helpers.rewards:count_words"], aggregation="mean_minus_std",
                        lam=0.5)
    members = [[4.0, 2.0, 1.0], [2.0, 3.0, 1.0]]  # count_e, count_words
    assert ens(prompts, responses) == pytest.approx(loop_aggregate(members, "mean_minus_std", 0.5))
    assert ens.disagreement.tolist() == pytest.approx([1.0, 0.5, 0.0])
    worst = EnsembleReward(ens.members, ens.names, aggregation="min")
    assert worst(prompts, responses) == [2.0, 2.0, 1.0]


def test_ensemble_errors_name_the_member_or_the_setting():
    with pytest.raises(RewardError, match="ensemble member helpers.rewards:returns_nan"):
        load_ensemble(["helpers.rewards:count_e", "helpers.rewards:returns_nan"])(["p"], ["x"])
    for kwargs, match in (({"aggregation": "median"}, "median"), ({"lam": -1.0}, "negative")):
        with pytest.raises(ConfigError, match=match):
            load_ensemble(["helpers.rewards:count_e", "helpers.rewards:count_words"], **kwargs)
    with pytest.raises(ConfigError, match="at least 2"):
        load_ensemble(["helpers.rewards:count_e"])
    assert math.isclose(loop_aggregate([[1.0], [3.0]], "mean_minus_std", 1.0)[0], 1.0)
