"""How `serve` runs the model, through transformers' public generation API only.

* **Its own path**: `model.generate` for one request at a time, streamed through an
  `AsyncTextIteratorStreamer` (a `TextIteratorStreamer` for the event loop); any generation setting applies.
* **Continuous batching** (`model.init_continuous_batching`, the manager behind `generate_batch`): the
  requests that arrive together share the model's steps, each with its own budget and EOS. The manager decodes
  every request with one generation config (greedy, the model's), so a request that asks for anything else
  (sampling, a penalty, stop strings, beams) runs on its own path instead, the shared batch paused meanwhile
  (`manager.pause()`): it gets exactly its settings, and the greedy requests theirs.

A request is bounded in time in both: `max_time` on its own path, a cancelled request in the shared batch.
Its answer is its new ids; `Stripped` streams their text as `generate` strips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass

import torch
from transformers import AsyncTextIteratorStreamer, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..model.batching import CB_LOGGERS

log = logging.getLogger(__name__)

PER_REQUEST = ("max_new_tokens", "eos_token_id", "max_time", "use_cache", "max_length")  # what a shared batch sets per request
GREEDY_BELOW = 1e-3  # a temperature under this decodes greedily (api.GREEDY)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # moot when greedy


@dataclass
class Job:
    """One request's work: its prompt ids, its generation config, its seed."""

    ids: list[int]
    config: GenerationConfig
    seed: int | None = None


@dataclass
class Done:
    """The end of an answer: the ids generated (the EOS included where the model emitted it)."""

    ids: list[int]


def request_config(model, tokenizer, settings: dict, budget: int, timeout_s: float) -> GenerationConfig:
    """The model's generation config with a request's `settings` (transformers' names) laid over it: what the
    request sets wins, the rest (EOS, pad, greedy decoding) stays the model's. A temperature of 0 is greedy, a
    temperature above 0 samples (transformers alone would keep the model's `do_sample=False`). Raises
    ValueError for settings transformers refuses."""
    base = {k: v for k, v in model.generation_config.to_diff_dict().items() if k != "transformers_version"}
    settings = {k: v for k, v in settings.items() if k not in ("transformers_version", "max_length")}
    merged = {**base, **settings, "max_new_tokens": budget, "max_time": min(settings.get("max_time") or timeout_s,
                                                                              timeout_s)}
    if "temperature" in settings:  # below GREEDY_BELOW logits / temperature overflow to inf: the limit is greedy
        merged["do_sample"] = settings.get("do_sample", True) and settings["temperature"] >= GREEDY_BELOW
        if not merged["do_sample"]:
            merged.pop("temperature")
    merged.setdefault("eos_token_id", tokenizer.eos_token_id)
    merged.setdefault("pad_token_id", tokenizer.pad_token_id)
    merged.pop("max_length", None)  # the budget is max_new_tokens
    if not merged.get("stop_strings"):
        merged.pop("stop_strings", None)  # [] is none
    return GenerationConfig(**merged)


def shared_settings_asked(config: GenerationConfig, plain: GenerationConfig) -> list[str]:
    """The settings of a request's `config` (`name=value`) that differ from `plain`, a request's that sets
    nothing: a shared batch decodes every request with `plain`, so these need the request's own path. Sampling
    knobs of a request that does not sample change nothing and are not listed."""
    mine, base = config.to_dict(), plain.to_dict()
    sampling = bool(mine.get("do_sample"))
    skip = {*PER_REQUEST, "do_sample", "transformers_version", *(() if sampling else SAMPLING)}
    asked = [f"{key}={mine[key]!r}" for key in sorted(mine) if key not in skip and mine[key] != base.get(key)]
    if not asked and sampling != bool(base.get("do_sample")):
        asked = [f"do_sample={sampling!r}"]
    return asked


class Cancelled(StoppingCriteria):
    """Stops `generate` once the client has gone (set from the event loop)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class OwnPath:
    """`model.generate`, one request at a time in the order they came (an asyncio lock, first come first served:
    one model, and a seed is the global generator's)."""

    def __init__(self, model, tokenizer, pause=contextlib.nullcontext):
        self.model, self.tokenizer, self.pause = model, tokenizer, pause
        self.turn = asyncio.Lock()

    def _generate(self, job: Job, streamer, cancelled: Cancelled) -> list[int]:
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([job.ids], device=device)
        try:
            with self.pause():
                if job.seed is not None:
                    torch.manual_seed(job.seed)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=job.config,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([cancelled]),
                    tokenizer=self.tokenizer)  # for stop strings
        except BaseException:
            if streamer is not None:
                streamer.end()  # the reader waits for the stream's end
            raise
        return output[0, len(job.ids):].tolist()

    async def run(self, job: Job, stream: bool):
        """Text pieces (when `stream`) as they come, then `Done`."""
        loop = asyncio.get_running_loop()
        streamer = AsyncTextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) \
            if stream else None
        cancelled = Cancelled()
        async with self.turn:
            future = loop.run_in_executor(None, self._generate, job, streamer, cancelled)
            try:
                if streamer is not None:
                    async for text in streamer:
                        yield text
                ids = await future
            finally:
                cancelled.event.set()  # a client gone mid-answer: the model stops at its next token
                if not future.done():  # and the next request's turn waits for that
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(future)
        yield Done(ids)


class SharedBatch:
    """A continuous-batching manager for the server's life: greedy requests join it as they come."""

    def __init__(self, model, tokenizer, cache_config):
        self.model, self.tokenizer, self.cache_config = model, tokenizer, cache_config
        self.manager = None

    def start(self, plain: GenerationConfig) -> None:
        for name in CB_LOGGERS:  # its set-up and per-batch INFO lines (its own handler): warnings and errors only
            logging.getLogger(name).setLevel(logging.WARNING)
        self.manager = self.model.init_continuous_batching(generation_config=plain,
                                                           continuous_batching_config=self.cache_config)
        # as `continuous_batching_context_manager` does: without it a step took 0.6 s instead of 25 ms (stories260k
        # on 2 CPU cores, 16 requests at once)
        self.manager.warmup()
        self.manager.start()

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)  # its worker thread would keep the process from exiting
            self.manager.destroy()
            self.manager = None

    @contextlib.contextmanager
    def paused(self):
        """The model to oneself: the batch's loop waits at its next step (keeping its requests and cache)."""
        with self.manager.pause():
            yield

    async def run(self, job: Job, stream: bool):
        """Text pieces (when `stream`) as they come, then `Done`; cancelled at the job's `max_time`."""
        if self.manager is None:
            raise RuntimeError("continuous batching is not started: run the app with its lifespan (uvicorn, or "
                               "TestClient as a context manager)")
        loop, outputs, request_id = asyncio.get_running_loop(), asyncio.Queue(), f"serve-{uuid.uuid4().hex}"
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        self.manager.add_request(job.ids, request_id=request_id, max_new_tokens=job.config.max_new_tokens,
                                 streaming=True, eos_token_id=job.config.eos_token_id)
        deadline, ids, deltas, finished = loop.time() + job.config.max_time, [], TextDeltas(self.tokenizer), False
        try:
            while not finished:
                try:
                    output = await asyncio.wait_for(outputs.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break  # out of time: the answer so far
                if output.error is not None:
                    raise RuntimeError(f"continuous batching failed: {output.error}")
                ids, finished = list(output.generated_tokens), output.is_finished()
                if stream and (text := deltas.feed(ids)):
                    yield text
            yield Done(ids)
        finally:
            if not finished:
                self.manager.cancel_request(request_id)


class TextDeltas:
    """The new text of a growing list of ids, decoded as `generate` decodes (no special tokens); a piece that
    ends inside a character (the tokenizer's byte fallback) waits for the rest."""

    def __init__(self, tokenizer):
        self.tokenizer, self.sent = tokenizer, 0

    def feed(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new


class Stripped:
    """Streamed text as `generate` strips it: leading whitespace dropped, trailing whitespace held back until
    more text follows (so it never arrives after the last word)."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, text: str) -> str:
        text = self.pending + text
        text = text if self.started else text.lstrip()
        body = text.rstrip()
        self.pending, self.started = text[len(body):], self.started or bool(body)
        return body


class Engine:
    """Where each request runs: the shared batch when it asks for nothing the batch cannot give, else its own
    path (logged once per request)."""

    def __init__(self, model, tokenizer, continuous_batching: bool, cache_config=None):
        self.model, self.tokenizer = model, tokenizer
        self.batch = SharedBatch(model, tokenizer, cache_config) if continuous_batching else None
        self.own = OwnPath(model, tokenizer, self.batch.paused if self.batch else contextlib.nullcontext)

    def plain(self, timeout_s: float) -> GenerationConfig:
        return request_config(self.model, self.tokenizer, {}, 1, timeout_s)

    def start(self, timeout_s: float) -> None:
        if self.batch is not None:
            self.batch.start(self.plain(timeout_s))

    def stop(self) -> None:
        if self.batch is not None:
            self.batch.stop()

    def run(self, job: Job, stream: bool, request_id: str):
        """The async generator of `job`'s answer: text pieces (when `stream`), then `Done`."""
        if self.batch is None:
            return self.own.run(job, stream)
        asked = shared_settings_asked(job.config, self.plain(job.config.max_time))
        if asked:
            log.info("request %s runs on its own (generate): a shared batch decodes greedily and cannot honour %s",
                     request_id, ", ".join(asked))
            return self.own.run(job, stream)
        return self.batch.run(job, stream)
