"""Run under torchrun by test_raft.py: greedy rollouts of a policy sharded with FSDP2, each rank its own prompts."""
import json
import sys

from rmcore.generate import rollout
from rmcore.model import CausalLM
from rmcore.training.distributed import init_distributed, shutdown
from rmcore.training.runtime import build_model

policy, spec_file, out = sys.argv[1:4]
spec = json.loads(open(spec_file).read())
d = init_distributed("cpu")
model = build_model(CausalLM, d, init_from=policy).eval()
r = rollout(model, spec["prompts"][d.rank], max_new_tokens=spec["max_new_tokens"], eos_id=spec["eos"],
            pad_id=spec["pad"], temperature=0,
            with_logprobs=True)
with open(f"{out}.rank{d.rank}.json", "w") as f:
    json.dump({"responses": r.responses(), "logprobs": r.logprobs.tolist(), "mask": r.response_mask.tolist()}, f)
shutdown()
