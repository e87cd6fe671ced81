"""The LM head during training: which positions TRL's fused LM head scores, and how it scores them where
TRL has no Triton kernel (CPU, MPS).

TRL's SFTTrainer computes the loss with its fused LM head (`trl.trainer.utils.add_fused_lm_head`): per-token
log-probabilities through `ChunkedLogProbFunction`, tile by tile, without the full logits. With Triton (CUDA,
XPU) each tile is folded by a kernel and only the labelled positions are scored. Elsewhere TRL scores every
position, and its torch fallback makes about 18 passes over each [tokens, vocabulary] tile and recomputes the
tiles in the backward (three matrix products instead of two). `lm_head_scoring` changes both, for the length of
a `compute_loss` call.
"""

from __future__ import annotations

import contextlib

import torch
import trl.trainer.utils as trl_utils


class LogSoftmaxLogProbs:
    """`ChunkedLogProbFunction.apply`'s signature and results, for devices without Triton: the logits of the
    scored positions in one matrix product, torch's `log_softmax`, and autograd's backward (one more product,
    about three passes over the logits). It holds the [positions, vocabulary] log-probabilities until the
    backward, as the seed's full logits did, but only of the positions scored.

    The metric outputs (`entropy`, `log_sum_sq_probs`, `mean_logits`, `is_top1`) carry no gradient: TRL's SFT
    uses them for its logged metrics only (entropy, mean token accuracy); the log-probabilities carry it."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature=1.0, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        del chunk_size  # one product: no tiles
        logits = torch.nn.functional.linear(hidden, weight, bias).float()  # fp32 statistics, as TRL's tiles
        if logit_scale != 1.0:
            logits = logits * logit_scale
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        if temperature != 1.0:
            logits = logits / temperature
        log_softmax = logits.log_softmax(-1)
        log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1) if "entropy" in outputs else None
            log_sum_sq_probs = (2 * log_softmax).logsumexp(-1) if "log_sum_sq_probs" in outputs else None
            mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
            is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None  # the first maximum, as TRL's
        return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def has_switches() -> bool:
    """Whether this TRL has the two names `lm_head_scoring` swaps."""
    return hasattr(trl_utils, "_use_triton") and hasattr(trl_utils, "_ChunkedLogProbFunction")


@contextlib.contextmanager
def lm_head_scoring(labelled_only: bool, implementation: str = "auto"):
    """Within this block TRL's fused LM head scores only the labelled positions (`labelled_only`) or every
    position, on every device; and with `implementation="auto"`, on a device without Triton it scores them
    with `LogSoftmaxLogProbs` instead of TRL's tiles (`"trl"`: TRL's tiles everywhere). The loss and its
    gradients are the same either way (tests/test_packing.py); only the time and memory differ."""
    if not has_switches():  # another TRL decides for itself (the trainer warns once)
        yield
        return
    decide, kernel = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    trl_utils._use_triton = lambda device: labelled_only
    if implementation == "auto":
        trl_utils._ChunkedLogProbFunction = _by_device(decide, kernel)
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = decide, kernel


def _by_device(use_triton, kernel):
    class ByDevice:
        @staticmethod
        def apply(hidden, *args):
            return (kernel if use_triton(hidden.device) else LogSoftmaxLogProbs).apply(hidden, *args)

    return ByDevice
