"""The notebook: committed clean (no outputs, one `parameters` cell holding the real defaults), and it
runs headless end to end in smoke mode, producing its plots, tables and a complete run folder.
Also the plotting/table helpers it calls, on small literal inputs."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "FineTuning_TinyLlama.ipynb"
PNGS = ("categories.png", "lengths.png", "loss_mask.png", "loss_curves.png", "comparison.png")


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def parameters_index(notebook: dict) -> int:
    tagged = [i for i, cell in enumerate(notebook["cells"]) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


# --- the committed notebook ----------------------------------------------------------------------

def test_committed_notebook_is_valid_nbformat_4_with_a_python3_kernel():
    import nbformat

    notebook = nbformat.read(str(NOTEBOOK), as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata.kernelspec.name == "python3"


def test_committed_notebook_has_no_outputs_and_no_execution_counts():
    notebook = load_notebook()
    dirty = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"code cells {dirty} hold outputs or execution counts: run `nbstripout {NOTEBOOK.name}`"


def test_exactly_one_parameters_cell_followed_by_notebook_config():
    notebook = load_notebook()
    index = parameters_index(notebook)
    assert notebook["cells"][index]["cell_type"] == "code"
    following = notebook["cells"][index + 1]
    assert following["cell_type"] == "code"
    assert source(following).splitlines()[0].strip() == "config = notebook_config(globals())"


def test_parameters_cell_holds_every_knob_at_the_config_default():
    from tinyllama_ft import Config

    notebook = load_notebook()
    namespace: dict = {}
    exec(source(notebook["cells"][parameters_index(notebook)]), namespace)  # plain assignments only
    values = {k: v for k, v in namespace.items() if not k.startswith("__")}
    assert values.pop("preference_dataset") is None  # the DPO section's only parameter: off unless set (or smoke)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    required = {"preset", "model_name_or_path", "dataset_name", "output_dir", "train_size", "eval_size", "test_size",
                "max_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs",
                "max_steps", "lr_scheduler_type", "warmup_steps", "gradient_checkpointing", "logging_steps",
                "save_steps", "eval_steps", "num_generate", "max_new_tokens", "precision", "seed",
                "overwrite_output_dir"}
    assert required <= set(values), f"missing from the parameters cell: {sorted(required - set(values))}"
    assert set(values) <= set(fields), f"not configuration fields: {sorted(set(values) - set(fields))}"
    for name, value in values.items():
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert value == default, f"{name} = {value!r} in the parameters cell, but the Config default is {default!r}"


def test_code_cells_before_the_config_cell_define_no_configuration_field_names():
    """`notebook_config(globals())` reads every global named like a field: keep the setup cells clear of them."""
    import ast

    from tinyllama_ft import Config

    notebook = load_notebook()
    fields = {f.name for f in dataclasses.fields(Config)}
    for cell in notebook["cells"][: parameters_index(notebook)]:
        if cell["cell_type"] != "code":
            continue
        names = set()
        for node in ast.walk(ast.parse(source(cell))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
        assert not names & fields, f"setup cell defines configuration field names {sorted(names & fields)}"


def test_the_notebook_runs_the_stages_of_train_in_their_order():
    """One `run.<stage>()` per stage of `train.STAGES`, in that order, and no stage rebuilt by hand."""
    import re

    from tinyllama_ft.training.sft import STAGES

    code = "\n".join(source(cell) for cell in code_cells(load_notebook()))
    assert re.findall(rf"\brun\.({'|'.join(STAGES)})\(", code) == list(STAGES)
    by_hand = re.findall(r"(?<![.\w])(check_output_dir|check_model_shape|set_seed|prepare_data|setup_model|build_trainer|fit|"
                         r"evaluate_base|evaluate_model|summarize|save_run|write_timings|Timings)\(", code)
    assert not by_hand, f"the notebook calls what a stage of Run does: {by_hand}"


def test_code_cells_stay_thin():
    for cell in code_cells(load_notebook()):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        text = source(cell)
        assert not any(line.lstrip().startswith(("def ", "class ", "for ", "while ")) for line in text.splitlines()), \
            f"logic belongs in tinyllama_ft, not in the notebook:\n{text}"


# --- the helpers the notebook calls ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from tinyllama_ft import load_tokenizer

    return load_tokenizer("tiny-random-llama")


def test_loss_mask_wraps_exactly_the_response_and_its_eos(tiny_tokenizer, tmp_path):
    from tinyllama_ft import encode_example, to_example
    from tinyllama_ft import plots

    example = encode_example(tiny_tokenizer, to_example(
        {"instruction": "Name a colour.", "context": "Sky", "response": "Blue is a colour."}))
    text = plots.format_loss_mask(tiny_tokenizer, example)
    assert text.count("[[") == 1 and text.endswith("[[Blue is a colour.</s>]]")
    assert "Sky</s>" in text.split("[[")[0]  # the user turn's EOS belongs to the prompt: not trained
    figure = plots.show_loss_mask(tiny_tokenizer, example, save_to=tmp_path / "mask.png")
    assert figure is not None and (tmp_path / "mask.png").stat().st_size > 0


def test_loss_curves_and_comparison_save_pngs_and_tables(tmp_path):
    from tinyllama_ft import plots, tables

    history = [{"loss": 2.0, "learning_rate": 1e-4, "step": 1}, {"loss": 1.5, "learning_rate": 2e-4, "step": 2},
               {"eval_loss": 1.6, "step": 2}, {"train_runtime": 1.0, "train_loss": 1.75, "step": 2}]
    plots.plot_loss_curves(history, save_to=tmp_path / "loss.png", base_loss=2.2)
    scores = lambda loss, r, e: {"eval_loss": loss, "eval_perplexity": 2.0, "eval_rows": 2,  # noqa: E731
                                 "rougeL": r, "eos_rate": e, "rows": 2}
    metrics = {"eval_loss": 1.0, "eval_perplexity": 2.718, "rougeL": 0.3, "eos_rate": 0.9,
               "base_eval_loss": 2.0, "base_eval_perplexity": 7.389, "base_rougeL": 0.1, "base_eos_rate": 0.2,
               "rows": {"train": 10, "validation": 4, "test": 4},
               "per_category": {"base": {"open_qa": scores(2.0, 0.1, 0.0), "summarization": scores(2.0, 0.1, 0.5)},
                                "tuned": {"open_qa": scores(1.0, 0.4, 1.0), "summarization": scores(1.0, 0.2, 0.5)}}}
    plots.plot_comparison(metrics, save_to=tmp_path / "comparison.png")
    table = tables.format_comparison_table(metrics, save_to=tmp_path / "comparison.md")
    lines = str(table).splitlines()
    assert lines[2].split()[:10] == ["overall", "4/4", "2.000", "1.000", "7.4", "2.7", "0.100", "0.300", "0.200",
                                     "0.900"]
    assert [line.split()[0] for line in lines[3:]] == ["open_qa", "summarization"]
    assert "<table>" in table._repr_html_()
    assert (tmp_path / "comparison.md").read_text(encoding="utf-8").startswith("| scope |")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("loss.png", "comparison.png"))


# --- the notebook, executed -----------------------------------------------------------------------

def notebook_env(run_dir: Path, **variables: str) -> dict:
    """This environment without TINYLLAMA_FT_* settings, plus `variables`; the kernel's `python` is ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYLLAMA_FT_")}
    env |= {"TINYLLAMA_FT_OUTPUT_DIR": str(run_dir), "TINYLLAMA_FT_OVERWRITE_OUTPUT_DIR": "true", **variables}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures display as image/png
    return env


def execute_notebook(tmp_path: Path, env: dict, timeout: int = 900) -> dict:
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or "jupyter"
    result = subprocess.run(
        [jupyter, "nbconvert", "--to", "notebook", "--execute", str(NOTEBOOK), "--output-dir", str(tmp_path),
         f"--ExecutePreprocessor.timeout={timeout}", "--ExecutePreprocessor.kernel_name=python3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 120)
    assert result.returncode == 0, f"the notebook failed:\n{result.stderr[-6000:]}"
    return json.loads((tmp_path / NOTEBOOK.name).read_text(encoding="utf-8"))


def outputs(notebook: dict) -> list[dict]:
    return [output for cell in code_cells(notebook) for output in cell.get("outputs", [])]


@pytest.mark.slow
def test_notebook_runs_headless_in_smoke_mode(tmp_path):
    run = tmp_path / "run"
    executed = execute_notebook(tmp_path, notebook_env(run, TINYLLAMA_FT_PRESET="smoke"))

    all_outputs = outputs(executed)
    errors = [o for o in all_outputs if o["output_type"] == "error"]
    assert not errors, errors
    images = [o for o in all_outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5, f"expected at least 5 plots, found {len(images)}"
    text = "\n".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", ""))
                     for o in all_outputs)
    assert "SMOKE RUN" in text and "tiny random Llama" in text
    assert "[[" in text and "</s>]]" in text  # the loss mask, with the trained EOS
    assert "overall" in text and "ROUGE-L base" in text  # the comparison table
    assert "preference accuracy" in text  # the DPO section, on in the smoke preset with the bundled pairs
    assert json.loads((Path(f"{run}-dpo") / "metrics.json").read_text(encoding="utf-8"))["train_steps"] > 0

    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert {"eval_loss", "base_eval_loss", "rougeL", "base_eos_rate", "train_loss"} <= set(metrics)
    for name in PNGS:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, f"{name} missing from the run folder"
    assert (run / "adapter_model.safetensors").is_file()
    if importlib.util.find_spec("lm_eval") is not None:  # "What did it forget?": on in smoke runs, dolly_mc
        assert len(images) >= 6 and "fine-tuned" in text and "dolly_mc  acc_norm" in text  # its chart and table
        results = json.loads((run / "lm_eval.json").read_text(encoding="utf-8"))
        assert results["tasks"] == ["dolly_mc"] and results["base"]["dolly_mc"]["acc"]["stderr"] > 0
        assert "## Benchmarks: what did fine-tuning cost?" in (run / "README.md").read_text(encoding="utf-8")

    # the same stages as `python -m tinyllama_ft train --preset smoke`: the same adapter, to the bit
    from safetensors.torch import load_file

    from runs import smoke_run

    notebook_adapter, cli_adapter = (load_file(folder / "adapter_model.safetensors") for folder in (run, smoke_run()))
    assert notebook_adapter.keys() == cli_adapter.keys()
    assert all(notebook_adapter[name].equal(cli_adapter[name]) for name in cli_adapter)
