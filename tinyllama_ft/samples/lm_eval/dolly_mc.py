"""The rows of the bundled `dolly_mc` task (`dolly_mc.yaml`): the JSONL beside this file, as a
`datasets.DatasetDict` with one `test` split, whatever the working directory (a YAML `data_files`
path would be read relative to it)."""

from pathlib import Path

ROWS = Path(__file__).with_name("dolly_mc.jsonl")


def load(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(ROWS)})
