"""What tinyllama_ft relies on beyond other packages' public APIs, one test an assumption: private names it calls
or overrides, file names it reads, behaviour it builds on. Each test's name says what it assumes and its failure
reads `assumption broken: ...`, naming the package, what changed and the module of ours that relies on it, so
that a new release of TRL, PEFT, transformers, lm-eval or gguf that breaks us says so in one line."""

import importlib.util
import inspect
import json

import pytest
import torch


def holds(condition, assumption: str, relied_on_by: str) -> None:
    assert condition, f"assumption broken: {assumption} (relied on by tinyllama_ft/{relied_on_by})"


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.fixture(scope="module")
def tokenizer():
    from tinyllama_ft.model.loading import build_tiny_tokenizer

    return build_tiny_tokenizer()


def smoke_trainer(**overrides):
    from tinyllama_ft import parse_config, prepare_data
    from tinyllama_ft.model.loading import load_tokenizer
    from tinyllama_ft.training.sft import build_trainer, setup_model

    config = parse_config(preset="smoke", report_to="none", **overrides)
    tokenizer = load_tokenizer(config.model_name_or_path)
    data = prepare_data(config, tokenizer)
    return build_trainer(config, setup_model(config, tokenizer), tokenizer, data), data, tokenizer


# --- TRL -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_free", [True, False])
def test_trl_collator_keeps_our_labels_and_trains_the_eos_although_pad_is_eos(padding_free):
    trainer, data, tokenizer = smoke_trainer(padding_free=padding_free)
    ours = data.examples("train")[:3]
    holds(tokenizer.pad_token_id == tokenizer.eos_token_id, "the smoke tokenizer pads with its EOS", "model/loading.py")
    rows = trainer.train_dataset.select(range(3)).to_list()
    holds([(r["input_ids"], r["labels"]) for r in rows] == [(e["input_ids"], e["labels"]) for e in ours],
          "TRL's SFTTrainer takes pre-tokenized rows (input_ids + labels) as they are, labels kept", "training/sft.py")
    batch = trainer.data_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in ours])
    if padding_free:
        expected = [label for e in ours for label in e["labels"]]
        got = batch["labels"][0].tolist()
    else:
        width = max(len(e["labels"]) for e in ours)
        expected = [label for e in ours for label in e["labels"] + [-100] * (width - len(e["labels"]))]
        got = batch["labels"].flatten().tolist()
    holds(got == expected, f"TRL's collator (padding_free={padding_free}) keeps our labels as they are and pads them "
          "with -100, so the prompt stays masked and the response's EOS stays trained though it equals the pad id",
          "training/sft.py")
    eos = [label == tokenizer.eos_token_id for label in got].count(True)
    holds(eos == len(ours), "each row's closing EOS reaches the loss", "data/encoding.py")


def test_trl_has_the_lm_head_switches_we_swap():
    import trl.trainer.utils as trl_utils

    holds(hasattr(trl_utils, "_use_triton") and parameters(trl_utils._use_triton) == ["device"],
          "trl.trainer.utils._use_triton(device) decides where TRL's fused LM head scores only labelled positions",
          "training/lm_head.py")
    holds(callable(getattr(getattr(trl_utils, "_ChunkedLogProbFunction", None), "apply", None)),
          "trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, ...) is TRL's LM-head kernel", "training/lm_head.py")


def test_trl_parser_has_the_field_hook_and_argparse_actions_we_adjust():
    from trl import TrlParser

    hook = inspect.getattr_static(TrlParser, "_parse_dataclass_field", None)
    holds(isinstance(hook, staticmethod) and parameters(TrlParser._parse_dataclass_field) == ["parser", "field"],
          "TrlParser._parse_dataclass_field(parser, field) is a staticmethod turning each field into a flag",
          "settings/sources.py")
    from tinyllama_ft.settings.config import Config
    from tinyllama_ft.settings.sources import _flag_parser

    holds({a.dest for a in _flag_parser(Config)._actions} >= {"lora_r", "use_dora", "report_to"},
          "argparse keeps a parser's actions in `_actions`, one per flag", "settings/sources.py")


def test_trl_dpo_trainer_has_the_hooks_our_dpo_trainer_overrides():
    from trl import DPOTrainer

    holds(parameters(DPOTrainer._prepare_dataset) == ["dataset", "processing_class", "args", "dataset_name"],
          "DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name) tokenizes the pairs",
          "training/dpo.py")
    holds(parameters(DPOTrainer._save) == ["output_dir", "state_dict"],
          "DPOTrainer._save(output_dir, state_dict) writes the model (the `ref` adapter beside it)", "training/dpo.py")


def test_trl_use_adapter_and_extract_prompt_are_where_we_import_them():
    from trl.data_utils import extract_prompt
    from trl.trainer.utils import use_adapter

    holds(parameters(use_adapter) == ["model", "adapter_name"],
          "trl.trainer.utils.use_adapter(model, adapter_name) switches a PeftModel's adapter in a block",
          "evaluation/preferences.py")
    holds(extract_prompt({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                          "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]})
          == {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
              "rejected": [{"role": "assistant", "content": "c"}]},
          "trl.data_utils.extract_prompt splits implicit-prompt pairs into prompt, chosen, rejected", "data/pairs.py")


# --- transformers --------------------------------------------------------------------------------------------

def test_transformers_trainer_has_the_checkpoint_hooks_we_stage():
    from transformers import Trainer, TrainerState
    from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME, rotate_checkpoints

    holds(parameters(Trainer._save_checkpoint) == ["model", "trial"] and "trial" in parameters(Trainer._get_output_dir),
          "Trainer._save_checkpoint(model, trial) writes checkpoint-N under Trainer._get_output_dir(trial=...)",
          "storage/run_folder.py")
    holds({"output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"} <= set(parameters(rotate_checkpoints)),
          "transformers.trainer.rotate_checkpoints(output_dir=, save_total_limit=, best_model_checkpoint=, "
          "use_mtime=) deletes the oldest checkpoints", "storage/run_folder.py")
    holds(parameters(TrainerState.compute_steps) == ["args", "max_steps"],
          "TrainerState.compute_steps(args, max_steps) sets logging/eval/save steps", "storage/fingerprint.py")
    holds((TRAINER_STATE_NAME, TRAINING_ARGS_NAME) == ("trainer_state.json", "training_args.bin"),
          "a checkpoint holds trainer_state.json and training_args.bin", "storage/run_folder.py, training/sft.py")


def test_transformers_resume_warning_has_the_text_we_filter():
    import transformers.trainer_utils

    holds("do not match the ones in the `trainer_state.json`" in inspect.getsource(transformers.trainer_utils),
          "transformers warns on resume with '... do not match the ones in the `trainer_state.json`'; our filter drops "
          "it because the new cadence applies", "storage/fingerprint.py")


def test_transformers_names_its_trackers_in_integration_to_callback():
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    holds({"tensorboard", "trackio", "wandb", "mlflow", "comet_ml"} <= set(INTEGRATION_TO_CALLBACK),
          "transformers.integrations.INTEGRATION_TO_CALLBACK maps every --report_to name to its callback",
          "settings/tracking.py")


def test_transformers_models_keep_attn_implementation_and_can_set_it():
    from tinyllama_ft.model.loading import build_tiny_model

    model = build_tiny_model()
    holds(isinstance(model.config._attn_implementation, str) and callable(model.set_attn_implementation),
          "config._attn_implementation names the kernel and model.set_attn_implementation restores it",
          "model/batching.py")


def test_tokenizer_save_writes_the_chat_template_to_chat_template_jinja(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    path = tmp_path / "chat_template.jinja"
    holds(path.is_file() and path.read_text(encoding="utf-8") == tokenizer.chat_template,
          "tokenizer.save_pretrained writes the chat template, unchanged, to chat_template.jinja (the file the run "
          "folder keeps and vLLM's --chat-template reads)", "storage/run_folder.py, docs/EXPORT.md")
    holds(AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template,
          "a saved tokenizer reads its chat template back from chat_template.jinja", "storage/saved_model.py")


def test_tokenizer_apply_chat_template_returns_a_flat_id_list_that_extends_turn_by_turn(tokenizer):
    messages = [{"role": "user", "content": "Name three primes."}, {"role": "assistant", "content": "2, 3, 5."}]
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    whole = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
    holds(isinstance(prompt["input_ids"], list) and all(isinstance(i, int) for i in prompt["input_ids"]),
          "apply_chat_template(tokenize=True, return_dict=True)['input_ids'] is one flat list of ints",
          "data/encoding.py, data/chat_template.py")
    answer = whole["input_ids"][len(prompt["input_ids"]):]
    holds(whole["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
          and whole["input_ids"][0] == tokenizer.bos_token_id and tokenizer.eos_token_id in answer
          and tokenizer.decode(answer[: answer.index(tokenizer.eos_token_id)]) == "2, 3, 5.",
          "the Zephyr template's generation prompt is a prefix of the answered conversation, which our saved "
          "template opens with the BOS, and the answer's text is closed by the EOS", "data/encoding.py")


# --- PEFT ----------------------------------------------------------------------------------------------------

def test_peft_saves_adapter_model_safetensors_and_the_config_keys_we_read(tmp_path):
    from peft import PeftConfig

    from tinyllama_ft.model.loading import build_tiny_model, wrap_lora

    wrap_lora(build_tiny_model(), r=4, alpha=8, dropout=0.0, use_dora=True, use_rslora=True).save_pretrained(tmp_path)
    holds({p.name for p in tmp_path.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"},
          "PeftModel.save_pretrained writes adapter_model.safetensors and adapter_config.json",
          "storage/saved_model.py, storage/run_folder.py, training/dpo.py")
    config = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    wanted = {"peft_type": "LORA", "base_model_name_or_path": "tiny-random-llama", "r": 4, "lora_alpha": 8,
              "use_dora": True, "use_rslora": True, "modules_to_save": None}
    holds({k: config.get(k, "absent") for k in wanted} == wanted and sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj"]), "adapter_config.json holds peft_type, base_model_name_or_path, r, "
          f"lora_alpha, use_dora, use_rslora, modules_to_save and target_modules as we set them (got {config})",
          "storage/saved_model.py, tests/test_vllm.py")
    holds(PeftConfig.from_pretrained(str(tmp_path)).base_model_name_or_path == "tiny-random-llama",
          "PeftConfig.from_pretrained(folder).base_model_name_or_path names the base", "storage/saved_model.py")


def test_peft_lora_layers_have_the_attributes_we_read_when_merging():
    from peft.tuners.lora import LoraLayer

    from tinyllama_ft.model.loading import build_tiny_model, wrap_lora

    model = wrap_lora(build_tiny_model(), r=4, alpha=8, dropout=0.0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    holds(len(layers) == 8 and all(isinstance(layer.disable_adapters, bool) and layer.merged is False
                                   and isinstance(layer.get_base_layer(), torch.nn.Linear)
                                   and layer.use_dora == {"default": False} and layer.active_adapters == ["default"]
                                   for layer in layers),
          "peft.tuners.lora.LoraLayer has disable_adapters, merged, get_base_layer(), use_dora[name], active_adapters",
          "model/generation.py")
    holds(callable(model.merge_adapter) and callable(model.unmerge_adapter),
          "PeftModel.merge_adapter / unmerge_adapter merge in place and back", "model/generation.py")


# --- lm-eval -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (the eval extra)")
def test_lm_eval_has_the_api_we_call():
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    holds({"model", "tasks", "limit", "task_manager", "apply_chat_template", "system_instruction", "log_samples"}
          <= set(parameters(lm_eval.simple_evaluate)),
          "lm_eval.simple_evaluate takes model, tasks, limit, task_manager, apply_chat_template, system_instruction, "
          "log_samples", "evaluation/harness.py")
    holds({"pretrained", "tokenizer", "batch_size", "max_batch_size"} <= set(parameters(HFLM.__init__)),
          "lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=, batch_size=, max_batch_size=) wraps a loaded "
          "model", "evaluation/harness.py")
    holds("include_path" in parameters(TaskManager.__init__) and len(parameters(get_task_dict)) >= 2,
          "lm_eval.tasks.TaskManager(include_path=) and get_task_dict(names, manager)", "evaluation/harness.py")


# --- gguf (llama.cpp's own writer) ---------------------------------------------------------------------------

LLAMA_CPP_KEYS = {  # what llama.cpp's loader reads for a llama model and its vocabulary (gguf.Keys spells them)
    "general.architecture", "general.name", "general.file_type", "general.quantization_version",
    "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template",
}


def test_gguf_writes_the_keys_and_tensor_names_llama_cpp_reads(tokenizer, tmp_path):
    pytest.importorskip("gguf")
    import gguf

    from tinyllama_ft.export.gguf import write_gguf
    from tinyllama_ft.model.loading import build_tiny_model

    path = write_gguf(build_tiny_model(), tokenizer, tmp_path / "tiny.gguf", "f32", name="tiny")
    reader = gguf.GGUFReader(str(path))
    written = {name for name in reader.fields if not name.startswith("GGUF.")}
    holds(written == LLAMA_CPP_KEYS, f"gguf's GGUFWriter.add_* write llama.cpp's key names (missing: "
          f"{sorted(LLAMA_CPP_KEYS - written)}, new: {sorted(written - LLAMA_CPP_KEYS)})", "export/gguf.py")
    holds(gguf.Keys.LLM.CONTEXT_LENGTH.format(arch="llama") == "llama.context_length"
          and gguf.Keys.Tokenizer.CHAT_TEMPLATE == "tokenizer.chat_template", "gguf.Keys spells llama.cpp's keys",
          "export/gguf.py")
    names = {t.name for t in reader.tensors}
    holds({"token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
          <= names, "gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n) maps HF names to llama.cpp's blk.N.* names",
          "export/gguf.py")
