"""The settings of `generate` and `chat` (how many tokens an answer may have, sampling), declared and checked
by the same rules as a run's `Config` (`validation.validate`): a flag such as `--temperature nan` is one line
naming it, never a silently greedy answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from .validation import sources, validate


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=256, metadata={"help": "The most tokens an answer gets (and never more "
                                                        "than the model's context leaves after the prompt).",
                                                        "check": "> 0"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (the default); above 0: sampled.",
                                                      "check": "[0, 2]"})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the likeliest tokens whose "
                                                "probabilities add up to top_p (with a temperature above 0).",
                                                "check": "(0, 1]"})

    def __post_init__(self):
        validate(self)


def generation_settings(given: dict, source: str = "flag") -> GenerationSettings:
    """`GenerationSettings` from the values `given` (None: not given, the default), each checked and, when
    refused, named as it came (`--temperature nan`, or `temperature=nan` from Python)."""
    values = {name: value for name, value in given.items() if value is not None}
    with sources({name: source for name in values}):
        return GenerationSettings(**values)
