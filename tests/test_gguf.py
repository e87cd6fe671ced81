"""GGUF export is the same model, proved with independent readers: transformers' GGUF loader (tokens on
every real Dolly row, logits after a real stories260k fine-tune, f16 and q8_0), llama.cpp itself (the
prompt ids of the embedded and of the Ollama template, greedy tokens), and the Ollama Modelfile's template
rendered by hand against the HF chat template. Numbers are printed (`pytest -s`) and in docs/EXPORT.md."""

import json
import re

import pytest
import torch

from tinyllama_ft import (build_trainer, encode_prompt, fit, load_for_inference, load_rows, load_tokenizer,
                          parse_config, prepare_data, save_run, setup_model, to_example)
from tinyllama_ft.cli import main as cli_main
from tinyllama_ft.data.encoding import find_special_text
from tinyllama_ft.evaluation.dolly import pad_batch
from tinyllama_ft.export.gguf import (OLLAMA_SPACE, OLLAMA_TEMPLATE, export_gguf, find_tokenizer_model, modelfile_text,
                                      write_gguf)

SYSTEM = "You are a concise assistant."
NEW_TOKENS = 32
F16_TOLERANCE = 0.05   # max |logit difference| f16 file vs fp32 merged model (measured 0.0111 on stories260k)
Q8_0_TOLERANCE = 1.0   # the same for q8_0 (measured 0.389)


# --- helpers ---------------------------------------------------------------------------------------

def gguf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gguf_fields(path) -> tuple[dict, list]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}, reader.tensors


def conversation(rows, system=True) -> list[dict]:
    """Real Dolly rows as a chat: each earlier row a user turn and its answer, the last one's user turn."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for row in rows[:-1]:
        example = to_example(row)
        messages += example["prompt"] + example["completion"]
    return messages + to_example(rows[-1])["prompt"]


def clean_rows(rows, tokenizer, n, max_tokens=120):
    """The first `n` rows without special-token text and short enough for stories260k's 512 context."""
    picked = [row for row in rows if find_special_text(row["instruction"] + row["context"] + row["response"],
                                                       tokenizer) is None
              and len(tokenizer(row["instruction"] + row["context"] + row["response"]).input_ids) < max_tokens]
    assert len(picked) >= n
    return picked[:n]


def render_ollama(template: str, messages: list[dict]) -> str:
    """Ollama's Go template language, only what OLLAMA_TEMPLATE uses: `{{ range .Messages }}...{{ end }}`,
    `{{ .Role }}`, `{{ .Content }}`, string literals and `{{-`/`-}}` trimming. Anything else fails."""
    pieces = re.split(r"(\{\{.*?\}\})", template)
    items = []  # ("text", s) or ("action", expression)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            items.append(["text", piece])
            continue
        if piece.startswith("{{-"):
            items[-1][1] = items[-1][1].rstrip()
        items.append(["action", piece.strip("{}").strip("-").strip(), piece.endswith("-}}")])
    for i, item in enumerate(items):
        if item[0] == "action" and item[2] and i + 1 < len(items):
            items[i + 1][1] = items[i + 1][1].lstrip()

    def run(start: int, scope: dict | None) -> tuple[str, int]:
        out, i = [], start
        while i < len(items):
            kind, value = items[i][0], items[i][1]
            if kind == "text":
                out.append(value)
            elif value == "range .Messages":
                end = i
                for message in messages:
                    body, end = run(i + 1, message)
                    out.append(body)
                if not messages:
                    _, end = run(i + 1, {"Role": "", "Content": ""})
                i = end
            elif value == "end":
                return "".join(out), i
            elif value in (".Role", ".Content") and scope is not None:
                out.append(scope[value[1:].lower()])
            elif value.startswith('"'):
                out.append(json.loads(value))
            else:
                raise ValueError(f"construct {value!r} is not handled by this renderer")
            i += 1
        return "".join(out), i

    return run(0, None)[0]


def modelfile_template(text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)


# --- (a) the tokenizer on every real Dolly row, and the metadata ---------------------------------------

def token_agreement(hf, gg, rows) -> tuple[int, int]:
    """(rows whose whole conversation and whose prompt encode identically, rows compared). The saved template
    writes the BOS, so the GGUF tokenizer reads the rendered text without adding its own."""
    same = 0
    for row in rows:
        example = to_example(row)
        messages = example["prompt"] + example["completion"]
        text = hf.apply_chat_template(messages, tokenize=False)
        full = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt_text = hf.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ok = (find_special_text(text, hf) is not None  # encode_prompt refuses these rows
                     or gg(prompt_text, add_special_tokens=False).input_ids == encode_prompt(hf, example["prompt"]))
        same += prompt_ok and gg(text, add_special_tokens=False).input_ids == full and full[0] == hf.bos_token_id
    return same, len(rows)


@pytest.fixture(scope="module")
def tinyllama_vocab_gguf(tinyllama_tokenizer, tmp_path_factory):
    """A vocabulary-only GGUF of the real TinyLlama tokenizer (there are no TinyLlama weights offline)."""
    folder = tinyllama_tokenizer.name_or_path
    path = tmp_path_factory.mktemp("tinyllama") / "tinyllama-vocab.gguf"
    return write_gguf(None, tinyllama_tokenizer, path, spm_dir=find_tokenizer_model(folder, folder, tinyllama_tokenizer))


def test_tinyllama_tokenizer_in_gguf_encodes_every_dolly_row_like_hf(tinyllama_tokenizer, tinyllama_vocab_gguf,
                                                                      dolly_rows):
    same, n = token_agreement(tinyllama_tokenizer, gguf_tokenizer(tinyllama_vocab_gguf), dolly_rows)
    print(f"TinyLlama tokenizer, transformers' GGUF reader: {same}/{n} Dolly rows encode identically")
    assert same == n == 1109


def test_gguf_vocabulary_is_sentencepiece_with_scores_types_and_special_ids(tinyllama_tokenizer, tinyllama_vocab_gguf):
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    fields, tensors = gguf_fields(tinyllama_vocab_gguf)
    sp = SentencePieceProcessor(model_file=f"{tinyllama_tokenizer.name_or_path}/tokenizer.model")
    n = sp.get_piece_size()
    assert fields["tokenizer.ggml.model"] == "llama" and len(tensors) == 0
    assert fields["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    expected = [TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i) else
                TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL for i in range(n)]
    assert fields["tokenizer.ggml.token_type"] == [int(t) for t in expected]
    assert [fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")] == [1, 2, 0, 2]
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    # llama.cpp may not prefix text after special tokens (the HF tokenizer does not): see export/gguf.py
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.chat_template"] == tinyllama_tokenizer.chat_template  # it writes the BOS and a space
    assert tinyllama_tokenizer.chat_template.startswith("{{ bos_token }}{{ ' ' }}{% for message in messages %}")


def test_missing_or_foreign_tokenizer_model_is_one_clear_error(tinyllama_tokenizer, stories_dir, tmp_path):
    from tinyllama_ft import UserError

    with pytest.raises(UserError, match="tokenizer.model of nowhere/base was not found"):
        find_tokenizer_model(str(tmp_path), "nowhere/base", tinyllama_tokenizer)
    with pytest.raises(UserError, match="does not match the run's tokenizer"):
        find_tokenizer_model(stories_dir, stories_dir, tinyllama_tokenizer)


# --- the Ollama Modelfile ---------------------------------------------------------------------------

def test_modelfile_template_renders_what_the_hf_chat_template_renders(tinyllama_tokenizer, dolly_rows):
    text = modelfile_text("run-f16.gguf", 2048, system_prompt=SYSTEM)
    template = modelfile_template(text)
    assert template == OLLAMA_SPACE + OLLAMA_TEMPLATE
    rows = clean_rows(dolly_rows, tinyllama_tokenizer, 3, max_tokens=400)
    for turns in (1, 2, 3):
        for system in (True, False):
            messages = conversation(rows[:turns], system)
            hf = tinyllama_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # the one leading space becomes llama.cpp's first "▁" (test_llama_cpp_* checks the ids); llama.cpp
            # adds the BOS that the HF template writes (add_bos_token)
            assert render_ollama(template, messages) == hf.removeprefix(tinyllama_tokenizer.bos_token)
    lines = text.splitlines()
    assert lines[0] == "FROM ./run-f16.gguf" and f'SYSTEM """{SYSTEM}"""' in lines
    assert ['PARAMETER stop "</s>"', 'PARAMETER stop "<|user|>"', 'PARAMETER temperature 0',
            'PARAMETER repeat_penalty 1', 'PARAMETER num_ctx 2048'] == [line for line in lines if line in (
                'PARAMETER stop "</s>"', 'PARAMETER stop "<|user|>"', 'PARAMETER temperature 0',
                'PARAMETER repeat_penalty 1', 'PARAMETER num_ctx 2048')]
    assert "SYSTEM" not in modelfile_text("run-f16.gguf", 2048)
    assert render_ollama(modelfile_template(modelfile_text("m.gguf", 8, leading_space=False)),
                         [{"role": "user", "content": "Hi"}]) == "<|user|>\nHi</s>\n<|assistant|>\n"


# --- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--quantization", "q8_0"], "--quantization applies to GGUF files: add --format gguf"),
    (["--format", "gguf", "--quantization", "q4_k"], "argument --quantization: invalid choice: 'q4_k'"),
    (["--format", "ggml"], "argument --format: invalid choice: 'ggml'"),
])
def test_export_flags_are_checked_before_anything_loads(args, message, tmp_path, capsys):
    assert cli_main(["export", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_export_refuses_an_existing_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert cli_main(["export", "--adapter", str(tmp_path), "--out", str(tmp_path / "out"), "--format", "gguf"]) == 2
    assert "already exists: remove it or choose another folder" in capsys.readouterr().err


# --- a real fine-tune of stories260k, exported ------------------------------------------------------

@pytest.fixture(scope="module")
def stories_run(stories_dir, dolly_path, tmp_path_factory):
    """24 real steps on Dolly (LoRA on q/k/v/o, so the permuted q/k rows carry trained deltas), saved,
    then exported through the command line (f16) and the function (q8_0)."""
    root = tmp_path_factory.mktemp("gguf")
    out = root / "run"
    config = parse_config(
        model_name_or_path=stories_dir, dataset_name=dolly_path, output_dir=str(out), max_length=256,
        train_size=96, eval_size=16, test_size=8, num_generate=0, max_steps=24, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, learning_rate=3e-3, logging_steps=8, eval_steps=1000, save_steps=1000,
        gradient_checkpointing=False, precision="fp32", lora_r=8, lora_alpha=16)
    tokenizer = load_tokenizer(stories_dir)
    data = prepare_data(config, tokenizer)
    model = setup_model(config, tokenizer)
    trainer = build_trainer(config, model, tokenizer, data)
    fit(trainer)
    save_run(config, model, tokenizer, {"train_steps": 24}, data.split, trainer.state.log_history, generations={})
    run_config = json.loads((out / "run_config.json").read_text(encoding="utf-8"))  # system_prompt: a Config field
    (out / "run_config.json").write_text(json.dumps({**run_config, "system_prompt": SYSTEM}), encoding="utf-8")  # chat, read by .get
    lora_b = max(p.detach().abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
    assert cli_main(["export", "--adapter", str(out), "--out", str(root / "f16"), "--format", "gguf"]) == 0
    exports = {"f16": root / "f16" / "run-f16.gguf",
               "q8_0": export_gguf(str(out), str(root / "q8_0"), "q8_0")}
    merged, _ = load_for_inference(str(out), device="cpu", dtype=torch.float32)
    merged = merged.merge_and_unload().eval()
    prompts = [encode_prompt(tokenizer, conversation([row], system=False))
               for row in clean_rows(load_rows(dolly_path), tokenizer, 12)]
    return dict(out=out, tokenizer=tokenizer, data=data, merged=merged, exports=exports, lora_b=lora_b,
                prompts=prompts, merged_greedy=[greedy(merged, ids) for ids in prompts])


def logits_of(model, examples, pad_id):
    batch = pad_batch(examples, pad_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch["attention_mask"].bool()


def greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=2, pad_token_id=2)
    return out[0, len(ids):].tolist()


def first_divergence_margin(model, ids, a, b) -> float:
    """The reference model's top-1 minus top-2 logit where two greedy outputs first differ."""
    k = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
    with torch.no_grad():
        top = model(torch.tensor([ids + b[:k]])).logits[0, -1].topk(2).values
    return (top[0] - top[1]).item()


def fp16_rounded(model):
    """The merged model with each matrix rounded to fp16, as the f16 file stores it (1-D tensors stay f32)."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return rounded


@pytest.mark.slow
def test_stories_gguf_tokenizer_encodes_every_dolly_row_like_hf(stories_run, dolly_rows):
    same, n = token_agreement(stories_run["tokenizer"], gguf_tokenizer(stories_run["exports"]["f16"]), dolly_rows)
    print(f"stories260k tokenizer, transformers' GGUF reader: {same}/{n} Dolly rows encode identically")
    assert same == n == 1109


@pytest.mark.slow
def test_f16_gguf_has_the_merged_models_logits(stories_run, dolly_rows):
    path = stories_run["exports"]["f16"]
    fields, tensors = gguf_fields(path)
    names = {t.name: t.tensor_type.name for t in tensors}
    assert stories_run["lora_b"] > 1e-3, "lora_B starts at zero: the merge must carry a trained delta"
    assert "output.weight" not in names and len(names) == 1 + 5 * 9 + 1  # tied embeddings: no output.weight
    assert {t for n, t in names.items() if "norm" in n} == {"F32"} and names["blk.0.attn_q.weight"] == "F16"
    assert [fields[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                           "attention.head_count", "attention.head_count_kv")] == [512, 64, 5, 172, 8, 4]
    assert fields["general.name"] == "run"  # the run folder's name, as `ollama list` and llama.cpp's logs show it
    assert fields["llama.rope.freq_base"] == 10000.0 and fields["llama.attention.layer_norm_rms_epsilon"] == \
        pytest.approx(1e-5) and fields["general.file_type"] == 1

    merged, gg, pad = stories_run["merged"], gguf_model(path), stories_run["tokenizer"].pad_token_id
    examples = stories_run["data"].examples("validation")[:8]
    reference, mask = logits_of(merged, examples, pad)
    got, _ = logits_of(gg, examples, pad)
    rounded, _ = logits_of(fp16_rounded(merged), examples, pad)
    exact = (got - rounded)[mask].abs().max().item()
    diff = (got - reference)[mask].abs().max().item()
    argmax = (got.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()
    f16_greedy = [greedy(gg, ids) for ids in stories_run["prompts"]]
    stories_run["f16_greedy"] = f16_greedy  # for the llama.cpp test
    same = sum(a == b for a, b in zip(f16_greedy, stories_run["merged_greedy"]))
    print(f"f16 {path.stat().st_size} bytes: max |logit diff| {diff:.4f} vs the fp32 merged model over {int(mask.sum())} "
          f"positions ({exact:.2e} vs its fp16-rounded weights), argmax agreement {argmax:.4f}, greedy "
          f"{NEW_TOKENS}-token outputs identical {same}/12")
    assert exact < 1e-4  # the conversion itself is exact: only the storage dtype rounds
    assert diff < F16_TOLERANCE and argmax > 0.99 and same >= 11


@pytest.mark.slow
def test_q8_0_gguf_is_within_its_measured_tolerance(stories_run, dolly_rows):
    path, f16 = stories_run["exports"]["q8_0"], stories_run["exports"]["f16"]
    fields, tensors = gguf_fields(path)
    types = {t.name: t.tensor_type.name for t in tensors}
    assert fields["general.file_type"] == 7 and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 172 values are not Q8_0 blocks of 32
    merged, gg, pad = stories_run["merged"], gguf_model(path), stories_run["tokenizer"].pad_token_id
    examples = stories_run["data"].examples("validation")[:8]
    reference, mask = logits_of(merged, examples, pad)
    got, _ = logits_of(gg, examples, pad)
    diff = (got - reference)[mask].abs().max().item()
    argmax = (got.argmax(-1) == reference.argmax(-1))[mask].float().mean().item()
    outputs = [greedy(gg, ids) for ids in stories_run["prompts"]]
    same = sum(a == b for a, b in zip(outputs, stories_run["merged_greedy"]))
    margins = [first_divergence_margin(merged, ids, a, b)
               for ids, a, b in zip(stories_run["prompts"], outputs, stories_run["merged_greedy"]) if a != b]
    print(f"q8_0 {path.stat().st_size} bytes (f16 {f16.stat().st_size}): max |logit diff| {diff:.4f}, argmax "
          f"agreement {argmax:.4f}, greedy {NEW_TOKENS}-token outputs identical {same}/12; where they part, the "
          f"merged model's top-2 logit margin is at most {max(margins, default=0):.3f}")
    assert diff < Q8_0_TOLERANCE and argmax > 0.95 and path.stat().st_size < f16.stat().st_size


@pytest.mark.slow
def test_export_writes_a_modelfile_for_the_file_with_the_runs_system_prompt(stories_run):
    folder = stories_run["exports"]["f16"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "run-f16.gguf"]
    text = (folder / "Modelfile").read_text(encoding="utf-8")
    assert text == modelfile_text("run-f16.gguf", 512, system_prompt=SYSTEM)


# --- (c) llama.cpp itself ---------------------------------------------------------------------------

def llama_greedy(llm, ids: list[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == NEW_TOKENS:
            break
        out.append(token)
    return out


@pytest.mark.slow
def test_llama_cpp_reads_the_prompt_and_answers_like_hf(llama_cpp, stories_run, dolly_rows):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer, path = stories_run["tokenizer"], stories_run["exports"]["f16"]
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, verbose=False)  # deterministic, kind to a shared box
    try:
        embedded = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
        ollama = modelfile_template((path.parent / "Modelfile").read_text(encoding="utf-8"))
        rows = clean_rows(dolly_rows, tokenizer, 12)
        for turns in (1, 2, 3):  # the prompt ids: llama.cpp's tokenizer on both templates = encode_prompt
            messages = conversation(rows[:turns], system=True)
            ids = encode_prompt(tokenizer, messages)
            # add_bos=False, as llama-cpp-python's Jinja chat handler tokenizes: the template writes the BOS
            assert llm.tokenize(embedded(messages=messages).prompt.encode(), add_bos=False, special=True) == ids
            assert llm.tokenize(render_ollama(ollama, messages).encode(), add_bos=True, special=True) == ids
        prompts = stories_run["prompts"]
        for ids, row in zip(prompts, rows):
            rendered = embedded(messages=conversation([row], system=False)).prompt
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
        ours = [llama_greedy(llm, ids) for ids in prompts]
    finally:
        llm.close()
    hf = stories_run.get("f16_greedy") or [greedy(gguf_model(path), ids) for ids in prompts]
    merged = stories_run["merged_greedy"]
    same, same_merged = sum(a == b for a, b in zip(ours, hf)), sum(a == b for a, b in zip(ours, merged))
    print(f"llama.cpp greedy {NEW_TOKENS} tokens: identical to transformers on the same f16 file {same}/12, "
          f"to the fp32 merged model {same_merged}/12; prompt ids identical 12/12 + 3 multi-turn, both templates")
    assert same == 12 and same_merged >= 11


# --- the smoke run (byte-level BPE tokenizer) ---------------------------------------------------------

@pytest.mark.slow
def test_smoke_run_exports_a_gguf_that_reads_back(tmp_path, dolly_rows):
    from tinyllama_ft.model.loading import build_tiny_tokenizer

    assert cli_main(["train", "--preset", "smoke", "--output_dir", str(tmp_path / "smoke")]) == 0
    assert cli_main(["export", "--adapter", str(tmp_path / "smoke"), "--out", str(tmp_path / "gguf"),
                     "--format", "gguf", "--quantization", "q8_0"]) == 0
    path = tmp_path / "gguf" / "smoke-q8_0.gguf"
    fields, _ = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.merges"]) > 0
    hf = build_tiny_tokenizer()
    assert fields["tokenizer.chat_template"] == hf.chat_template  # byte-level: no space to compensate
    same, n = token_agreement(hf, gguf_tokenizer(path), dolly_rows[:200])
    assert same == n
    assert 'TEMPLATE """{{ range .Messages }}' in (tmp_path / "gguf" / "Modelfile").read_text(encoding="utf-8")
    model, _ = load_for_inference(str(tmp_path / "smoke"), device="cpu", dtype=torch.float32)
    ids = encode_prompt(hf, [{"role": "user", "content": "Give me three uses of a brick."}])
    assert len(greedy(gguf_model(path), ids)) > 0


def test_llama_cpp_tokenizes_every_tinyllama_dolly_prompt_like_encode_prompt(llama_cpp, tinyllama_tokenizer,
                                                                             tinyllama_vocab_gguf, dolly_rows):
    """The real TinyLlama vocabulary in llama.cpp's own tokenizer, the prompt rendered by the GGUF's template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(tinyllama_vocab_gguf), vocab_only=True, verbose=False)
    try:
        embedded = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>")
        rows = [row for row in dolly_rows if find_special_text(row["instruction"] + row["context"],
                                                               tinyllama_tokenizer) is None]
        same = sum(llm.tokenize(embedded(messages=conversation([row])).prompt.encode(), add_bos=False, special=True)
                   == encode_prompt(tinyllama_tokenizer, conversation([row])) for row in rows)
    finally:
        llm.close()
    print(f"TinyLlama tokenizer, llama.cpp: {same}/{len(rows)} Dolly prompts (with a system turn) identical")
    assert same == len(rows) > 1000


def test_f32_gguf_is_the_model_exactly_in_llama_cpp(llama_cpp, stories_dir, dolly_rows, tmp_path):
    """`--quantization f32` keeps every weight as it is: llama.cpp's logits on real Dolly prompts equal
    transformers' to float32 rounding, given an f32 KV cache (llama.cpp's default f16 cache alone moves the
    logits of stories260k by ~0.03, measured)."""
    from transformers import AutoModelForCausalLM

    lib = llama_cpp
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(stories_dir)
    path = tmp_path / "stories-f32.gguf"
    write_gguf(model, tokenizer, path, "f32", spm_dir=stories_dir, name="stories")
    assert gguf_fields(path)[0]["general.file_type"] == 0  # ALL_F32
    llm = lib.Llama(str(path), n_ctx=512, logits_all=True, n_threads=1, type_k=0, type_v=0, verbose=False)
    try:
        worst = 0.0
        for row in dolly_rows[:4]:
            ids = encode_prompt(tokenizer, [{"role": "user", "content": row["instruction"][:200]}])
            with torch.no_grad():
                reference = model(torch.tensor([ids])).logits[0]
            llm.reset()
            llm.eval(ids)
            got = torch.tensor(llm.scores[: len(ids)])
            worst = max(worst, (got - reference).abs().max().item())
    finally:
        llm.close()
    print(f"f32 GGUF in llama.cpp vs transformers: max |logit diff| {worst:.2e}")
    assert worst < 1e-3  # measured 2.7e-5
