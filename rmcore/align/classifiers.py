"""Text classifiers as rewards: how toxic a response is, scored as the toxicity literature scores it.

    classifier:unitary/toxic-bert              P(toxic) of a Hugging Face sequence classifier (hub id or directory)
    classifier:s-nlp/roberta_toxicity_classifier:toxic      ... of the label named after the second colon
    profanity                                  alt-profanity-check's P(profane): a linear model inside its wheel,
                                               offline, thousands of texts a second on one core

Both score the response alone, as RealToxicityPrompts (Gehman et al. 2020) scores a continuation: the prompt is
the dataset's, not the policy's. A classifier's probability is what transformers' `pipeline("text-classification")`
reports: a softmax over the labels, or a sigmoid per label for a multi-label model (unitary/toxic-bert) or a
one-label model. Without a label, the one whose name says toxic, hate, offensive or profane (not "non-toxic",
"nothate") is used, else label 1, and the choice is said once. Texts longer than the classifier's limit keep their
first tokens (said once, counted in `truncated`). These are not the Perspective API's numbers: each classifier has
its own training data and calibration (README, "Toxicity").
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from rmcore.errors import ConfigError
from rmcore.interop.hub import CLASSIFIER_FILES, is_hub_id, resolve_model

TOXIC_WORDS = ("toxic", "toxicity", "hate", "hateful", "offensive", "profane", "profanity", "abusive")
NEGATED = re.compile(r"^(non|not|no)[-_ ]?")


def toxic_label(labels: dict[int, str]) -> int | None:
    """The index of the first label whose whole name is a toxicity word ("toxic", "hate"; not "nothate"), or None."""
    for index in sorted(labels):
        name = labels[index].lower().strip()
        if name in TOXIC_WORDS and not NEGATED.match(name):
            return index
    return None


class ClassifierReward:
    """P(label | response) from a sequence classifier, batched on `device`."""

    def __init__(self, model: str, device="cpu", *, label: str | None = None, batch_size: int = 32):
        try:
            # imported here: optional (the toxicity extra); a hub classifier is any architecture transformers knows
            from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise ConfigError(f"reward classifier:{model} needs transformers: pip install -e '.[toxicity]'") from None
        path = resolve_model(model, files=CLASSIFIER_FILES)
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"reward classifier:{model}: not a model directory (no config.json) nor a hub id")
        config = AutoConfig.from_pretrained(path)
        architectures = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(f"reward classifier:{model}: not a sequence classifier (its config.json names "
                              f"{architectures or 'no architecture'}); expected a *ForSequenceClassification model")
        labels = {int(i): str(name) for i, name in config.id2label.items()}
        if label is not None:
            matches = [i for i, name in labels.items() if name == label]
            if not matches:
                raise ConfigError(f"reward classifier:{model}:{label}: the model has no label {label!r}; its labels: "
                                  f"{', '.join(labels[i] for i in sorted(labels))}")
            self.index, chosen_by = matches[0], "named"
        elif (found := toxic_label(labels)) is not None:
            self.index, chosen_by = found, "its name says toxic"
        else:
            self.index, chosen_by = min(1, len(labels) - 1), "label 1: no label name says toxic"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device, self.batch_size, self.name = device, batch_size, model
        # pipeline("text-classification")'s choice of probability
        self.sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        limits = [n for n in (self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
                  if n and n < 1_000_000]
        self.max_length = min(limits) if limits else 512
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta") and self.max_length == \
                getattr(config, "max_position_embeddings", None):
            self.max_length -= 2  # RoBERTa's positions start after the padding index
        self.truncated = 0
        print(f"classifier {model}: P({labels[self.index]}) ({chosen_by}; labels "
              f"{', '.join(labels[i] for i in sorted(labels))}), {'sigmoid' if self.sigmoid else 'softmax'}, texts "
              f"over {self.max_length} tokens keep their first {self.max_length}", flush=True)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for start in range(0, len(responses), self.batch_size):
            texts = responses[start:start + self.batch_size]
            lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
            self.truncated += sum(n > self.max_length for n in lengths)
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(self.device)
            logits = self.model(**batch).logits.float()
            probs = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)
            out += probs[:, self.index].tolist()
        return out


def classifier_from_spec(spec: str, device="cpu") -> ClassifierReward:
    """`classifier:<model>[:<label>]`, the model a local directory or a hub id (org/name[@revision])."""
    rest = spec.removeprefix("classifier:")
    model, label = rest, None
    if not Path(rest).is_dir() and ":" in rest:
        head, _, tail = rest.rpartition(":")
        if Path(head).is_dir() or is_hub_id(head):
            model, label = head, tail
    if not model:
        raise ConfigError(f"reward {spec!r}: expected classifier:<model directory or hub id>[:<label>]")
    return ClassifierReward(model, device, label=label)


class ProfanityReward:
    """alt-profanity-check's probability that a response is profane (a linear SVM on bag-of-words features,
    calibrated; trained on ~200k human-labelled clean and profane texts)."""

    def __init__(self):
        try:
            # imported here: optional (the toxicity extra), a scikit-learn model most runs never need
            from profanity_check import predict_prob
        except ImportError:
            raise ConfigError("reward profanity needs alt-profanity-check, which is not installed: "
                              "pip install -e '.[toxicity]'") from None
        self.predict_prob = predict_prob

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(p) for p in self.predict_prob(list(responses))] if responses else []
