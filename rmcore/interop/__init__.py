"""Other formats in and out: HF LLaMA checkpoints and PEFT adapters (hf_checkpoint.py), GGUF files (gguf.py, with
its convert command), and a SentencePiece model written as an HF tokenizer.json (tokenizer_json.py)."""
