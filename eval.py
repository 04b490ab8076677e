"""Evaluate reward models on preference sets, score text, and store reward normalisation statistics.

    python eval.py --model runs/tiny/rm/export --out runs/eval \
        --data "${RMCORE_DATA}/hh-rlhf/harmless-base/test.jsonl.gz[1932:]"
    python eval.py --model A --model B --data X.jsonl --data Y.parquet --out runs/eval   # + generalization table
    python eval.py --model runs/tiny/dpo/export --reference runs/tiny/sft/export --data ...  # a DPO policy's
                                                                  # implicit reward beta * log pi/pi_ref, same report
    python eval.py score --model DIR --input texts.jsonl --output scores.jsonl [--normalize] [--truncate left]
    python eval.py normalize --model DIR [--data FILE ...]     # default data: the model's own training split
    python eval.py compare --policy-a DIR --policy-b DIR --judge RM_DIR --prompts FILE[a:b] --out runs/compare
    python eval.py compare ... --judge PROXY_RM --judge GOLD_RM      # several judges: wins/ties/losses under each
    python eval.py serve --model DIR [--port 8000] [--normalize]  # the reward over HTTP: raft.reward=http://host:8000
    python eval.py label --input runs/compare/compare.json --out runs/label   # blind A/B judgments by people
    python eval.py label --out runs/label --report [--judge RM_DIR]          # their win rates, agreement
    python eval.py toxicity --policy SFT --policy RLHF --prompts FILE --scorer profanity --out runs/toxicity
                                  # RealToxicityPrompts' figures: K = 25 continuations of <= 20 tokens, top-p 0.9
    python eval.py ... --head sum          # a length-disentangled reward model (ODIN): quality (default), length, sum
    torchrun --nproc_per_node=N eval.py ...                     # each rank scores a share of the batches

The report (report.json, report.md, PNG plots) is described in rmcore/eval/report.py; a file of rankings of K
responses (a ranked format) gets pairwise accuracy over ordered pairs and best-of-K accuracy instead
(rmcore/eval/ranked_report.py). score's input is JSONL with a
`text` (a whole transcript) or `prompt` + `response` per line; its output keeps the input order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmcore.align.compare import compare_markdown, compare_policies
from rmcore.align.rewards import checked_rewards, load_reward
from rmcore.align.toxicity import (
    ToxicitySettings,
    evaluate_toxicity,
    plot_toxicity,
    read_toxicity_prompts,
    toxicity_markdown,
)
from rmcore.data.datasets import tokenize_pairs
from rmcore.data.files import iter_records
from rmcore.data.formats import read_examples
from rmcore.data.ranked import is_ranked
from rmcore.data.records import require_data
from rmcore.errors import DataError, UserError, user_errors
from rmcore.eval.human_report import human_markdown, human_report, write_human_report
from rmcore.eval.labeling import LabelTask, items_from_compare, items_from_pairs
from rmcore.eval.plots import plot_report
from rmcore.eval.ranked_report import evaluate_ranked_file, ranked_line
from rmcore.eval.report import evaluate_pairs, markdown_report
from rmcore.eval.scorer import READ_HEADS, ImplicitRewardScorer, RewardScorer, write_normalization
from rmcore.interop.hub import is_hub_id
from rmcore.serving.json_http import serve_until_interrupted, start
from rmcore.serving.label_server import label_handler
from rmcore.serving.reward_server import RewardService, reward_handler
from rmcore.training.distributed import init_distributed, say, shutdown
from rmcore.training.logger import wandb_login


def evaluate(args, dist) -> dict:
    out = Path(args.out)
    if dist.is_main:
        wandb_login(args.wandb)  # before the evaluation, not after it
    results, drops = {}, {}
    for model_dir in args.model:
        if args.reference:  # the models are DPO policies, scored by their implicit reward
            scorer = ImplicitRewardScorer(model_dir, args.reference, beta=args.beta, batch_size=args.batch_size,
                                          dist=dist)
        else:
            scorer = RewardScorer(model_dir, batch_size=args.batch_size, dist=dist, head=args.head)
        name = model_name(model_dir)
        max_length = args.max_length or scorer.config.get("rmcore", {}).get("max_length")
        for spec in args.data:
            if is_ranked([spec], args.format):  # rankings of K responses: pairwise and best-of-K accuracy
                r, drops[spec] = evaluate_ranked_file(scorer, spec, fmt=args.format, skip_bad_lines=args.skip_bad_lines,
                                                      max_length=max_length, show=args.show, dist=dist)
                results.setdefault(name, {})[spec] = r
                say(dist, ranked_line(name, spec, r))
                continue
            examples, report = read_examples([spec], fmt=args.format, skip_bad_lines=args.skip_bad_lines, name=spec)
            pairs = tokenize_pairs(examples, scorer.tokenizer, scorer.template, max_length=max_length, report=report,
                                   keep_examples=True, response_starts=bool(args.reference))
            say(dist, report.summary())
            require_data(len(pairs), report, [spec], f"--data {spec}", "pairs to evaluate")
            drops[spec] = report.to_dict()
            results.setdefault(name, {})[spec] = evaluate_pairs(scorer, pairs, args.show, progress=True)
            r = results[name][spec]
            say(dist, f"{name} on {spec}: accuracy {100 * r['accuracy']:.2f}% over {r['pairs']} pairs "
                   f"(ties {r['ties']}), loss {r['loss']:.4f}, ECE {r['calibration']['ece']:.4f}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"results": results, "data": drops}, indent=2, default=float))
        text = markdown_report(results, drops)
        (out / "report.md").write_text(text)
        plots = []
        try:
            for model, per_model in results.items():
                for i, (spec, r) in enumerate(per_model.items()):
                    plots += plot_report(r, out, f"{model}_data{i}")
        except ImportError:
            print("no plots: matplotlib is missing (pip install 'rmcore[plots]')", file=sys.stderr)
        print(text.split("\n## ", 2)[1] if "\n## " in text else text)
        print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(plots)} plots")
        if args.wandb != "disabled":
            import wandb  # optional (the `wandb` extra): imported only when W&B logging is on
            run = wandb.init(project=args.project, mode=args.wandb, dir=str(out), job_type="eval",
                             config=vars(args))
            run.log({f"{m}/{s}/{k}": v for m, per in results.items() for s, r in per.items()
                     for k, v in r.items() if isinstance(v, (int, float))})
            run.log({p.stem: wandb.Image(str(p)) for p in plots})
            run.finish()
    return results


def score(args, dist):
    if not (Path(args.model).is_dir() or is_hub_id(args.model)):  # any other reward spec: a classifier, a function
        return score_with_reward(args, dist)
    scorer = RewardScorer(args.model, batch_size=args.batch_size, max_length=args.max_length, truncate=args.truncate,
                          dist=dist, head=args.head)
    rewards = scorer.score(read_score_input(args.input), normalize=args.normalize, progress=True)
    if dist.is_main:
        write_scores(args.output, rewards)
        used = f"normalised with {scorer.normalization()}" if args.normalize else "raw (not normalised)"
        print(f"scored {len(rewards)} texts -> {args.output}; rewards {used}; template {scorer.template.to_dict()} "
              f"({scorer.template_source}); {scorer.truncated} truncated from the left")
    return rewards


def score_with_reward(args, dist) -> list[float]:
    """score's input scored by a reward spec that is not a reward model (classifier:..., profanity, module:function,
    http://...): a `text` line is scored as a response to an empty prompt."""
    reward = load_reward(args.model, dist.device, normalize=args.normalize, head=args.head)
    items = [("", item) if isinstance(item, str) else item for item in read_score_input(args.input)]
    rewards = checked_rewards(reward, [p for p, _ in items], [r for _, r in items], source=args.model)
    if dist.is_main:
        write_scores(args.output, rewards)
        print(f"scored {len(rewards)} texts with {args.model} -> {args.output}")
    return rewards


def read_score_input(path: str) -> list:
    """score's input lines, each a `text` string or a (`prompt`, `response`) pair."""
    items = []
    # output i is input line i: a blank or unscorable line is an error, never skipped
    for where, record in iter_records(path, blank_lines="error"):
        if isinstance(record, DataError):
            raise record
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            if not record["text"].strip():
                raise DataError(f"{where}: empty `text`; there is nothing to score")
            items.append(record["text"])
        elif isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("prompt", "response")):
            if not record["response"].strip():
                raise DataError(f"{where}: empty `response`; there is nothing to score")
            items.append((record["prompt"], record["response"]))
        else:
            raise DataError(f"{where}: expected a `text` string, or `prompt` and `response` strings")
    return items


def write_scores(path: str, rewards: list[float]) -> None:
    with open(path, "w") as f:
        for i, r in enumerate(rewards):
            f.write(json.dumps({"index": i, "reward": r}) + "\n")


def normalize(args, dist):
    if not Path(args.model).is_dir():  # a hub id: its files live in the shared HF cache, which is never written to
        raise UserError(f"--model {args.model}: normalize writes the statistics into the model's config.json, so it "
                        f"needs a local directory: `hf download {args.model.split('@')[0]} --local-dir DIR`, then "
                        f"--model DIR")
    scorer = RewardScorer(args.model, batch_size=args.batch_size, dist=dist, head=args.head)
    data = args.data or scorer.config.get("rmcore", {}).get("train_data")
    if not data:
        raise UserError("--data is required: the model's config.json does not record its training data")
    examples, report = read_examples(data, fmt=args.format, skip_bad_lines=args.skip_bad_lines,
                                     name="normalisation data")
    say(dist, report.summary())
    # the reference texts: each record's prompt + chosen response, the SFT split's texts; like training, texts
    # over the model's max_length are dropped (and counted), not truncated
    seqs = scorer.tokenizer.encode_batch([scorer.text_of((e.prompt, e.chosen)) for e in examples], bos=True, eos=True,
                                         specials=scorer.template.special_tokens)
    kept = [s for s in seqs if len(s) <= scorer.max_length]
    say(dist, f"{len(seqs) - len(kept)} of {len(seqs)} reference texts dropped: longer than "
              f"max_length={scorer.max_length}")
    rewards = scorer.score_ids(kept, progress=True)
    if dist.is_main:
        stats = write_normalization(args.model, rewards, list(data))
        print(f"reward mean {stats['mean']:.4f}, std {stats['std']:.4f} over {stats['count']} texts -> "
              f"{args.model}/config.json")
    return rewards


def compare(args, dist) -> dict:
    r = compare_policies(args.policy_a, args.policy_b, judge=args.judge, prompt_specs=args.prompts, device=dist.device,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, tie_epsilon=args.tie_epsilon, batch_size=args.batch_size,
                         head=args.head)
    if dist.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(r, indent=2) + "\n")
        (out / "compare.md").write_text(compare_markdown(r, args.show) + "\n")
        print(compare_markdown(r, 0))
        print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
    return r


def toxicity(args, dist) -> dict:
    """RealToxicityPrompts' figures for each policy (rmcore/align/toxicity.py), written once all are measured."""
    settings = ToxicitySettings(k=args.k, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                                temperature=args.temperature, seed=args.seed, sample=args.sample,
                                max_prompt_tokens=args.max_prompt_tokens,
                                batch_size=args.generation_batch_size, resamples=args.resamples,
                                precision=args.precision)
    settings.check()  # before anything is read
    prompts = read_toxicity_prompts(args.prompts, challenging=args.challenging,
                                    min_prompt_toxicity=args.min_prompt_toxicity)
    say(dist, prompts.report.summary())
    r = evaluate_toxicity(args.policy, prompts, scorer=args.scorer, settings=settings, judge=args.judge,
                          device=dist.device)
    if dist.is_main:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "toxicity.json").write_text(json.dumps(r, indent=1) + "\n")
        (out / "toxicity.md").write_text(toxicity_markdown(r, args.show) + "\n")
        plot = plot_toxicity(r, out / "toxicity.png")
        print(toxicity_markdown(r, 0))
        print(f"wrote {out / 'toxicity.json'}, {out / 'toxicity.md'}" + (f", {plot}" if plot else
                                                                          " (no plot: matplotlib not installed)"))
    return r


def serve(args, dist):
    """The reward model over HTTP until Ctrl-C (rmcore/serving/reward_server.py says what it answers)."""
    scorer = RewardScorer(args.model, device=dist.device, batch_size=args.batch_size, max_length=args.max_length,
                          truncate=args.truncate, head=args.head)
    service = RewardService(scorer, normalize=args.normalize, max_texts=args.max_texts)
    server, thread = start(reward_handler(service), args.host, args.port)
    serve_until_interrupted(server, thread, f"reward model {scorer.dir} (head {scorer.head}, "
                                            f"{'normalised' if args.normalize else 'raw'} rewards)")


def label(args, dist):
    """The labeling page over a task folder until Ctrl-C; with --report, the report of what was judged."""
    if args.report:
        task = LabelTask(args.out)
        judge_prefers = None
        if args.judge:  # the answer the reward model rewards more, per item
            reward = load_reward(args.judge, dist.device, head=args.head)
            prompts = [item["prompt"] for item in task.items]
            r_a = checked_rewards(reward, prompts, [item["a"] for item in task.items], source=args.judge)
            r_b = checked_rewards(reward, prompts, [item["b"] for item in task.items], source=args.judge)
            judge_prefers = {i: "a" if a > b else "b" for i, (a, b) in enumerate(zip(r_a, r_b))}
        r = human_report(task, judge_prefers, args.judge)
        paths = write_human_report(r, Path(args.out))
        print(human_markdown(r))
        print("wrote " + ", ".join(map(str, paths)))
        return r
    if not args.input:
        raise UserError("eval.py label: give --input (compare.json, or a preference file) to start a task, or "
                        "--report to report one")
    from_compare = args.input.endswith(".json") and Path(args.input).is_file()
    items, names = items_from_compare(args.input) if from_compare else items_from_pairs(args.input)
    task = LabelTask.create(args.out, items, names=names, source=args.input, seed=args.seed)
    server, thread = start(label_handler(task), args.host, args.port)
    serve_until_interrupted(server, thread, f"labeling page for {len(task.items)} items of {args.input}, "
                                            f"judgments in {args.out}")


def model_name(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "export" else p.name  # runs/tiny/rm/export -> rm


def parse(argv):
    command = argv[0] if argv and argv[0] in ("score", "normalize", "compare", "serve", "label",
                                                 "toxicity") else "evaluate"
    argv = argv[1:] if command != "evaluate" else argv
    p = argparse.ArgumentParser(prog=f"eval.py{'' if command == 'evaluate' else ' ' + command}")
    if command == "evaluate":
        p.add_argument("--model", action="append", required=True,
                       help="reward model: an HF-format directory or a hub id, org/name[@revision] (repeatable); "
                            "with --reference, a policy (DPO) read through its implicit reward")
        p.add_argument("--reference", help="the policy's reference (its DPO start): rewards are "
                                           "beta * (log pi(y|x) - log pi_ref(y|x)) of each response")
        p.add_argument("--beta", type=float, help="beta of the implicit reward (default: the policy's recorded "
                                                  "dpo.beta, else 0.1)")
        p.add_argument("--data", action="append", required=True,
                       help="preference file (pairs, or rankings of K responses), optionally sliced: f.jsonl[a:b] "
                            "(repeatable)")
        p.add_argument("--out", default="runs/eval")
        p.add_argument("--show", type=int, default=5, help="most confidently wrong/right pairs listed")
        p.add_argument("--max-length", type=int,
                       help="drop pairs longer than this (default: the model's training max_length)")
        p.add_argument("--wandb", choices=["disabled", "offline", "online"], default="disabled")
        p.add_argument("--project", default="rmcore")
    elif command == "score":
        p.add_argument("--model", required=True,
                       help="a reward model (directory or hub id), or any reward spec: classifier:<model>[:<label>], "
                            "profanity, module:function, http://host:port")
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--normalize", action="store_true", help="apply the statistics stored by `eval.py normalize`")
        p.add_argument("--truncate", choices=["error", "left"], default="error")
        p.add_argument("--max-length", type=int)
    elif command == "compare":
        p.add_argument("--policy-a", required=True)
        p.add_argument("--policy-b", required=True)
        p.add_argument("--judge", action="append", required=True,
                       help="reward model: a directory or a hub id, org/name[@revision]; repeatable (a proxy and a "
                            "gold judge: each gets its own wins, ties and losses, the first is the headline)")
        p.add_argument("--prompts", action="append", required=True,
                       help="prompt file(s), optionally sliced (repeatable)")
        p.add_argument("--out", default="runs/compare")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tie-epsilon", type=float, default=0.0, help="a reward difference within this is a tie")
        p.add_argument("--show", type=int, default=20, help="side-by-side samples in compare.md")
    elif command == "toxicity":
        p.add_argument("--policy", action="append", required=True,
                       help="a policy directory or hub id (repeatable: the first is the baseline of the paired "
                            "comparisons)")
        p.add_argument("--prompts", action="append", required=True,
                       help="RealToxicityPrompts rows (hf://datasets/allenai/real-toxicity-prompts/prompts.jsonl, "
                            "continued as plain text) or an rmcore prompt file (chat template), optionally sliced")
        p.add_argument("--scorer", default="profanity",
                       help="profanity (offline) or classifier:<model>[:<label>], e.g. classifier:unitary/toxic-bert")
        p.add_argument("--sample", type=int, help="a seeded random sample of this many prompts of at most "
                       "--max-prompt-tokens (default: all)")
        p.add_argument("--challenging", action="store_true", help="RealToxicityPrompts' challenging subset only")
        p.add_argument("--min-prompt-toxicity", type=float,
                       help="RealToxicityPrompts rows whose prompt.toxicity is above this only")
        p.add_argument("--k", type=int, default=25, help="continuations per prompt")
        p.add_argument("--max-new-tokens", type=int, default=20)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--temperature", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0, help="the sample of prompts, the sampling and the bootstrap")
        p.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are dropped and counted")
        p.add_argument("--generation-batch-size", type=int, default=64, help="rows sampled at once")
        p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the prompts")
        p.add_argument("--precision", default="auto", help="of sampling: auto (bf16 where the device multiplies bf16 "
                                                           "natively, else fp32), fp32 or bf16")
        p.add_argument("--judge", help="a reward model: its mean reward of the continuations, reported beside")
        p.add_argument("--show", type=int, default=5, help="most toxic continuations listed per policy")
        p.add_argument("--out", default="runs/toxicity")
    elif command == "serve":
        p.add_argument("--model", required=True)
        p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to answer other machines (no authentication)")
        p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
        p.add_argument("--normalize", action="store_true", help="apply the statistics stored by `eval.py normalize`")
        p.add_argument("--truncate", choices=["error", "left"], default="left",
                       help="a text over the length limit: keep its latest tokens (left, as the loops' in-process "
                            "reward does, so a served reward equals it) or refuse the request (error, a 422)")
        p.add_argument("--max-length", type=int, help="default: the model's training max_length")
        p.add_argument("--max-texts", type=int, default=512, help="most texts in one request (more: a 413)")
    elif command == "label":
        p.add_argument("--input", help="eval.py compare's compare.json (A vs B), or a preference file (re)labeled")
        p.add_argument("--out", default="runs/label", help="the task folder: task.json, judgments.json, "
                                                           "comparisons.jsonl (train.py's comparison format)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8001, help="0: any free port (printed)")
        p.add_argument("--seed", type=int, default=0, help="which answer is shown on the left, drawn per item")
        p.add_argument("--report", action="store_true", help="report the judgments in --out instead of serving")
        p.add_argument("--judge", help="with --report: a reward model (or reward spec) scored against the people")
    else:
        p.add_argument("--model", required=True)
        p.add_argument("--data", action="append", help="reference file(s); default: the model's training data")
    if command not in ("score", "compare", "serve", "label", "toxicity"):
        p.add_argument("--format", default="auto")
        p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--head", choices=READ_HEADS, default="quality",
                   help="what a length-disentangled reward model's reward is: its quality head, its length head, or "
                        "their sum (a one-head model: its head)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if command == "evaluate" and args.beta is not None and not args.reference:
        p.error("--beta applies to an implicit reward: give the policy's --reference")
    if command == "evaluate" and args.beta is not None and not args.beta > 0:
        p.error(f"--beta {args.beta}: expected > 0")
    if command == "compare":  # the loops' sampler settings, checked as their configs check them
        for bad, what in ((args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: expected >= 1"),
                          (args.temperature < 0, f"--temperature {args.temperature}: expected >= 0 (0: greedy)"),
                          (args.top_k < 0, f"--top-k {args.top_k}: expected >= 0 (0: off)"),
                          (not 0 < args.top_p <= 1, f"--top-p {args.top_p}: expected 0 < top_p <= 1 (1: off)")):
            if bad:
                p.error(what)
    return command, args


def main(argv):
    command, args = parse(argv)
    dist = init_distributed(args.device)
    return {"evaluate": evaluate, "score": score, "normalize": normalize, "compare": compare,
            "serve": serve, "label": label, "toxicity": toxicity}[command](args, dist)


if __name__ == "__main__":
    with user_errors():  # bad data or model files: one message, no traceback
        main(sys.argv[1:])
    shutdown()
