"""No file a run writes holds a path of this machine it does not need (`settings/paths.py`): a relative path is
recorded as given; the package's own sample and everything shared (the card, a merged export's settings) name
local data by its file name and content hash; a resume compares the data by content, not by spelling."""

import json
import shutil
from pathlib import Path

import pytest

from runs import _TMP, smoke_run
from tinyllama_ft import export_merged
from tinyllama_ft.settings.config import SAMPLE_DATA
from tinyllama_ft.settings.paths import content_hash, data_identity, find_recorded_data, recorded

PACKAGE = Path(SAMPLE_DATA).parents[1]


def machine_paths_in(folder: Path, *paths: Path) -> list[str]:
    """The files under `folder` (any bytes, checkpoints included) that hold one of `paths`."""
    needles = [str(p).encode() for p in paths]
    return [str(f.relative_to(folder)) for f in sorted(folder.rglob("*")) if f.is_file()
            and any(n in f.read_bytes() for n in needles)]


@pytest.mark.slow  # the smoke run the chat and card tests share (~20 s)
def test_a_smoke_run_folder_and_its_merged_export_hold_no_path_of_this_machine(tmp_path):
    run = smoke_run()  # written to an absolute temporary folder, on the package's sample
    assert machine_paths_in(run, _TMP, PACKAGE) == []
    settings = json.loads((run / "run_config.json").read_text(encoding="utf-8"))
    assert settings["output_dir"] == run.name
    assert settings["dataset_name"] == f"sample.jsonl (sha256 {content_hash(SAMPLE_DATA)})"
    merged = export_merged(str(run), str(tmp_path / "my export"))
    assert machine_paths_in(merged, tmp_path, _TMP, PACKAGE) == []


def test_relative_paths_are_kept_as_given_and_absolute_ones_shared_by_name_and_content(tmp_path, monkeypatch):
    data = tmp_path / "data" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text('{"instruction": "a", "response": "b"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    as_given = {"dataset_name": "data/rows.jsonl", "output_dir": "runs/x", "adapter": "../runs/sft"}
    assert recorded(as_given) == recorded(as_given, public=True) == as_given
    absolute = {"dataset_name": str(data), "output_dir": str(tmp_path / "runs" / "x"), "model_name_or_path": "m",
                "adapter": str(tmp_path / "runs" / "sft")}
    kept = recorded(absolute)  # the run folder: the user's data path finds the data again (DPO reads it)
    assert kept == absolute | {"output_dir": "x"}
    shared = recorded(absolute, public=True)
    assert shared == kept | {"dataset_name": f"rows.jsonl (sha256 {content_hash(data)})", "adapter": "sft"}
    assert recorded({"sft_run_config": absolute}, public=True) == {"sft_run_config": shared}
    gone = {"dataset_name": str(tmp_path / "moved.jsonl")}  # no longer there: its name, still no folder
    assert recorded(gone) == gone and recorded(gone, public=True) == {"dataset_name": "moved.jsonl"}
    hub = {"dataset_name": "databricks/databricks-dolly-15k"}
    assert recorded(hub, public=True) == hub


def test_the_bundled_sample_is_recorded_by_name_and_hash_and_found_again():
    record = recorded({"dataset_name": SAMPLE_DATA})["dataset_name"]
    assert record == f"sample.jsonl (sha256 {content_hash(SAMPLE_DATA)})"
    assert Path(find_recorded_data(record)) == Path(SAMPLE_DATA)
    other = "sample.jsonl (sha256 0123456789abcdef)"  # other content under the same name: not found
    assert find_recorded_data(other) == other and find_recorded_data("mine.jsonl") == "mine.jsonl"


def test_data_is_identified_by_its_content_not_its_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    shutil.copy(SAMPLE_DATA, tmp_path / "x.jsonl")
    shutil.copy(SAMPLE_DATA, tmp_path / "sub" / "copy.jsonl")
    spellings = ["x.jsonl", "./x.jsonl", "sub/../x.jsonl", str(tmp_path / "x.jsonl"), "sub/copy.jsonl"]
    assert {data_identity(s) for s in spellings} == {f"sha256:{content_hash(SAMPLE_DATA)}"}
    (tmp_path / "sub" / "copy.jsonl").write_text("{}\n", encoding="utf-8")
    assert data_identity("sub/copy.jsonl") != data_identity("x.jsonl")
    assert data_identity("databricks/databricks-dolly-15k") == "databricks/databricks-dolly-15k"
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(SAMPLE_DATA, folder / "train.jsonl")
    first = data_identity(str(folder))
    (folder / "train.jsonl").rename(folder / "test.jsonl")  # the same bytes under another name: another dataset
    assert data_identity("folder") != first
