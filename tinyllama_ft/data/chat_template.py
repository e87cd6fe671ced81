"""The chat template every saved model carries: it writes the BOS itself, so that consumers which render the
template and tokenize the text without adding special tokens (transformers' `pipeline` and `apply_chat_template`,
llama-cpp-python's Jinja chat handler, `llama-server --jinja`) feed exactly `encode_prompt`'s ids.

TinyLlama-Chat's own template never writes `bos_token`: `encode_prompt` puts the BOS first, and every
consumer that trusts the template alone fed a prompt without it (0 of 13 greedy answers equal
through `llama_cpp.server`). Writing `{{ bos_token }}` in front is not enough for a SentencePiece tokenizer
that puts its "▁" prefix only before the first text (Metaspace `prepend_scheme: first`, TinyLlama's
`legacy: false`): the text after `<s>` is no longer first, so `<|user|>` would begin with id 29966 instead of
529. One space after the BOS is what that prefix was: the ids stay exactly today's (`add_bos_to_template`
proves it on probe conversations whenever a tokenizer is loaded; tests on all 1,109 real Dolly rows).
llama.cpp, with the GGUF's `add_space_prefix = false`, turns the same space into the same "▁".
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

PROBES = [  # conversations whose ids a changed template must keep: one turn, a system turn, several turns
    [{"role": "user", "content": "Name three primes."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Summarize this.\n\nContext:\nA cat sat on a mat."},
     {"role": "assistant", "content": "A cat sat."}, {"role": "user", "content": "Shorter?"}],
]


def prefixes_first_text_only(tokenizer) -> bool:
    """True when the tokenizer adds SentencePiece's "▁" to the start of the text but not after special tokens."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first"


def bos_prefix(tokenizer) -> str:
    """What goes before the template so that it writes the BOS: `{{ bos_token }}`, and one space where the
    tokenizer's "▁" prefix would otherwise be lost after it."""
    return "{{ bos_token }}" + ("{{ ' ' }}" if prefixes_first_text_only(tokenizer) else "")


def _ids(tokenizer, messages, template: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                         tokenize=True, return_dict=True)["input_ids"]


def writes_bos(tokenizer) -> bool:
    """The template's own rendering already begins with the BOS id."""
    ids = _ids(tokenizer, PROBES[0])
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def add_bos_to_template(tokenizer) -> None:
    """Make `tokenizer.chat_template` write the BOS, keeping every id after it: the new template's ids must be
    the BOS followed by exactly the old template's ids on every probe, with and without the generation prompt,
    or the template is left as it was (and the log says why; `encode_prompt` still adds the BOS itself).
    Nothing to do for a tokenizer without a BOS or a template that writes it already."""
    if tokenizer.bos_token_id is None or not tokenizer.chat_template or writes_bos(tokenizer):
        return
    candidate = bos_prefix(tokenizer) + tokenizer.chat_template
    for messages in PROBES:
        for generation_prompt in (True, False):
            old = _ids(tokenizer, messages, add_generation_prompt=generation_prompt)
            new = _ids(tokenizer, messages, candidate, add_generation_prompt=generation_prompt)
            if new != [tokenizer.bos_token_id, *old]:
                log.warning("the chat template does not write the BOS and writing it would change the prompt ids "
                            "(%s... vs %s...): kept as it is; consumers that only render the template will get no BOS",
                            new[:6], [tokenizer.bos_token_id, *old][:6])
                return
    tokenizer.chat_template = candidate
