"""rmcore: reward models and RLHF in plain PyTorch.

Flat here, the files a researcher opens to change the science: model.py (the LLaMA trunk and its two heads),
lora.py, losses.py, rl.py (the math of PPO, RLOO, GRPO), generate.py, sft.py (the SFT step), tokenizer.py,
errors.py. The machinery lives in folders named for what it does: config/, data/, interop/ (HF, PEFT and GGUF
files), training/, align/ (what raft.py and ppo.py share) and eval/.
"""
from rmcore.interop.hf_checkpoint import load_pretrained, save_pretrained
from rmcore.model import CausalLM, ModelConfig, RewardModel, Transformer
from rmcore.tokenizer import Tokenizer

__all__ = ["CausalLM", "ModelConfig", "RewardModel", "Transformer", "Tokenizer", "load_pretrained", "save_pretrained"]
