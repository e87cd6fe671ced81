"""Property tests: for arbitrary text the mask covers exactly the response (every assistant turn of a
conversation) and its EOS, and the prompt ids are exactly the ids inference feeds."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyllama_ft.data.encoding import IGNORE_INDEX, encode_example, encode_prompt, find_special_text
from tinyllama_ft.data.formats import to_conversation, to_example
from tinyllama_ft.errors import UserError

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
long_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=2000, max_size=4000)
nonblank = text.filter(lambda s: s.strip())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instruction=nonblank, context=st.one_of(st.just(""), text, long_text), response=st.one_of(nonblank, long_text))
def test_mask_covers_exactly_the_response_and_eos(tinyllama_tokenizer, instruction, context, response):
    tok = tinyllama_tokenizer
    row = {"instruction": instruction, "context": context, "response": response}
    if not response.strip():
        return
    example = to_example(row)
    if any(find_special_text(t, tok) for t in (instruction, context, response)):
        with pytest.raises(UserError, match="special string"):
            encode_example(tok, example)
        return
    item = encode_example(tok, example)
    prompt = encode_prompt(tok, example["prompt"])
    n = len(prompt)
    assert item["input_ids"][:n] == prompt
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["labels"][-1] == tok.eos_token_id and item["labels"].count(tok.eos_token_id) == 1
    assert tok.decode(item["labels"][n:-1]) == example["completion"][0]["content"]


role_text = st.one_of(nonblank, st.sampled_from(["Hi", "Context:\nx", " lead", "trail ", "\n\n", "end</s"]).filter(
    lambda s: s.strip()))


@st.composite
def conversations(draw):
    """1-3 user/assistant turns of arbitrary text, sometimes after a system turn."""
    messages = [{"role": "system", "content": draw(nonblank)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(role_text)}, {"role": "assistant", "content": draw(role_text)}]
    return messages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_conversation_mask_covers_exactly_the_assistant_turns(tinyllama_tokenizer, messages):
    """Every assistant turn and its EOS trained, nothing else; before each turn, the inference ids."""
    tok = tinyllama_tokenizer
    example = to_conversation({"messages": messages}, "messages")  # contents stripped, as for every row
    messages = example["messages"]
    if any(find_special_text(m["content"], tok) for m in messages):
        with pytest.raises(UserError, match="special string"):
            encode_example(tok, example)
        return
    item = encode_example(tok, example)
    ids, labels = item["input_ids"], item["labels"]
    expected = [IGNORE_INDEX] * len(ids)
    for end, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(encode_prompt(tok, messages[:end]))
            assert ids[:start] == encode_prompt(tok, messages[:end])
            stop = ids.index(tok.eos_token_id, start) + 1
            assert tok.decode(ids[start:stop - 1]) == message["content"]
            expected[start:stop] = ids[start:stop]
    assert labels == expected and ids[-1] == tok.eos_token_id
    assert labels.count(tok.eos_token_id) == sum(m["role"] == "assistant" for m in messages)
