"""The template: how an HH-form transcript is written for the model, by ONE function, Template.render, which
training, evaluation, scoring, RAFT and PPO all call.

Every record format is parsed into HH-RLHF's own form ("\\n\\nHuman: ...\\n\\nAssistant: ...", the markers below);
the template then rewrites the markers as the model's tags: the recipe's "###Human:" / "###Assistant:", any other
tags (data.human_tag, data.assistant_tag, data.tag_separator), or ChatML (data.template=chatml).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rmcore.errors import DataError

HUMAN = "\n\nHuman:"          # HH-RLHF's own markers: the canonical form every record is parsed into
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class Template:
    """How an HH-form transcript is written for the model. Each "\n\nHuman:" / "\n\nAssistant:" marker becomes
    `separator + tag`, except at the very start of the text, where it is the tag alone; `prefix` opens every HH
    transcript (text without a marker is left as written).
    With strip_space, the one space HH puts after a marker is dropped. special_tokens: the tags are written in
    the tokenizer's special tokens (ChatML's <|im_start|>), which encoding then reads as those tokens.

    The recipe's values give the reference model card's form, "###Human: <question> ###Assistant: <answer>";
    human="\n\nHuman:", assistant="\n\nAssistant:", separator="" leave HH text as it is; Template.chatml() gives
    "<|im_start|>user\n<question><|im_end|>\n<|im_start|>assistant\n<answer>" + EOS (<|im_end|> in ChatML models)."""
    human: str = "###Human:"
    assistant: str = "###Assistant:"
    separator: str = " "
    strip_space: bool = False
    prefix: str = ""
    special_tokens: bool = False

    @classmethod
    def chatml(cls, system: str = "") -> Template:
        """ChatML (SmolLM2, Qwen, ...): every turn is <|im_start|>role\n content <|im_end|>\n."""
        return cls("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n", strip_space=True,
                   prefix=f"<|im_start|>system\n{system}<|im_end|>\n" if system else "", special_tokens=True)

    @classmethod
    def from_dict(cls, recorded: dict) -> Template:
        """The template recorded in a model's config.json; exports made before `separator` existed used none."""
        return cls(recorded["human"], recorded["assistant"], recorded.get("separator", ""),
                   strip_space=recorded.get("strip_space", False), prefix=recorded.get("prefix", ""),
                   special_tokens=recorded.get("special_tokens", False))

    def apply(self, text: str) -> str:
        """Rewrite the HH markers: "\n\nHuman:" -> separator + human, "\n\nAssistant:" -> separator + assistant."""
        return "".join(piece for piece, _ in self._pieces(text))

    def invert(self, text: str) -> str:
        """Undo apply (exact for texts that did not already contain the tags)."""
        text = text[len(self.prefix):] if self.prefix and text.startswith(self.prefix) else text
        space = " " if self.strip_space else ""
        for tag, marker in ((self.human, HUMAN), (self.assistant, ASSISTANT)):
            if text.startswith(tag):
                text = marker + space + text[len(tag):]
            text = text.replace(self.separator + tag, marker + space)
        return text

    def render(self, prompt: str, response: str = "") -> str:
        """The text the model sees for a prompt (HH form) and a response: apply(prompt + response)."""
        return self.apply(prompt + response)

    def segments(self, prompt: str, response: str) -> list[tuple[str, bool]]:
        """render(prompt, response) cut into (text, is_assistant_content) pieces, in order, joining to the whole."""
        return self._pieces(prompt + response)

    def _pieces(self, hh_text: str) -> list[tuple[str, bool]]:
        # Split the HH form at every marker; content after an assistant marker is assistant content, and a
        # marker (with its separator) belongs to neither side.
        pieces, in_assistant, after_marker = [], False, False
        for part in re.split(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})", hh_text):
            if part in (HUMAN, ASSISTANT):
                in_assistant = part == ASSISTANT
                tag = self.assistant if in_assistant else self.human
                pieces.append((tag if not pieces else self.separator + tag, False))
                after_marker = True
                continue
            if after_marker and self.strip_space and part.startswith(" "):
                part = part[1:]
            if part:
                pieces.append((part, in_assistant))
            after_marker = False
        # the prefix opens a transcript; text without an HH marker (already templated, or plain) stays as written
        return [(self.prefix, False)] + pieces if self.prefix and has_hh_marker(hh_text) else pieces

    def check(self, tokenizer) -> Template:
        """A template written in special tokens needs a tokenizer that has them; anything else would be read as
        plain characters and train the model on a format it was never given."""
        if self.special_tokens:
            have = {tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.special_ids}
            wanted = set(re.findall(r"<\|[^|<>]*\|>", self.human + self.assistant + self.separator + self.prefix))
            if wanted - have:
                raise DataError(f"the template is written in the special tokens {sorted(wanted)}, but the tokenizer "
                                f"lacks {sorted(wanted - have)} as special tokens (it has {sorted(have)}); use "
                                f"data.template=tags with this tokenizer, or a ChatML model's tokenizer")
        return self

    def to_dict(self) -> dict:
        return {"human": self.human, "assistant": self.assistant, "separator": self.separator,
                "strip_space": self.strip_space, "prefix": self.prefix, "special_tokens": self.special_tokens}


def has_hh_marker(text: str) -> bool:
    return HUMAN in text or ASSISTANT in text
