"""Run under torchrun by tests/formulas/test_rl_variants.py: each rank computes rmcore.rl.advantages_and_returns
on its half of the rows (whole prompts), its statistics summed over the ranks, and writes what it got."""
import json
import sys

import torch

from rmcore.rl import advantages_and_returns
from rmcore.training.distributed import all_reduce_tensor, init_distributed, shutdown

spec_file, out = sys.argv[1:3]
data = json.loads(open(spec_file).read())
d = init_distributed("cpu")
half = len(data["scores"]) // d.world_size
rows = slice(d.rank * half, (d.rank + 1) * half)
t = {k: torch.tensor(data[k], dtype=torch.float64)[rows] for k in ("mask", "scores", "kl", "values")}
results = []
for case in data["cases"]:
    adv, ret = advantages_and_returns(t["scores"], t["kl"], t["values"], t["mask"], **case,
                                      reduce_sum=all_reduce_tensor)
    results.append([adv.tolist(), ret.tolist()])
with open(f"{out}.rank{d.rank}.json", "w") as f:
    json.dump(results, f)
shutdown()
