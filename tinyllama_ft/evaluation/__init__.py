"""Evaluation: Dolly loss, ROUGE/BLEU and EOS rate, preference metrics, lm-evaluation-harness benchmarks."""
