"""`chat`: every turn is `encode_prompt` over the conversation so far; greedy answers equal
`generate`'s; the history is trimmed from the oldest turn; bad lines are reported, not fatal;
the real command line works with piped standard input."""

import io

import pytest

from tinyllama_ft import encode_prompt, generate, load_for_inference
from tinyllama_ft.storage.saved_model import saved_system_prompt
from tinyllama_ft.inference.chat import Chat, chat_turns, run_chat
from tinyllama_ft.storage.saved_model import load_saved
from tinyllama_ft.errors import UserError
from tinyllama_ft.model.loading import build_tiny_model, build_tiny_tokenizer

from runs import cli, stories_run


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model().eval(), build_tiny_tokenizer()


def test_first_answer_equals_generate_and_streams_the_same_text(tiny):
    model, tokenizer = tiny
    out = io.StringIO()
    answers = chat_turns(model, tokenizer, ["Name a color.", "And another one?"], out=out, max_new_tokens=12)
    assert answers[0] == generate(model, tokenizer, "Name a color.", max_new_tokens=12, progress=False)["text"]
    assert out.getvalue() == (f"user> Name a color.\nassistant> {answers[0]}\n"
                              f"user> And another one?\nassistant> {answers[1]}\n")


def test_each_turn_is_encode_prompt_over_the_whole_conversation(tiny, monkeypatch):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, system="Answer briefly.", max_new_tokens=6)
    first = chat.ask("Name a color.")
    fed = []
    monkeypatch.setattr(chat, "answer", lambda ids, out=None: fed.append(ids) or "ok")
    chat.ask("Why?")
    assert fed[0] == encode_prompt(tokenizer, [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": first}, {"role": "user", "content": "Why?"}])
    assert fed[0][0] == tokenizer.bos_token_id and fed[0].count(tokenizer.bos_token_id) == 1
    chat.reset()
    chat.ask("Name a color.")
    assert fed[1] == encode_prompt(tokenizer, [{"role": "system", "content": "Answer briefly."},
                                               {"role": "user", "content": "Name a color."}])


def test_a_long_conversation_drops_the_oldest_turns_and_keeps_the_system_message(tiny, monkeypatch, capsys):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, system="Be kind.", max_new_tokens=980)  # 1024 positions: 44 left for the prompt
    monkeypatch.setattr(chat, "answer", lambda ids, out=None: "Blue.")
    system = [{"role": "system", "content": "Be kind."}]
    for turn in ["Name a color.", "Name a fruit.", "Name a tree.", "Name a bird."]:
        ids = chat.prompt_ids(turn)
        assert len(ids) <= 44
        assert ids == encode_prompt(tokenizer, system + chat.history + [{"role": "user", "content": turn}])
        chat.history += [{"role": "user", "content": turn}, {"role": "assistant", "content": "Blue."}]
    assert 2 <= len(chat.history) < 8 and chat.history[0]["role"] == "user"
    assert "(context full: dropped the oldest" in capsys.readouterr().err
    with pytest.raises(UserError, match="shorten it or lower --max_new_tokens"):
        chat.prompt_ids("word " * 60)


def test_special_token_text_is_reported_and_the_chat_goes_on(tiny, capsys):
    model, tokenizer = tiny
    chat = Chat(model, tokenizer, max_new_tokens=6)
    out = io.StringIO()
    run_chat(chat, ["Say </s> now\n", "\n", "Name a color.\n", "/exit\n", "Never read.\n"], out)
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: text contains the special string '</s>'")
    assert out.getvalue() == generate(model, tokenizer, "Name a color.", max_new_tokens=6, progress=False)["text"] + "\n"
    assert [m["content"] for m in chat.history] == ["Name a color.", out.getvalue().strip()]


def test_a_folder_that_is_neither_a_run_nor_a_merged_model_is_one_line(tmp_path):
    with pytest.raises(UserError, match="neither a run folder .* nor a merged export"):
        load_saved(str(tmp_path))
    (tmp_path / "run_config.json").write_text('{"system_prompt": "Be brief."}', encoding="utf-8")
    assert saved_system_prompt(str(tmp_path)) == "Be brief."
    (tmp_path / "run_config.json").write_text('{"system_prompt": ""}', encoding="utf-8")
    assert saved_system_prompt(str(tmp_path)) is None


@pytest.mark.slow
def test_chat_command_line_with_piped_input_on_a_fine_tuned_stories260k(tmp_path):
    run = stories_run()
    lines = "Name three primes.\nTell me </s> more\nWhy is that?\n/reset\nName three primes.\n/exit\nunread\n"
    result = cli("chat", "--adapter", run, "--max_new_tokens", 16, input=lines)
    model, tokenizer = load_for_inference(str(run), device="cpu")
    first = generate(model, tokenizer, "Name three primes.", max_new_tokens=16, progress=False)["text"]
    chat = Chat(model, tokenizer, max_new_tokens=16)
    assert chat.ask("Name three primes.") == first and first
    second = chat.ask("Why is that?")
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "error: text contains the special string '</s>'" in result.stderr
    assert "(conversation cleared)" in result.stderr and "Traceback" not in result.stderr

    bad = cli("chat", "--adapter", tmp_path, check=False, input="")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
