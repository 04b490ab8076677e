"""rmcore's ppo.py with ppo.advantage=grpo against TRL's GRPOTrainer: one model, prompts, reward and batch shape.

    pip install -e '.[bench]'                       # TRL 1.16 (never imported by rmcore)
    python bench/grpo_vs_trl.py                     # 8 prompts x 4 samples, 48 new tokens, 3 iterations, 1 run each
    python bench/grpo_vs_trl.py --prompts 2 --k 2 --new-tokens 8 --iterations 2   # a quick look
    python bench/grpo_vs_trl.py --minibatch-order prompts   # rmcore's minibatches of whole groups (not TRL's)

Both sides train SmolLM2-135M-Instruct (models/smollm2-135m-instruct, fp32, CPU) on the first human turn of the
first --prompts records of the shipped HH file, each a single-turn ChatML prompt with configs/small_ppo.yaml's system
prompt (rmcore: data.template=chatml; TRL: conversational prompts through the tokenizer's chat template; the token
ids of one prompt are compared). Every iteration samples --k responses to each of those --prompts prompts at
temperature 1, no top-k/top-p, up to --new-tokens tokens, stopping at EOS only; scores them with `reward` below (a
rule-based length target, the same function on both sides); takes the old log-probs (TRL: a no-grad forward of the
policy; rmcore: the sampler's, ppo.old_logprobs=auto in fp32) and a no-grad forward of the reference; then --epochs
passes of minibatches of 8 samples, one AdamW step each, lr 1e-6 constant, the
KL (k3, beta 0.04) in the loss. Each side runs in its own process (its peak RSS from wait4); its first iteration is
a warm-up, the rest are timed. Printed per timed iteration: samples/s (iteration wall time: sampling, scoring,
forwards, update, and on rmcore the export and checkpoint after the last iteration, also shown without them), generated
tokens/s (real generated tokens / generation time), and loop utilisation = work / wall time / fp32 matmul rate, with
  work = 6 N x (tokens each training forward runs) + 2 N x (tokens the no-grad forwards run + prompt tokens
         prefilled + tokens generated), N = the parameters with the tied LM head counted once; a token runs once
         (padding is not counted; rmcore's packed rows and its prefill run a prompt once for the K samples of it),
  matmul rate = the best of a few 2048x2048 fp32 torch.matmul (2 x 2048^3 FLOP), measured before and after the runs;
and the share of the shape-aware limit: the seconds the iteration's matrix products would take at the rate the
model's own weight matrices reach here at the loop's shapes (a decoding step multiplies them by one row per sample,
a minibatch's forward by ~700 rows: far below 2048^3's rate on a CPU), also measured before and after; then the
rmcore/TRL ratio of samples/s over the pairs of timed iterations (median and range).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the file the repository ships, or under $RMCORE_DATA (as rmcore.data.files.data_root)
DATA = Path(os.environ.get("RMCORE_DATA") or REPO / "data") / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
sys.path.insert(0, str(REPO / "bench"))
from rm_vs_trl import cpu_line, timed  # noqa: E402  (one way to measure a child's time and peak RSS)

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # configs/small_ppo.yaml's
BETA, LR = 0.04, 1e-6
GROUPED = ("minibatch composition: rmcore keeps each prompt's K samples in one minibatch "
           "(ppo.minibatch_order=prompts), TRL's hold shuffled samples; ")


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """0 at 20 words, -1 per 20 words off: deterministic text in, so both sides score a response alike."""
    return [-abs(len(r.split()) - 20) / 20 for r in responses]


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """`reward` under TRL's signature: conversational completions are [{"role": "assistant", "content": text}]."""
    return reward(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])


def first_turns(n: int) -> list[str]:
    with gzip.open(DATA, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(n), f)]
    return [t.split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].strip() for t in texts]


def matmul_rate(device: str = "cpu", repeats: int = 5) -> float:
    import torch
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = []
    for _ in range(repeats + 1):  # the first a warm-up, and never the best
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(seconds[1:])


def matrix_rates(a, rows: dict[str, int], n_params: int) -> dict[str, float]:
    """For each of `rows`, the FLOP/s (2 N per row) of one pass of that many activation rows through the model's
    weight matrices, random values (speed does not depend on them): the rate a forward over that many tokens at once
    can reach here, weights read from memory as in the loop (bench/generate.py's weight_pass_time)."""
    import torch
    from generate import weight_pass_time  # imported here: the children, TRL's included, never load rmcore for it
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model)).to(a.device)
    return {k: 2 * n_params * r / weight_pass_time(model, r, torch.float32) for k, r in rows.items()}


def shape_limit(it: dict, n_params: int, rates: dict[str, float]) -> float:
    """Seconds an iteration's matrix products take at the rate this machine reaches for their shapes (matrix_rates):
    the prefill at the prefill's rows, each decoding step at one row per sample, the no-grad forwards and the
    training forward and backward (3 products per weight) at a minibatch's rows. Nothing else (attention, the
    sampler, AdamW, saving) is counted: at the rates measured, no loop can take less (a VM's rates move by ~10%
    from minute to minute, so the limit is good to about that)."""
    return 2 * n_params * (it["prompt_tokens"] / rates["prefill"] + it["generated_tokens"] / rates["decode"]
                           + (it["forward_tokens"] + 3 * it["trained_tokens"]) / rates["minibatch"])


def clocked(fn, its: list[dict], key: str):
    """fn, its seconds added to the current iteration's its[-1][key]."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        its[-1][key] += time.perf_counter() - t0
        return out
    return wrapper


def minibatch(a) -> int:
    n = a.prompts * a.k
    mb = min(8, n)
    if n % mb:
        raise SystemExit(f"--prompts x --k = {n} samples: expected a multiple of 8 (or fewer than 8)")
    return mb


def ppo_overrides(a, run_dir: Path) -> list[str]:
    n = a.prompts * a.k
    return [f"run.init_from={a.model}", f"run.out_dir={run_dir}", "run.precision=fp32", f"run.device={a.device}",
            "run.seed=0", "run.export=false", "logging.progress=false",
            f"data.train=['{Path(a.out).resolve() / 'prompts.jsonl'}']", "data.template=chatml",
            f"data.system_prompt={json.dumps(SYSTEM)}", "ppo.reward=bench.grpo_vs_trl:reward", "ppo.advantage=grpo",
            f"ppo.iterations={a.iterations}", f"ppo.prompts_per_iter={a.prompts}", f"ppo.k={a.k}",
            f"ppo.max_new_tokens={a.new_tokens}", "ppo.max_prompt_tokens=4096", "ppo.temperature=1.0", "ppo.top_k=0",
            "ppo.top_p=1.0", "ppo.stop_strings=[]", f"ppo.generation_batch_size={n}", "ppo.eval_prompts=0",
            f"ppo.beta={BETA}", "ppo.kl_in=loss", "ppo.loss_aggregation=token_mean", f"optim.lr={LR}",
            # one checkpoint and one export, after the last iteration (counted as saving), as a user who wants
            # the run's result and a resumable end sets it; TRL saves nothing here
            f"ppo.save_every={a.iterations}", f"ppo.export_every={a.iterations}",
            # keep (the bench's default): glibc keeps freed pages for the next step instead of faulting them in again
            # (README, host memory); --host-memory release measures the training scripts' default
            f"run.host_memory={a.host_memory}",
            "optim.schedule=constant", f"optim.epochs={a.epochs}", f"optim.micro_batch_size={minibatch(a)}",
            "optim.grad_accum=1", f"ppo.minibatch_order={a.minibatch_order}"]


def trl_settings(a) -> dict:
    mb = minibatch(a)
    steps = a.prompts * a.k // mb  # optimizer steps per pass over one generation
    # gradient_accumulation_steps=1: every training step is an optimizer step; steps_per_generation slices one
    # generation of prompts x k samples into `steps` minibatches, and num_iterations passes over them
    return dict(per_device_train_batch_size=mb, gradient_accumulation_steps=1, steps_per_generation=steps,
                num_generations=a.k, num_iterations=a.epochs, max_steps=a.iterations * steps * a.epochs,
                max_completion_length=a.new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=BETA, learning_rate=LR,
                lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False, use_cpu=a.device == "cpu",
                report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)


def rmcore_child(a, run_dir: Path):
    """ppo.py's main as `python ppo.py` runs it, with timers and token counters around the loop's steps."""
    sys.path.insert(0, str(REPO))
    import torch

    from rmcore.align import rollouts
    from rmcore.align.iteration import AlignRun
    from rmcore.training.launch import run_script

    import ppo
    its: list[dict] = []

    def counted(fn):  # the tokens each forward of the policy or the reference runs, into the iteration's count
        def wrapper(model, batch, *args, **kwargs):
            # on a CPU response_logits runs one packed row (each prompt once); elsewhere the padded batch's real tokens
            run = (sum(rollouts.packed_row(batch).seq_lens) if batch.input_ids.device.type == "cpu"
                   else int(batch.attention_mask.sum()))
            its[-1]["trained_tokens" if torch.is_grad_enabled() else "forward_tokens"] += run
            return fn(model, batch, *args, **kwargs)
        return wrapper

    sample, end = AlignRun.sample, AlignRun.end_iteration

    def sampled(self, policy, **kwargs):
        its.append(dict(start=time.perf_counter(), trained_tokens=0, forward_tokens=0, score=0.0))
        out = sample(self, policy, **kwargs)
        its[-1].update(gen=time.perf_counter() - its[-1]["start"], samples=len(out.tokens),
                       # one generation batch (ppo.generation_batch_size = all samples): each prompt prefilled once
                       prompt_tokens=sum(len(self.prompts.ids[i]) for i in set(out.prompt_index)),
                       generated_tokens=sum(map(len, out.tokens)))
        return out

    def ended(self, *args, **kwargs):
        t0 = time.perf_counter()
        end(self, *args, **kwargs)
        its[-1].update(end=time.perf_counter(), save=time.perf_counter() - t0)

    AlignRun.sample, AlignRun.score, AlignRun.end_iteration = sampled, clocked(AlignRun.score, its, "score"), ended
    # the update's forwards (ppo's name) and the old and reference log-probs' (rollouts' own, which they call)
    ppo.response_logits = rollouts.response_logits = counted(rollouts.response_logits)
    run_script(ppo.main, ppo_overrides(a, run_dir))
    history = json.loads((run_dir / "ppo_history.json").read_text())
    # the loop's own timings where it logs them (time/*), else the wrappers': sampling, end_iteration, and the
    # wall time between the ends of successive iterations
    logged = {key: "time/" + name for key, name in (("gen", "sample"), ("save", "save"), ("wall", "iteration"))
              if all("time/" + name in h for h in history)}
    for i, (it, h) in enumerate(zip(its, history)):
        it["wall"] = it["end"] - (its[i - 1]["end"] if i else it["start"])
        it.update({key: h[name] for key, name in logged.items()})
    # each run writes a full checkpoint (policy + AdamW) and an export per iteration: GBs not needed for the figures
    for sub in ("checkpoints", "iterations"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    timings = f"{', '.join(f'{k} from {v}' for k, v in logged.items()) or 'none'} logged by ppo.py; the rest bench's"
    print(json.dumps({"iterations": its, "timings": timings}))


def trl_child(a, out: Path):
    """TRL's GRPOTrainer with the shared settings; prints one JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    its: list[dict] = []
    args = GRPOConfig(output_dir=str(out), **trl_settings(a))
    cycle = args.steps_per_generation * args.num_iterations  # optimizer steps per generation

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cycle == 0:
                now = time.perf_counter()
                its[-1].update(wall=now - self.last, save=0.0)
                self.last = now

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(a.device)
    dataset = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]}
                                 for p in first_turns(a.prompts)])
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    # generation happens inside the training step: time and count it by wrapping the trainer's own methods
    generate, logps = trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies

    def generated(prompt_ids, *args, **kwargs):
        its.append(dict(trained_tokens=0, forward_tokens=0, score=0.0, samples=len(prompt_ids),
                        prompt_tokens=sum(map(len, prompt_ids))))
        t0 = time.perf_counter()
        completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
        its[-1].update(gen=time.perf_counter() - t0, generated_tokens=sum(map(len, completion_ids)))
        return completion_ids, logprobs

    def forward(model, input_ids, attention_mask, *args, **kwargs):
        its[-1]["trained_tokens" if torch.is_grad_enabled() else "forward_tokens"] += int(attention_mask.sum())
        return logps(model, input_ids, attention_mask, *args, **kwargs)

    trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies = generated, forward
    trainer._calculate_rewards = clocked(trainer._calculate_rewards, its, "score")
    trainer.train()
    print(json.dumps({"iterations": its, "timings": "TrainerCallback + wrapped GRPOTrainer methods"}))


def run_side(a, side: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", side, str(out / f"{side}_{time.time_ns()}"), "--model", a.model,
           "--out", a.out, "--prompts", str(a.prompts), "--k", str(a.k), "--new-tokens", str(a.new_tokens),
           "--iterations", str(a.iterations), "--epochs", str(a.epochs), "--device", a.device,
           "--host-memory", a.host_memory, "--minibatch-order", a.minibatch_order]
    stdout, rss = timed(cmd)
    return {**json.loads(stdout.strip().splitlines()[-1]), "rss_gb": rss}


def prepare(a, out: Path) -> tuple[bool, int, int]:
    """The prompts file rmcore reads; (whether both sides render one prompt to the same ids, its length, N)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rmcore.data.template import ASSISTANT, HUMAN, Template
    from rmcore.tokenizer import Tokenizer
    out.mkdir(parents=True, exist_ok=True)
    turns = first_turns(a.prompts)
    # the pairs format (prompt used as written); rmcore's prompt pool reads only the prompt, the pair is a filler
    with open(out / "prompts.jsonl", "w") as f:
        for t in turns:
            f.write(json.dumps({"prompt": f"{HUMAN} {t}{ASSISTANT}", "chosen": " a", "rejected": " b"}) + "\n")
    tok = Tokenizer.from_pretrained(a.model)
    template = Template.chatml(SYSTEM)
    ours = tok.encode(template.render(f"{HUMAN} {turns[0]}{ASSISTANT}"), bos=True, specials=template.special_tokens)
    theirs = AutoTokenizer.from_pretrained(a.model).apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": turns[0]}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model))
    return list(ours) == list(theirs), len(ours), sum(p.numel() for p in model.parameters())  # tied: counted once


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    p.add_argument("--prompts", type=int, default=8, help="prompts per iteration (the whole prompt pool)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--iterations", type=int, default=3, help="the first is a warm-up")
    p.add_argument("--epochs", type=int, default=2, help="passes over each iteration's samples")
    p.add_argument("--repeats", type=int, default=1, help="alternations rmcore, TRL, rmcore, TRL, ...")
    p.add_argument("--out", default="runs/bench/grpo_vs_trl")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on both sides; TRL without vLLM)")
    p.add_argument("--host-memory", default="keep", choices=["keep", "release", "glibc"],
                   help="rmcore's run.host_memory (TRL's process keeps glibc's own policy)")
    p.add_argument("--minibatch-order", default="samples", choices=["samples", "prompts"],
                   help="rmcore's ppo.minibatch_order: samples shuffled (TRL's, the default) or each prompt's K "
                        "samples together (each minibatch's packed row then runs each prompt once)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.iterations < 2:
        p.error("--iterations: at least 2 (the first is a warm-up)")
    if a.child:
        side, run_dir = a.child
        return (rmcore_child if side == "rmcore" else trl_child)(a, Path(run_dir))
    out = Path(a.out)
    print(cpu_line())
    same, prompt_len, n_params = prepare(a, out)
    mb, settings = minibatch(a), trl_settings(a)
    n = a.prompts * a.k
    print(f"{Path(a.model).name}: N = {n_params / 1e6:.1f}M parameters (tied LM head once), fp32, CPU; {a.prompts} "
          f"prompts x {a.k} samples = {n} per iteration, {a.new_tokens} new tokens max, temperature 1, EOS stops; "
          f"{a.epochs} epochs x {n // mb} minibatches of {mb}, lr {LR:g} constant, beta {BETA} (k3 in the loss)\n"
          f"first prompt rendered to the same {prompt_len} token ids on both sides: {same}\n"
          f"rmcore: python ppo.py {' '.join(ppo_overrides(a, out / 'rmcore_<ns>'))}\n"
          f"TRL: GRPOConfig({', '.join(f'{k}={v!r}' for k, v in settings.items())}): generation_batch_size "
          f"{n}, {n // mb} optimizer steps per pass, {a.epochs} passes per generation\n"
          "Not identical: sampling is rmcore's KV-cache rollout vs transformers' generate (dynamic cache); the chat "
          "template is rmcore's Template.chatml vs the tokenizer's Jinja template (ids compared above); both pad "
          "prompts left and responses right for sampling; rmcore's forwards over the rollout then pack each "
          "micro-batch's samples into one row with each prompt once (CPU), TRL's stay padded; loss aggregation: rmcore "
          "token_mean over each minibatch's real tokens, TRL dapo over the generation's real tokens / "
          "steps_per_generation; minibatch order: rmcore reshuffles every epoch, TRL shuffles once per generation; "
          f"{'' if a.minibatch_order == 'samples' else GROUPED}"
          "AdamW: fused on both sides (TRL: adamw_torch_fused, TrainingArguments' default); TRL's training "
          "forward takes log-probs and entropy from its fused LM head; the old log-probs: rmcore the sampler's "
          "(fp32), TRL a forward pass; rmcore prefills each prompt once for its K samples, TRL's generate K times; "
          "rmcore exports the policy and checkpoints model + AdamW after the last iteration (ppo.save_every, "
          "ppo.export_every; counted as saving), TRL saves nothing "
          "(save_strategy='no'); "
          "the samples differ (other RNGs), so each side's work is counted from its own tokens", flush=True)
    # the rows each kind of product runs at: the prompts prefilled together, one per sample while decoding, a
    # minibatch of full samples (the longest a side's packed or padded minibatch rows are)
    rows = {"prefill": a.prompts * prompt_len, "decode": n, "minibatch": mb * (prompt_len + a.new_tokens)}
    rate_before = matmul_rate(a.device)
    rates_before = matrix_rates(a, rows, n_params)
    runs = {"rmcore": [], "TRL": []}
    for _ in range(a.repeats):
        for side in runs:
            runs[side].append(run_side(a, side, out))
            print(f"{side} run {len(runs[side])} done ({runs[side][-1]['timings']})", flush=True)
    rate_after = matmul_rate(a.device)
    rates_after = matrix_rates(a, rows, n_params)
    rate = max(rate_before, rate_after)
    rates = {k: max(rates_before[k], rates_after[k]) for k in rows}
    print(f"\nfp32 matmul rate (2048^3): {rate_before / 1e9:.1f} GFLOP/s before, {rate_after / 1e9:.1f} after; "
          f"utilisation against the better")
    print("the model's weight matrices at the loop's shapes, GFLOP/s before / after (the better is the shape-aware "
          "limit's): " + "; ".join(f"{k} ({r} rows) {rates_before[k] / 1e9:.1f} / {rates_after[k] / 1e9:.1f}"
                                   for k, r in rows.items()))
    print("| side | run | iteration | samples/s | samples/s w/o saving | generated tokens/s | mean response tokens "
          "| work (TFLOP) | loop utilisation | shape-aware limit (s) | wall (s) | of the shape-aware limit "
          "| peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    speed = {side: [] for side in runs}
    for side, results in runs.items():
        for r, res in enumerate(results):
            for i, it in enumerate(res["iterations"][1:], start=2):
                work = n_params * (6 * it["trained_tokens"] + 2 * (it["forward_tokens"] + it["prompt_tokens"]
                                                                    + it["generated_tokens"]))
                sps, bare = it["samples"] / it["wall"], it["samples"] / (it["wall"] - it["save"])
                speed[side].append((sps, bare))
                limit = shape_limit(it, n_params, rates)
                print(f"| {side} | {r + 1} | {i} | {sps:.2f} | {bare:.2f} | {it['generated_tokens'] / it['gen']:.1f} | "
                      f"{it['generated_tokens'] / it['samples']:.1f} | {work / 1e12:.2f} | "
                      f"{work / it['wall'] / rate:.1%} | {limit:.1f} | {it['wall']:.1f} | {limit / it['wall']:.1%} | "
                      f"{res['rss_gb']:.2f} |")
    for j, what in enumerate(["samples/s", "samples/s (rmcore without saving)"]):
        ratios = [mine[j] / theirs[0] for mine, theirs in zip(speed["rmcore"], speed["TRL"])]
        print(f"rmcore/TRL {what}: median {statistics.median(ratios):.2f}, range {min(ratios):.2f} to "
              f"{max(ratios):.2f} over {len(ratios)} pairs of timed iterations")


if __name__ == "__main__":
    main()
