"""DPO after SFT: preference pairs in TRL's formats, the prompt identity with SFT and inference (and
TRL's stock DPO tokenization beside it), and, end to end on the real stories260k: SFT through `train`,
then `dpo` on pairs of real Dolly rows (the whole response chosen over its first half, which stops too
soon), the held-out metrics, recomputed by hand, resume after a kill, the two reference strategies'
peak memory side by side, bad inputs in one line, and the DPO run folder used by generate and export."""

import atexit
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, asset
from runs import cli, stories_run
from tinyllama_ft.data.encoding import encode_example, encode_prompt
from tinyllama_ft.data.formats import format_user_turn
from tinyllama_ft.errors import UserError
from tinyllama_ft.data.pairs import (degrade_first_half, encode_pair, encode_pairs, load_pairs,
                                     pair_examples, pairs_from_dolly, to_pair)

SAMPLE_PAIRS = ROOT / "tinyllama_ft" / "samples" / "sample_pairs.jsonl"
USER = [{"role": "user", "content": "Name a primary colour."}]


# --- formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", [
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Blue is nice"},  # explicit, strings
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "Red."}],  # explicit, conversational
     "rejected": [{"role": "assistant", "content": "Blue is nice"}]},
    {"chosen": [*USER, {"role": "assistant", "content": "Red."}],  # implicit, conversational
     "rejected": [*USER, {"role": "assistant", "content": "Blue is nice"}]},
    {"prompt": "Name a primary colour.", "chosen": [*USER, {"role": "assistant", "content": "Red."}],  # H4 orca
     "rejected": [*USER, {"role": "assistant", "content": "Blue is nice"}]},
])
def test_every_preference_format_gives_the_same_pair(row):
    assert to_pair(row) == {"prompt": USER, "chosen": "Red.", "rejected": "Blue is nice", "category": ""}


def test_implicit_string_prompt_and_system_column():
    pair = to_pair({"chosen": "Q: colour? A: red", "rejected": "Q: colour? A: blue", "system": "Be brief."})
    assert pair["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: colour? A:"}]
    assert (pair["chosen"], pair["rejected"]) == ("red", "blue")


def test_columns_map_intel_orca_pairs(tmp_path):
    path = tmp_path / "intel.jsonl"  # Intel/orca_dpo_pairs' columns
    path.write_text(json.dumps({"system": "You are helpful.", "question": "Name a primary colour.", "chosen": "Red.",
                                "rejected": "Blue is nice"}) + "\n", encoding="utf-8")
    (row,) = load_pairs(str(path), columns={"prompt": "question"})
    assert to_pair(row)["prompt"] == [{"role": "system", "content": "You are helpful."}, *USER]
    with pytest.raises(UserError, match="has no column 'prompt_text'"):
        load_pairs(str(path), columns={"prompt": "prompt_text"})


def test_unusable_pairs_are_refused_by_reason_and_counted(tinyllama_tokenizer):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "  "},
            {"prompt": "p", "chosen": "same", "rejected": " same "}, {"prompt": "p", "chosen": "a </s> b", "rejected": "b"},
            {"prompt": "p", "chosen": "word " * 100, "rejected": "b"},
            {"prompt": "p", "chosen": 42, "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": [1, 2]}]
    encoded, excluded, _ = encode_pairs(tinyllama_tokenizer, rows, max_length=64)
    assert sorted(encoded) == [0]
    from tinyllama_ft.data.prepare import exclusion_counts

    assert exclusion_counts(excluded) == {"missing chosen": 1, "empty rejected": 1, "chosen == rejected": 1,
                                          "special-token text": 1, "over max_length": 1, "bad chosen": 1,
                                          "bad rejected": 1}
    assert excluded[6].startswith("bad chosen: an int, not text") and excluded[7].startswith("bad rejected: a list "
                                                                                             "of int, not text")


def test_a_pairs_file_with_sft_columns_is_one_clear_error(dolly_path):
    with pytest.raises(UserError, match="holds SFT rows .* not preference pairs"):
        load_pairs(dolly_path)


def test_the_bundled_pairs_are_small_real_and_usable(tinyllama_tokenizer):
    assert SAMPLE_PAIRS.stat().st_size < 200_000
    rows = load_pairs(str(SAMPLE_PAIRS))
    encoded, excluded, _ = encode_pairs(tinyllama_tokenizer, rows, max_length=1024)
    assert len(rows) >= 100 and not excluded
    assert Counter(r["rejected_kind"] for r in rows) == {"first_half": len(rows) // 2, "other_row": len(rows) // 2}


# --- prompt identity -----------------------------------------------------------------------------

def test_both_sequences_are_the_sft_and_inference_prompt_then_the_response_and_eos(tinyllama_tokenizer, dolly_rows):
    tok = tinyllama_tokenizer
    encoded, excluded, pairs = encode_pairs(tok, pairs_from_dolly(dolly_rows[:300]), max_length=10**6)
    assert set(excluded.values()) == {"chosen == rejected: the two responses are identical"}  # one-word answers
    for index, item in encoded.items():
        pair = pairs[index]
        assert item["prompt_ids"] == encode_prompt(tok, pair["prompt"])  # what generate/chat/serve feed
        for side, example in zip(("chosen", "rejected"), pair_examples(item)):
            ids = example["input_ids"]
            assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
            assert item[f"{side}_ids"][-1] == tok.eos_token_id and item[f"{side}_ids"].count(tok.eos_token_id) == 1
            assert tok.decode(item[f"{side}_ids"][:-1]) == pair[side]
            sft = encode_example(tok, {"prompt": pair["prompt"], "completion": [{"role": "assistant", "content": pair[side]}]})
            assert example == sft  # the very ids and labels SFT trains on
    assert len(encoded) == 295


def stock_trl_tokenization(tokenizer, rows):
    """TRL 1.16's own DPO preprocessing (`DPOTrainer._prepare_dataset`: its tokenize_fn, conversational path)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_length=None, report_to=[], bf16=False, use_cpu=True)
        trainer = types.SimpleNamespace(_tokenizer=tokenizer)  # all the conversational path reads of the trainer
        return DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train")


def test_side_by_side_with_trls_stock_dpo_tokenization(tinyllama_tokenizer, dolly_rows):
    """Every difference, and how many of 295 real rows it hits: with the hub's own tokenizer (what stock TRL
    users load), TRL drops the BOS from the prompt and trains the newline the chat template writes after </s>,
    in chosen and rejected, on every row. With our saved tokenizer (its template writes the BOS) TRL
    gets the BOS right, and still trains the newline."""
    from transformers import AutoTokenizer

    tok = tinyllama_tokenizer
    hub_tokenizer = AutoTokenizer.from_pretrained(asset("tinyllama-tokenizer"))
    ours, _, pairs = encode_pairs(tok, pairs_from_dolly(dolly_rows[:300]), max_length=10**6)
    rows = [{k: pairs[i][k] for k in ("prompt", "chosen", "rejected")} for i in sorted(ours)]
    rows = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    newline = tok.convert_tokens_to_ids("<0x0A>")

    def differences(stock) -> dict:
        hits = Counter()
        for index, theirs in zip(sorted(ours), stock):
            mine = ours[index]
            hits["prompt: no BOS"] += theirs["prompt_ids"] == mine["prompt_ids"][1:]
            hits["prompt: equal"] += theirs["prompt_ids"] == mine["prompt_ids"]
            for side in ("chosen", "rejected"):
                hits[f"{side}: newline after </s> trained"] += theirs[f"{side}_ids"] == mine[f"{side}_ids"] + [newline]
            hits["identical"] += all(theirs[k] == mine[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        return dict(hits)

    assert differences(stock_trl_tokenization(hub_tokenizer, rows)) == {
        "prompt: no BOS": 295, "prompt: equal": 0, "chosen: newline after </s> trained": 295,
        "rejected: newline after </s> trained": 295, "identical": 0}
    assert differences(stock_trl_tokenization(tok, rows)) == {
        "prompt: no BOS": 0, "prompt: equal": 295, "chosen: newline after </s> trained": 295,
        "rejected: newline after </s> trained": 295, "identical": 0}


# --- end to end on stories260k -------------------------------------------------------------------

HELD_OUT, TRAIN_PAIRS, STEPS, SAVE = 60, 120, 40, 20
_TMP = Path(tempfile.mkdtemp(prefix="tinyllama-ft-dpo-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@lru_cache(maxsize=None)
def learnable_pairs() -> Path:
    """Real Dolly rows short enough for stories260k's 512 positions: the whole response chosen, its first half rejected."""
    rows = [json.loads(line) for line in open(asset("dolly/dolly-sample-1109.jsonl"), encoding="utf-8")]
    rows = [r for r in rows if 80 <= len(r["response"]) <= 400 and len(r["context"]) <= 300][:HELD_OUT + TRAIN_PAIRS + 20]
    path = _TMP / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": format_user_turn(r["instruction"], r["context"]),
                                        "chosen": r["response"].strip(), "rejected": degrade_first_half(r["response"]),
                                        "category": r["category"]}) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_args(out, *extra):
    return ["dpo", "--adapter", stories_run(), "--dataset_name", learnable_pairs(),
            "--output_dir", out, "--train_size", TRAIN_PAIRS, "--eval_size", HELD_OUT, "--max_length", 512,
            "--max_steps", STEPS, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1,
            "--learning_rate", "3e-3", "--logging_steps", 10, "--save_steps", SAVE, "--gradient_checkpointing", "false",
            "--precision", "fp32", "--num_generate", 4, "--max_new_tokens", 16, *extra]


def measured(out, *extra) -> dict:
    """A DPO run through the real command line, with its peak RSS and wall time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "rss_probe.py"), *map(str, dpo_args(out, *extra))],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = int(result.stderr.rsplit("PEAK_RSS_KB ", 1)[1].split()[0])
    return {"out": out, "peak_rss_mb": peak / 1024, "seconds": time.perf_counter() - start}


@lru_cache(maxsize=None)
def dpo_run() -> dict:
    return measured(_TMP / "dpo")


@lru_cache(maxsize=None)
def precomputed_run() -> dict:
    return measured(_TMP / "dpo-precomputed", "--precompute_ref_log_probs", "true")


def metrics_of(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_dpo_learns_the_preference_and_reports_what_it_cost():
    out = dpo_run()["out"]
    metrics = metrics_of(out)
    print({k: round(metrics[k], 4) for k in ("sft_preference_accuracy", "preference_accuracy", "reward_accuracy",
                                              "reward_margin", "sft_eval_loss", "eval_loss", "sft_eos_logprob",
                                              "eos_logprob", "sft_eos_rate", "eos_rate")})
    assert metrics["pairs"] == HELD_OUT and metrics["train_steps"] == STEPS
    assert metrics["reward_accuracy"] >= 0.75  # stock TRL's DPOTrainer: 75% on the same kind of 60 pairs
    assert metrics["reward_margin"] > 0
    assert metrics["preference_accuracy"] > metrics["sft_preference_accuracy"]
    assert metrics["sft_reward_accuracy"] == 0 and metrics["sft_reward_margin"] == 0  # the policy is its reference
    sft = metrics_of(stories_run())
    assert metrics["sft_eval_loss"] == pytest.approx(sft["eval_loss"], abs=1e-7)  # the SFT run's own rows (other batching)
    assert all(k in metrics for k in ("eval_loss", "eos_logprob", "eos_rate", "chosen_logprob", "rejected_logprob"))


@pytest.mark.slow
def test_the_dpo_run_folder_is_a_run_like_sfts():
    out = dpo_run()["out"]
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.json", "metrics.json",
            "split.json", "log_history.json", "README.md", f"checkpoint-{STEPS}"} <= names
    assert "ref" not in names and not (out / f"checkpoint-{STEPS}" / "ref").exists()  # the frozen copy stays out
    run_config = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    assert run_config["stage"] == "dpo" and run_config["adapter"] == str(stories_run())  # how it names its SFT run
    assert run_config["sft_run_config"]["output_dir"] == stories_run().name  # no folder of this machine it needs not
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == str(asset("stories260k"))
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "two stages" in card and "preference accuracy" in card and "DPOTrainer" in card
    assert str(stories_run()) not in card  # the card may be shared: the SFT run by its name
    assert set(metrics_of(out)["timings"]) >= {"prepare_data", "train", "evaluate_before", "evaluate_after", "save"}
    assert "rewards/accuracies" in json.loads((out / "log_history.json").read_text(encoding="utf-8"))[0]


@pytest.mark.slow
def test_reward_accuracy_recomputed_by_hand_from_the_saved_adapters():
    """The SFT adapter (reference) and the DPO adapter, each loaded on its own; log-probs from plain logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tinyllama_ft.model.loading import load_tokenizer

    out, beta = dpo_run()["out"], 0.1
    tok = load_tokenizer(str(out))
    held_out = json.loads((out / "split.json").read_text(encoding="utf-8"))["validation"][:12]
    rows = load_pairs(str(learnable_pairs()))

    def logps(adapter, example):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(asset("stories260k")), adapter).eval()
        with torch.no_grad():
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1].double().log_softmax(-1)
        targets = torch.tensor(example["labels"][1:])
        return logits[targets != -100].gather(1, targets[targets != -100, None]).sum().item()

    wins, margins = [], []
    for index in held_out:
        chosen, rejected = pair_examples(encode_pair(tok, to_pair(rows[index])))
        reward = [beta * (logps(out, e) - logps(stories_run(), e)) for e in (chosen, rejected)]
        wins.append(reward[0] > reward[1])
        margins.append(reward[0] - reward[1])
    from tinyllama_ft.evaluation.preferences import evaluate_pairs  # the same pairs through the package, to compare

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(asset("stories260k")), stories_run(),
                                      adapter_name="ref")
    model.load_adapter(str(out), adapter_name="default")
    model.set_adapter("default")
    ours = evaluate_pairs(model, [encode_pair(tok, to_pair(rows[i])) for i in held_out], tok.pad_token_id, beta)
    assert ours["reward_accuracy"] == sum(wins) / len(wins)
    assert ours["reward_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-6)


@pytest.mark.slow
def test_reference_strategies_side_by_side_same_adapter_and_peak_memory():
    frozen, precomputed = dpo_run(), precomputed_run()
    print(f"\npeak RSS: frozen ref adapter {frozen['peak_rss_mb']:.0f} MB in {frozen['seconds']:.0f} s, "
          f"precomputed log-probs {precomputed['peak_rss_mb']:.0f} MB in {precomputed['seconds']:.0f} s")
    a, b = load_file(frozen["out"] / "adapter_model.safetensors"), load_file(precomputed["out"] / "adapter_model.safetensors")
    # Not bit-identical: 6.1e-7 apart in one run, 0.053 in another (the cause is not established; see docs/DPO.md),
    # so what is compared is what each learns, on the same held-out pairs.
    print(f"max |adapter difference| {max((a[k] - b[k]).abs().max().item() for k in a):.3g}")
    assert a.keys() == b.keys()
    for run in (frozen, precomputed):
        metrics = metrics_of(run["out"])
        assert metrics["reward_accuracy"] >= 0.75 and metrics["preference_accuracy"] > metrics["sft_preference_accuracy"]
    assert 0.8 < precomputed["peak_rss_mb"] / frozen["peak_rss_mb"] < 1.25  # with LoRA, the reference is an adapter


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_to_the_same_adapter(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = [str(a) for a in dpo_args(out)]
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "pause_probe.py"), f"step-{SAVE + 1}", str(marker),
                                *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130 and "--resume_from_checkpoint true" in err.strip().splitlines()[-1]
    assert (out / f"checkpoint-{SAVE}").is_dir() and not (out / "metrics.json").exists()
    # another DPO run than the checkpoint's is refused before the model loads, naming every change
    other_sft = tmp_path / "sft-retrained"
    shutil.copytree(stories_run(), other_sft)
    weights = load_file(other_sft / "adapter_model.safetensors")
    save_file({name: tensor + 1e-3 for name, tensor in weights.items()}, other_sft / "adapter_model.safetensors")
    for changed, refusal in ((["--beta", "0.2"], "beta 0.1 -> 0.2"),
                             (["--learning_rate", "1e-3"], "learning_rate 0.003 -> 0.001"),
                             (["--adapter", str(other_sft)], "the SFT adapter (its weights changed)")):
        result = subprocess.run([sys.executable, "-m", "tinyllama_ft", *args, *changed, "--resume_from_checkpoint",
                                 "true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: checkpoint-{SAVE} is another run than this command's: {refusal}: resume with the checkpoint's "
            "settings, or start over with --overwrite_output_dir true")
    cli(*args, "--resume_from_checkpoint", "true")
    resumed, reference = load_file(out / "adapter_model.safetensors"), load_file(dpo_run()["out"] / "adapter_model.safetensors")
    assert max((resumed[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6


@pytest.mark.slow
def test_generate_chat_and_exports_work_on_the_dpo_run(tmp_path):
    from transformers import pipeline

    out = dpo_run()["out"]
    assert cli("generate", "--adapter", out, "--instruction", "Tell me a story.", "--max_new_tokens", 8).stdout.strip()
    assert cli("chat", "--adapter", out, "--max_new_tokens", 4, input="Tell me a story.\n/exit\n").returncode == 0
    merged = tmp_path / "merged"
    cli("export", "--adapter", out, "--out", merged)
    assert json.loads((merged / "run_config.json").read_text(encoding="utf-8"))["stage"] == "dpo"
    assert "two stages" in (merged / "README.md").read_text(encoding="utf-8")
    generator = pipeline("text-generation", model=str(merged), device="cpu")
    assert generator([{"role": "user", "content": "Tell me a story."}], max_new_tokens=4, do_sample=False)
    gguf = tmp_path / "gguf"
    cli("export", "--adapter", out, "--out", gguf, "--format", "gguf")
    (path,) = gguf.glob("*.gguf")
    from transformers import AutoModelForCausalLM

    from tinyllama_ft.storage.saved_model import load_merged

    hf, tok = load_merged(str(out))
    gg = AutoModelForCausalLM.from_pretrained(str(gguf), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "Tell me a story."}])])
    from test_gguf import fp16_rounded

    with torch.no_grad():  # the DPO model's weights, exactly, up to their f16 storage (as tests/test_gguf.py)
        assert (fp16_rounded(hf)(ids).logits - gg(ids).logits).abs().max() < 1e-4


# --- bad inputs: one line each -----------------------------------------------------------------------

def one_line_error(capsys, *args) -> str:
    """The command line in this process (each case fails before any model loads): exit 2, one line on stderr."""
    from tinyllama_ft.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.slow
def test_bad_inputs_are_one_line_each(tmp_path, dolly_path, capsys):
    sft = stories_run()
    merged = tmp_path / "merged"
    cli("export", "--adapter", sft, "--out", merged)
    empty = tmp_path / "empty"
    empty.mkdir()
    pairs = ["--dataset_name", str(SAMPLE_PAIRS), "--output_dir", str(tmp_path / "o")]
    cases = {
        "needs --adapter RUN": ["dpo"],
        "not a run folder (no adapter_config.json)": ["dpo", "--adapter", empty, *pairs],
        "is a merged export": ["dpo", "--adapter", merged, *pairs],
        "is a file": ["dpo", "--adapter", SAMPLE_PAIRS, *pairs],
        "holds SFT rows": ["dpo", "--adapter", sft, "--dataset_name", dolly_path,
                           "--output_dir", tmp_path / "o"],
        "is the SFT run itself": ["dpo", "--adapter", sft, "--output_dir", sft],
        "beta must be > 0": ["dpo", "--adapter", sft, "--beta", "0", *pairs],
        "--preset huge: is not a preset": ["dpo", "--preset", "huge", "--adapter", sft],
        "is a DPO run, not an SFT run": ["dpo", "--adapter", dpo_run()["out"], *pairs],
        "is a checkpoint of a run": ["dpo", "--adapter", dpo_run()["out"] / f"checkpoint-{STEPS}", *pairs],
        "raise max_length": ["dpo", "--adapter", sft, *pairs, "--max_length", 16, "--train_size", 4, "--eval_size", 2,
                             "--gradient_accumulation_steps", 1],
        "is more than the 4 micro-batches an epoch has": ["dpo", "--adapter", sft, *pairs, "--train_size", 4],
    }
    for expected, args in cases.items():
        assert expected in one_line_error(capsys, *args), expected
