"""ppo.minibatch_order: one epoch's order of a rank's samples (rmcore.align.rollouts.EPOCH_ORDERS)."""
import numpy as np
import torch

from rmcore.align.rollouts import EPOCH_ORDERS, pack, packed_row


def prompt_major(prompts: int, k: int) -> list[int]:
    """Samples.prompt_index of a rollout: sample j of prompt i at row i * k + j."""
    return [i for i in range(prompts) for _ in range(k)]


def test_samples_order_is_the_permutation_runs_drew_before_the_setting():
    """The default draws exactly what ppo.py drew before minibatch_order existed, so earlier runs resume and repeat."""
    for key in ([0, 0, 0, 0], [3, 2, 1, 0]):
        want = np.random.default_rng(key).permutation(32)
        got = EPOCH_ORDERS["samples"](prompt_major(8, 4), np.random.default_rng(key))
        assert got.tolist() == want.tolist()


def test_prompts_order_keeps_each_prompts_samples_together_and_shuffles_the_prompts():
    """Every sample once; each prompt's samples consecutive and in rollout order, so minibatches of 2 x K samples hold
    2 whole groups; the prompts' order changes with the key (compared against a brute-force regrouping)."""
    index = prompt_major(8, 4)
    orders = set()
    for seed in range(5):
        order = EPOCH_ORDERS["prompts"](index, np.random.default_rng(seed)).tolist()
        assert sorted(order) == list(range(32))
        for start in range(0, 32, 8):
            rows = order[start:start + 8]
            groups = [rows[:4], rows[4:]]
            for group in groups:
                assert len({index[r] for r in group}) == 1
                assert group == sorted(group)  # rollout order within the group
        orders.add(tuple(index[r] for r in order[::4]))
    assert len(orders) > 1


def test_prompts_order_groups_a_prompt_drawn_in_two_places():
    """Samples of one prompt that are not adjacent in the rollout (a prompt drawn twice) end up together."""
    index = [7, 7, 2, 2, 7, 7]
    for seed in range(4):
        order = EPOCH_ORDERS["prompts"](index, np.random.default_rng(seed)).tolist()
        assert sorted(order) == list(range(6))
        assert order in ([0, 1, 4, 5, 2, 3], [2, 3, 0, 1, 4, 5])


def test_a_minibatch_of_whole_groups_runs_each_prompt_once():
    """The work the setting saves: the packed row of a minibatch of 2 whole groups of 4 holds 2 prompts, that of the
    same 8 samples' shuffled counterpart up to 8; both hold every response token once."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (10 + i,), generator=g).tolist() for i in range(8)]
    index = prompt_major(8, 4)
    responses = [torch.randint(3, 90, (5,), generator=g).tolist() for _ in index]
    for name, most_prompts in (("prompts", 2), ("samples", 8)):
        order = EPOCH_ORDERS[name](index, np.random.default_rng(1)).tolist()
        for start in range(0, 32, 8):
            rows = order[start:start + 8]
            row = packed_row(pack([prompts[index[r]] for r in rows], [responses[r] for r in rows], pad_id=0))
            distinct = {index[r] for r in rows}
            assert row.input_ids.shape[1] == sum(len(prompts[p]) for p in distinct) + 5 * 8
            assert len(distinct) <= most_prompts
            if name == "prompts":
                assert len(distinct) == 2
