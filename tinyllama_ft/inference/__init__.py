"""Inference: the terminal chat and the OpenAI-compatible server, on any saved model."""
