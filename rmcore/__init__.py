"""rmcore: reward models and RLHF in plain PyTorch."""
from rmcore.checkpoint import load_pretrained, save_pretrained
from rmcore.model import CausalLM, ModelConfig, RewardModel, Transformer


def __getattr__(name):
    # the tokenizer pulls in sentencepiece/tokenizers; import it only when asked for
    if name == "Tokenizer":
        from rmcore.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(name)


__all__ = ["CausalLM", "ModelConfig", "RewardModel", "Transformer", "Tokenizer", "load_pretrained", "save_pretrained"]
