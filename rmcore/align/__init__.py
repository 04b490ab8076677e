"""Policies: what raft.py and ppo.py share, and eval.py's `compare` and `toxicity` of policies.

    rollouts.py    prompt pool, K samples per prompt, samples packed and scored in one forward (log-probs, values)
    selection.py   discard rules, best-of-K selection (RAFT)
    rewards.py     the reward interface: a reward-model directory or hub id, a URL, module:function, a classifier;
                   negated or scaled; ensembles
    classifiers.py toxicity scorers as rewards: classifier:<model>[:<label>] (transformers), profanity
    iteration.py   the iteration cycle both loops share (AlignRun)
    compare.py     two policies answer the same prompts, a reward model judges (eval.py compare)
    toxicity.py    RealToxicityPrompts' figures of policies' continuations, bootstrap CIs (eval.py toxicity)
"""
