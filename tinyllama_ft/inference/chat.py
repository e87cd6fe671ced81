"""`python -m tinyllama_ft chat`: several turns with a fine-tuned model, each answer streamed.

Every turn is encoded by `encode_prompt` over the whole conversation so far (the chat template, one
BOS, the generation prompt), the path training and `generate` use, so the first answer equals
`generate`'s for the same instruction. Greedy unless a temperature is given. Conversations longer
than the context (the model's positions minus `max_new_tokens`) lose their oldest turns, a user
message and its answer at a time; the system message stays.

(transformers' own `transformers chat` is a terminal client of a running `transformers serve`; this
one loads the model itself, so it needs no server and feeds exactly `encode_prompt`'s ids.)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Iterable, TextIO

import torch
from transformers import TextStreamer

from ..data.encoding import encode_prompt, find_special_text
from ..data.formats import prompt_messages
from ..errors import UserError
from ..model.generation import context_length, decode_answer
from ..settings.generation import generation_settings
from ..storage.saved_model import load_saved, saved_system_prompt

log = logging.getLogger(__name__)


class _Streamer(TextStreamer):
    """transformers' `TextStreamer` writing to `out`, printing exactly `decode(answer).strip()`:
    leading whitespace is dropped and trailing whitespace held back until more text follows."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out, self.started, self.pending = out, False, ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending = "" if stream_end else text[len(body):]
        if body:
            self.started = True
            self.out.write(body)
            self.out.flush()


@dataclass
class Chat:
    """A conversation with `model`: `ask` a user message, get the answer; `reset` forgets the turns."""

    model: object
    tokenizer: object
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    history: list[dict] = field(default_factory=list)  # user and assistant messages, oldest first

    def reset(self) -> None:
        self.history.clear()

    def ask(self, user: str, out: TextIO | None = None) -> str:
        """The answer to `user` after the conversation so far, streamed to `out` when given."""
        ids = self.prompt_ids(user)
        answer = self.answer(ids, out)
        marker = find_special_text(answer, self.tokenizer)  # e.g. the model wrote "<|user|>": keep what precedes it
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer.split(marker)[0].strip() if marker else answer}]
        return answer

    def prompt_ids(self, user: str) -> list[int]:
        """`encode_prompt` over the system message, the history and `user`, dropping the oldest
        user/assistant pairs while it is longer than the context leaves room for."""
        budget = context_length(self.model) - self.max_new_tokens
        turns = [{"role": "user", "content": user}]
        # prompt_messages: contents stripped and the system turn first, exactly as training formats rows
        ids = encode_prompt(self.tokenizer, prompt_messages(self.history + turns, system_prompt=self.system))
        dropped = 0  # encode_prompt raised above on special-token text
        while len(ids) > budget and len(self.history) > 2 * dropped:
            dropped += 1
            ids = encode_prompt(self.tokenizer, prompt_messages(self.history[2 * dropped:] + turns,
                                                                system_prompt=self.system))
        if len(ids) > budget:
            raise UserError(f"this message needs {len(ids)} prompt tokens but the context leaves {budget} "
                            f"({context_length(self.model)} positions - {self.max_new_tokens} new tokens): "
                            "shorten it or lower --max_new_tokens")
        if dropped:
            del self.history[: 2 * dropped]
            print(f"(context full: dropped the oldest {dropped} turn{'s' * (dropped > 1)})", file=sys.stderr)
        return ids

    @torch.no_grad()
    def answer(self, ids: list[int], out: TextIO | None = None) -> str:
        """Generate after `ids` (greedy unless `temperature` > 0) until EOS or `max_new_tokens`;
        the text is decoded exactly as `generate` decodes it (`decode_answer`)."""
        device = next(self.model.parameters()).device
        sampling = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if self.temperature > 0 \
            else dict(do_sample=False, num_beams=1)
        input_ids = torch.tensor([ids], device=device)
        streamer = _Streamer(self.tokenizer, out) if out is not None else None
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                     pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, **sampling)
        return decode_answer(self.tokenizer, output[0, len(ids):].tolist())["text"]


def chat_turns(model, tokenizer, turns: list[str], out: TextIO | None = sys.stdout, **options) -> list[str]:
    """Say each of `turns` in one conversation; each answer streams to `out`; returns the answers."""
    chat = Chat(model, tokenizer, **options)
    answers = []
    for turn in turns:
        if out is not None:
            out.write(f"user> {turn}\nassistant> ")
        answers.append(chat.ask(turn, out))
        if out is not None:
            out.write("\n")
    return answers


def run_chat(chat: Chat, lines: Iterable[str], out: TextIO | None = None) -> None:
    """The chat loop: one user turn a line; `/reset` forgets the conversation, `/exit` or the end of
    the lines quits. Bad input (special-token text, a message too long) is reported and skipped.
    Answers go to `out`, default standard output (as it is when called)."""
    out = sys.stdout if out is None else out
    try:
        for line in lines:
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/reset":
                chat.reset()
                print("(conversation cleared)", file=sys.stderr)
                continue
            try:
                check_text(text)
                chat.ask(text, out)
            except UserError as error:
                print(f"error: {error}", file=sys.stderr)
                continue
            out.write("\n")
            out.flush()
    except KeyboardInterrupt:  # Ctrl-C ends the chat; nothing to resume
        out.write("\n")


def read_turns(stream: TextIO | None = None) -> Iterable[str]:
    """User turns from a terminal (with a prompt, on stderr) or piped in, one a line; default: standard input
    (as it is when called, so that a replaced `sys.stdin` is read). A closed standard input (None) has no turns.
    Bytes that are not text in the stream's encoding are kept as escapes, and `run_chat` refuses that line."""
    stream = sys.stdin if stream is None else stream
    if stream is None:
        return
    try:
        stream.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a text file of the system's (a StringIO, a test's stand-in)
        pass
    if not stream.isatty():
        yield from stream
        return
    print("chat: /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        sys.stderr.write("you> ")
        sys.stderr.flush()
        line = stream.readline()
        if not line:
            return
        yield line


def check_text(line: str) -> None:
    """Refuse a line holding bytes its encoding could not read (they arrive as lone surrogates)."""
    bad = next((c for c in line if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        raise UserError(f"this line holds the byte 0x{ord(bad) - 0xdc00:02x}, which is not "
                        f"{getattr(sys.stdin, 'encoding', None) or 'UTF-8'} text: send text in that encoding")


def main(folder: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         system: str | None = None) -> None:
    """`python -m tinyllama_ft chat`: load `folder` and talk to it over standard input and output."""
    settings = generation_settings({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p},
                                   source="keyword")
    model, tokenizer = load_saved(folder)
    if settings.max_new_tokens >= context_length(model):
        raise UserError(f"--max_new_tokens {settings.max_new_tokens} leaves no room for a message in the model's "
                        f"{context_length(model)} positions: pass at most {context_length(model) // 2}")
    system = system if system is not None else saved_system_prompt(folder)
    if system and find_special_text(system, tokenizer):
        raise UserError(f"--system contains the special string {find_special_text(system, tokenizer)!r}: remove it")
    run_chat(Chat(model, tokenizer, system, settings.max_new_tokens, settings.temperature, settings.top_p),
             read_turns())
