"""The model: the tokenizer, the base model with its LoRA wrap, and batched greedy generation."""
