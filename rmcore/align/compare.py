"""Two policies head to head, judged by a reward model: the automatic form of the SFT-versus-RLHF comparison
researchers publish ("at least as good on 84 of 100 prompts: 30 wins, 54 ties").

Each policy answers every prompt once, with the same sampling settings and seed, in its own template (recorded in
its config.json); the judge scores each (prompt, response) in its own template. A tie is a reward difference
within `tie_epsilon`. Mean response lengths, distinct-2 and the repeated 4-gram rate are reported beside the wins,
so a win bought by length or by repetition is visible. Several judges (a proxy and a gold reward model, Gao et al.
2023) score the same responses, and each gets its own wins, ties and losses; the first is the headline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rmcore.align.rewards import checked_rewards, load_reward
from rmcore.align.rollouts import PromptPool, default_stop_strings, sample
from rmcore.align.selection import distinct_n, repeated_ngram_rate
from rmcore.data.formats import read_examples
from rmcore.data.records import Report, require_data
from rmcore.data.template import Template
from rmcore.eval.report import excerpt
from rmcore.interop.hf_checkpoint import load_pretrained, read_hf_config
from rmcore.interop.hub import resolve_model
from rmcore.model import CausalLM
from rmcore.tokenizer import Tokenizer


def recorded_template(model_dir: str | Path) -> Template | None:
    info = read_hf_config(resolve_model(model_dir)).get("rmcore", {})
    return Template.from_dict(info["template"]) if "template" in info else None


def policy_templates(policy_a: str, policy_b: str) -> list[tuple[Template, str]]:
    """Each policy's template and where it came from: its config.json; else the other policy's (a base model
    compared with its fine-tuned self answers in the format the fine-tuning used); else the recipe's default."""
    recorded = [recorded_template(policy_a), recorded_template(policy_b)]
    out = []
    for mine, other in (recorded, recorded[::-1]):
        if mine is not None:
            out.append((mine, "its config.json"))
        elif other is not None:
            out.append((other, "the other policy's config.json"))
        else:
            out.append((Template(), "default (none recorded)"))
    return out


def compare_policies(policy_a: str, policy_b: str, *, judge: str | list[str], prompt_specs: list[str], device="cpu",
                     max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, tie_epsilon: float = 0.0, max_prompt_tokens: int = 512,
                     batch_size: int = 16, head: str = "quality") -> dict:
    """Wins / ties / losses of policy A against B on the prompts under each judge, with every sample."""
    judges = [judge] if isinstance(judge, str) else list(judge)
    examples, report = read_examples(prompt_specs, name="compare prompts")
    sides, templates = [], policy_templates(policy_a, policy_b)
    for path, (template, _) in zip((policy_a, policy_b), templates):
        tok = Tokenizer.from_pretrained(path)
        template.check(tok)
        ids = [tok.encode(template.render(e.prompt), bos=True, specials=template.special_tokens) for e in examples]
        sides.append((path, tok, template, ids))
    # a prompt too long for either policy is dropped for both, and counted
    keep = [i for i in range(len(examples)) if all(len(side[3][i]) <= max_prompt_tokens for side in sides)]
    for i in sorted(set(range(len(examples))) - set(keep)):
        report.drop(f"prompt longer than {max_prompt_tokens} tokens for a policy", examples[i].id)
    report.kept = len(keep)
    require_data(len(keep), report, prompt_specs, "--prompts (compare)", "prompts")
    prompts = [examples[i].prompt for i in keep]
    rewards_of = [load_reward(j, device, head=head) for j in judges]
    results = []
    for path, tok, template, ids in sides:
        model = load_pretrained(CausalLM, path, device=device).eval()
        pool = PromptPool(prompts, [ids[i] for i in keep], Report("compare"))
        g = torch.Generator(device=device).manual_seed(seed)
        samples = sample(model, pool, list(range(len(pool))), tokenizer=tok, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_strings=default_stop_strings(template), generator=g)
        rewards = np.array([checked_rewards(reward, prompts, samples.responses, source=f"the judge {j}")
                            for j, reward in zip(judges, rewards_of)])  # (judges, prompts)
        results.append({"responses": samples.responses, "tokens": [len(t) for t in samples.tokens],
                        "rewards": rewards, "distinct_2": distinct_n(samples.tokens, 2),
                        "repeated_4gram_rate": repeated_ngram_rate(samples.tokens, 4)})
        del model
    same_text = [a == b for a, b in zip(results[0]["responses"], results[1]["responses"])]
    verdicts = []
    for j, name in enumerate(judges):
        diff = results[0]["rewards"][j] - results[1]["rewards"][j]
        # the same text is a tie whatever the judge says: scored in other batches, it can differ by float noise
        diff[same_text] = 0.0
        wins, losses = int((diff > tie_epsilon).sum()), int((diff < -tie_epsilon).sum())
        verdicts.append({"judge": name, "wins": wins, "ties": len(prompts) - wins - losses, "losses": losses,
                         "mean_reward_a": float(results[0]["rewards"][j].mean()),
                         "mean_reward_b": float(results[1]["rewards"][j].mean())})
    return {"prompts": len(prompts), **verdicts[0], "judges": verdicts,
            "tie_epsilon": tie_epsilon, "policy_a": policy_a, "policy_b": policy_b,
            "mean_tokens_a": float(np.mean(results[0]["tokens"])),
            "mean_tokens_b": float(np.mean(results[1]["tokens"])),
            "distinct_2_a": results[0]["distinct_2"], "distinct_2_b": results[1]["distinct_2"],
            "repeated_4gram_rate_a": results[0]["repeated_4gram_rate"],
            "repeated_4gram_rate_b": results[1]["repeated_4gram_rate"],
            "dropped": report.to_dict(),
            "template_a": {**templates[0][0].to_dict(), "source": templates[0][1]},
            "template_b": {**templates[1][0].to_dict(), "source": templates[1][1]},
            "samples": [{"id": examples[k].id, "prompt": prompts[j], "a": results[0]["responses"][j],
                         "b": results[1]["responses"][j], "reward_a": float(results[0]["rewards"][0, j]),
                         "reward_b": float(results[1]["rewards"][0, j]),
                         "rewards_a": results[0]["rewards"][:, j].tolist(),
                         "rewards_b": results[1]["rewards"][:, j].tolist()} for j, k in enumerate(keep)]}


def compare_markdown(r: dict, show: int = 20) -> str:
    n = max(r["prompts"], 1)
    out = ["# Policy comparison", "",
           f"- A: `{r['policy_a']}`; B: `{r['policy_b']}`; prompts: {r['prompts']}; a tie is |r_a - r_b| <= "
           f"{r['tie_epsilon']}"]
    for v in r["judges"]:
        out += [f"- judge `{v['judge']}`: A wins {v['wins']} ({100 * v['wins'] / n:.1f}%), ties {v['ties']} "
                f"({100 * v['ties'] / n:.1f}%), losses {v['losses']} ({100 * v['losses'] / n:.1f}%); A at least as "
                f"good as B on {v['wins'] + v['ties']} of {r['prompts']} prompts; mean reward A "
                f"{v['mean_reward_a']:.4f}, B {v['mean_reward_b']:.4f}"]
    out += [
           f"- templates: A {r['template_a']['human']!r} ({r['template_a']['source']}), B {r['template_b']['human']!r} "
           f"({r['template_b']['source']})",
           f"- mean response tokens: A {r['mean_tokens_a']:.1f}, B {r['mean_tokens_b']:.1f}; distinct-2 (distinct "
           f"token bigrams over all, Li et al. 2016): A {r['distinct_2_a']:.3f}, B {r['distinct_2_b']:.3f}; repeated "
           f"4-grams (within a response): A {r['repeated_4gram_rate_a']:.3f}, B {r['repeated_4gram_rate_b']:.3f}", ""]
    for s in r["samples"][:show]:
        shown = {side: " / ".join(f"{x:.3f}" for x in s[f"rewards_{side}"]) for side in "ab"}
        out += [f"## {s['id']}", "", f"**Prompt**: {excerpt(s['prompt'], 400)}", "",
                f"**A** (reward {shown['a']}): {excerpt(s['a'], 600)}", "",
                f"**B** (reward {shown['b']}): {excerpt(s['b'], 600)}", ""]
    return "\n".join(out)
