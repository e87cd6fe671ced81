"""Every `python -m tinyllama_ft ...` line that README.md and docs/*.md show works as shown.

The lines come from the pages' bash, PowerShell and unlabelled fenced blocks, read at test time (a command
added to any page is picked up). First the README's offline sequence runs in order in a fresh folder, as a
user of a fresh clone runs it: `train --preset smoke`, `dpo --preset smoke`, `generate --adapter runs/smoke`.
Then each command is either run for real, in-process, with the real run's folder (`runs/tinyllama-dolly`,
which needs the hub and a GPU) replaced by the smoke run and its outputs sent into the test's folder, or,
when it needs the hub, a GPU, a network server or minutes of training, validated: its flags resolve through
the configuration (`train`, `dpo`) or its argument parser (the others). `VALIDATED_ONLY` names those, each
with its reason; anything else is run, so a new docs command cannot go untested."""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ASSETS, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = "python -m tinyllama_ft "
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "powershell", "pwsh", "ps1"}
POWERSHELL_ONLY = re.compile(r"\$env:|`n|^\s*\$\w+\s*=")
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "2>", "2>&1", "<"}
OUTPUT_FLAGS = ("--out", "--output_dir")
REAL_RUN = "runs/tinyllama-dolly"
# The README's offline sequence, in its order: a fresh clone's first commands.
SEQUENCE = [("train", "--preset", "smoke"), ("dpo", "--preset", "smoke"),
            ("generate", "--adapter", "runs/smoke", "--instruction", "Give me three uses of a brick.")]


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    text: str
    argv: tuple[str, ...]  # after `python -m tinyllama_ft`, as the shell would pass it
    synopsis: bool  # `[--optional]` or `...` notation: a usage line, not a command to copy

    def __str__(self):
        return f"{self.page}:{self.line}: {self.text}"

    def flag(self, name):
        """The value of `--name value` or `--name=value`; None when absent, "" for a bare flag."""
        for i, arg in enumerate(self.argv):
            if arg == name:
                following = self.argv[i + 1] if i + 1 < len(self.argv) else ""
                return "" if following.startswith("--") else following
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None


def doc_commands(pages=PAGES) -> list[DocCommand]:
    """Every line starting `python -m tinyllama_ft ` in a shell or unlabelled fenced block of the pages, with
    its continuation lines (a trailing \\ or `) joined, its `# comment` dropped and shell quoting applied."""
    found = []
    for page in pages:
        lines = page.read_text(encoding="utf-8").splitlines()
        fence = None  # the open block's language; None outside blocks
        i = 0
        while i < len(lines):
            start, text = i, lines[i].strip()
            i += 1
            if text.startswith("```"):
                fence = text[3:].strip().lower() if fence is None else None
                continue
            if fence not in SHELL_FENCES or not text.startswith(PREFIX):
                continue
            while text.endswith(("\\", "`")) and i < len(lines):
                text, i = text[:-1].rstrip() + " " + lines[i].strip(), i + 1
            if POWERSHELL_ONLY.search(text):
                continue
            words = shlex.split(text, comments=True)[3:]
            for n, word in enumerate(words):
                if word in SHELL_OPERATORS:
                    words = words[:n]
                    break
            synopsis = any(w.startswith("[") or w.endswith("]") or w == "..." for w in words)
            if synopsis:
                words = [w.strip("[]") for w in words if w.strip("[]") not in ("", "...")]
            name = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
            found.append(DocCommand(name, start + 1, text, tuple(words), synopsis))
    return found


def _hub_tasks(c: DocCommand) -> bool:
    tasks = c.flag("--tasks")
    return c.flag("--include_path") is None and tasks != "dolly_mc"


# Commands only validated, never run here: (reason, which commands, refusals that also count as valid: the
# one-line errors naming a prerequisite this machine lacks).
# The first that matches decides; every other command is run for real.
VALIDATED_ONLY = [
    ("a usage synopsis ([optional] parts, placeholders), not a command to copy: its flags are checked",
     lambda c: c.synopsis, None),
    ("QLoRA loads the model in 4 bits through bitsandbytes, on CUDA only: the CPU refuses it in one line",
     lambda c: c.argv[0] == "train" and c.flag("--load_in_4bit") is not None,
     ("load_in_4bit needs a CUDA GPU", "load_in_4bit needs bitsandbytes")),
    ("the real run: TinyLlama-1.1B and Dolly from the hub, about an hour on a GPU (tests/test_training.py "
     "trains stories260k through the same stages)",
     lambda c: c.argv[0] == "train" and c.flag("--preset") is None
     and not (c.flag("--model_name_or_path") or "").startswith(("$", "/", ".")), None),
    ("DPO on the hub's pairs (orca_dpo_pairs) or on a file that stands for yours, after the real run "
     "(tests/test_dpo.py trains on the bundled pairs)",
     lambda c: c.argv[0] == "dpo" and c.flag("--preset") is None and "--help" not in c.argv, None),
    ("serve runs until it is stopped (tests/test_serve.py starts it and sends requests)",
     lambda c: c.argv[0] == "serve", None),
    ("--push_to_hub uploads to the hub with your token",
     lambda c: c.flag("--push_to_hub") is not None, None),
    ("lm-eval's hub tasks need their datasets from the hub (tests/test_harness.py runs the bundled dolly_mc)",
     lambda c: c.argv[0] == "evaluate" and _hub_tasks(c), None),
    ("bench trains every configuration for minutes, --preset gpu on CUDA (tests/test_bench.py runs a reduced "
     "CPU bench)",
     lambda c: c.argv[0] == "bench", None),
]


def only_validated(command: DocCommand):
    """(reason, allowed refusals) when the command is only validated, else None."""
    for reason, matches, refusals in VALIDATED_ONLY:
        if matches(command):
            return reason, refusals or ()
    return None


COMMANDS = doc_commands()
OUTPUTS: dict[str, str] = {}  # a docs output path -> where it went here, for a later command that reads it
RAN: dict[tuple[str, ...], str] = {}  # a command as run here (but for its output folder) -> its first page line


def _needs_assets(command: DocCommand) -> bool:
    return any("$TINYLLAMA_ASSETS" in arg or "${TINYLLAMA_ASSETS}" in arg for arg in command.argv)


def _needs_runs(command: DocCommand) -> bool:
    """Whether the command reads the sequence's run folders (or trains): those share the module's fixture."""
    if command.argv[0] in ("config", "preview", "--help") or "--help" in command.argv:
        return False
    return only_validated(command) is None or command.argv[0] == "dpo"


def _param(index: int, command: DocCommand):
    slow = _needs_runs(command)
    return pytest.param(index, command, id=f"{command.page}:{command.line}", marks=[pytest.mark.slow] if slow else [])


def signature(command: DocCommand) -> tuple[str, ...]:
    """The command as it runs here, but for its output paths: two pages' same command runs once."""
    words, output = [], False
    for arg in command.argv:
        if not output and arg not in OUTPUT_FLAGS:
            words.append("runs/smoke" + arg[len(REAL_RUN):] if arg == REAL_RUN or arg.startswith(REAL_RUN + "/")
                         else arg)
        output = arg in OUTPUT_FLAGS
    return tuple(words)


class Parsed(Exception):
    """Raised by the patched argument parser once the flags are parsed: nothing runs."""


def _main(argv) -> int:
    from tinyllama_ft.cli import main

    try:
        return main(list(argv))
    except SystemExit as stop:  # --help
        return stop.code if isinstance(stop.code, int) else 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh folder where the README's offline sequence has run, in order, as a fresh clone's user runs it."""
    folder = tmp_path_factory.mktemp("docs")
    before = os.getcwd()
    os.chdir(folder)
    try:
        for argv in SEQUENCE:
            assert _main(argv) == 0, argv
    finally:
        os.chdir(before)
    assert (folder / "runs" / "smoke" / "metrics.json").is_file()
    assert (folder / "runs" / "smoke-dpo" / "metrics.json").is_file()
    return folder


def resolve(command: DocCommand, index: int, workdir: Path, outputs: dict) -> list[str]:
    """The command as it runs here: the real run's folder is the smoke run, outputs go under out/INDEX/,
    paths into the repository (bundled samples) are absolute, $TINYLLAMA_ASSETS is the assets folder."""
    argv = [os.path.expandvars(a.replace("${TINYLLAMA_ASSETS}", str(ASSETS)).replace("$TINYLLAMA_ASSETS",
                                                                                          str(ASSETS)))
            for a in command.argv]
    resolved, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in OUTPUT_FLAGS and i + 1 < len(argv):
            new = str(Path("out") / str(index) / Path(argv[i + 1]).name)
            (workdir / new).parent.mkdir(parents=True, exist_ok=True)  # as the docs' own folder exists
            outputs[argv[i + 1]] = new
            resolved += [arg, new]
            i += 2
            continue
        if arg == REAL_RUN or arg.startswith(REAL_RUN + "/"):
            arg = "runs/smoke" + arg[len(REAL_RUN):]
        elif arg in outputs:
            arg = outputs[arg]
        elif not arg.startswith("-") and not Path(arg).is_absolute() and "/" in arg \
                and not (workdir / arg).exists() and (ROOT / arg).exists():
            arg = str(ROOT / arg)
        resolved.append(arg)
        i += 1
    if argv[0] in ("train", "dpo") and "--help" not in argv and not any(
            a.split("=")[0] == "--output_dir" for a in argv):
        resolved += ["--output_dir", str(Path("out") / str(index) / "run")]  # never over the sequence's runs
    return resolved


def validate(argv: list[str], refusal: tuple[str, ...], capsys, monkeypatch) -> None:
    """train: the flags resolve to a configuration; dpo: through its own parser; the rest: their parser."""
    if argv[0] == "train":
        rc = _main(["config", *argv[1:]])
        error = capsys.readouterr().err
        assert rc == 0 or any(line in error for line in refusal), error[-2000:]
        return
    if argv[0] == "dpo":
        from tinyllama_ft import parse_dpo_config
        from tinyllama_ft.errors import UserError

        try:
            parse_dpo_config(argv[1:])
        except UserError as error:
            assert any(line in str(error) for line in refusal), error
        return
    from tinyllama_ft.errors import ArgParser

    def parse_only(self, args=None, namespace=None):
        raise Parsed(argparse.ArgumentParser.parse_args(self, args, namespace))

    monkeypatch.setattr(ArgParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        rc = _main(argv)
        pytest.fail(f"the command did not reach its argument parser (exit {rc}): "
                    f"{capsys.readouterr().err[-2000:]}")


@pytest.mark.parametrize("index, command", [_param(i, c) for i, c in enumerate(COMMANDS)])
def test_docs_command(index, command, request, capsys, monkeypatch):
    if _needs_assets(command) and not ASSETS.exists():
        pytest.skip(f"offline asset folder {ASSETS} not found (set TINYLLAMA_ASSETS to the shared assets folder)")
    workdir = request.getfixturevalue("workdir" if _needs_runs(command) else "tmp_path")
    monkeypatch.chdir(workdir)
    argv = resolve(command, index, workdir, OUTPUTS)
    why = only_validated(command)
    if why is not None:
        validate(argv, why[1], capsys, monkeypatch)
        return
    same = signature(command)
    if same in SEQUENCE:
        return  # run by the fixture, in the README's order, as it shows them
    if same in RAN:
        return  # the same command as another page's, once the real run is the smoke run: that test ran it
    RAN[same] = str(command)
    if argv[0] == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("Name three primes.\n"))
    rc = _main(argv)
    assert rc == 0, f"{command}\nran as: {shlex.join(argv)}\n{capsys.readouterr().err[-3000:]}"
    for flag in OUTPUT_FLAGS:
        if flag in argv:
            assert (workdir / argv[argv.index(flag) + 1]).exists(), f"{command}: nothing written at {flag}"


def test_the_pages_show_the_offline_sequence_and_ci_runs_the_readmes_test_command():
    """The extraction finds the README's first commands, and the README's test line is CI's (`.ci/run`)."""
    readme = [c.argv for c in COMMANDS if c.page == "README.md"]
    assert all(step in readme for step in SEQUENCE), readme
    assert [readme.index(step) for step in SEQUENCE] == sorted(readme.index(step) for step in SEQUENCE)
    test_line = "python -m pytest -q -n 2 --dist loadfile"
    assert test_line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert test_line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_extraction_reads_the_shell_as_a_user_types_it(tmp_path):
    """Comments, quotes, continuations, operators, synopses and PowerShell-only lines, on a literal page."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash",
        'python -m tinyllama_ft generate --adapter runs/smoke --instruction "Hi # there"   # a comment',
        "python -m tinyllama_ft train --preset smoke \\",
        "    --max_steps 2 && echo done",
        "```", "```text", "python -m tinyllama_ft config [--name value ...]", "```",
        "```", "python -m tinyllama_ft bench --preset cpu [--out bench.json]", "```",
        "```powershell", 'python -m tinyllama_ft config --output_dir "$env:TEMP\\runs"',
        "python -m tinyllama_ft chat --adapter `",
        "  runs/smoke", "```", "python -m tinyllama_ft config   (prose, outside a block)"]), encoding="utf-8")
    got = [(c.argv, c.synopsis) for c in doc_commands([page])]
    assert got == [(("generate", "--adapter", "runs/smoke", "--instruction", "Hi # there"), False),
                   (("train", "--preset", "smoke", "--max_steps", "2"), False),
                   (("bench", "--preset", "cpu", "--out", "bench.json"), True),
                   (("chat", "--adapter", "runs/smoke"), False)]


def test_every_docs_command_is_run_or_validated_for_a_reason():
    """The list that the report shows: a command not in VALIDATED_ONLY is run for real above."""
    assert COMMANDS, "no `python -m tinyllama_ft` line found in README.md or docs/*.md"
    for command in COMMANDS:
        why = only_validated(command)
        assert why is None or why[0], command
    print("\n".join(f"{'validated' if only_validated(c) else 'run'}: {c}" for c in COMMANDS))


COLUMNS_EXAMPLE = re.compile(r"--columns[ =]([^\s`]+)|\bcolumns: (\{[^`}]*\})")


def column_examples(pages=PAGES) -> list[tuple[str, int, str, str]]:
    """(page, line, the `--columns` value or YAML `columns:` mapping, the rows it describes): each example of
    renaming columns, with the ```json block that follows it within 12 lines (the data it is shown for).
    Usage synopses (`--columns a=b,...`) and tables (which quote messages) are not examples."""
    found = []
    for page in pages:
        lines = page.read_text(encoding="utf-8").splitlines()
        blocks, start = [], None  # (first line, text) of each ```json block
        for number, line in enumerate(lines):
            if line.strip().startswith("```"):
                if start is None and line.strip() == "```json":
                    start = number
                elif start is not None:
                    blocks.append((start, "\n".join(lines[start + 1:number])))
                    start = None
        for number, line in enumerate(lines):
            for match in COLUMNS_EXAMPLE.finditer("" if line.startswith("|") else line):
                value = match.group(1) or match.group(2)
                if "..." in value or value.startswith("a=b"):
                    continue
                rows = next((text for first, text in blocks if 0 < first - number <= 12), None)
                found.append((page.relative_to(ROOT).as_posix(), number + 1, value, rows))
    return found


@pytest.mark.parametrize("page, line, value, rows", column_examples(), ids=lambda v: str(v)[:40])
def test_docs_columns_example_reads_the_rows_it_is_shown_for(page, line, value, rows, tmp_path):
    """A `--columns` example renames the very rows the page shows beside it into rows this project trains on
    (SFT rows into conversations, DPO's into pairs), with nothing missing."""
    import json

    import yaml

    from tinyllama_ft.data.formats import COLUMN_NAMES, load_rows, parse_columns, to_conversations
    from tinyllama_ft.data.pairs import PAIR_COLUMNS, load_pairs, to_pair

    assert rows is not None, f"{page}:{line}: show the rows `{value}` is for in a ```json block right after it"
    path = tmp_path / "rows.jsonl"
    path.write_text(rows.strip() + "\n", encoding="utf-8")
    given = yaml.safe_load(value) if value.startswith("{") else value
    ours = parse_columns(given, (*COLUMN_NAMES, *PAIR_COLUMNS))
    if "chosen" in {*json.loads(rows.splitlines()[0]), *ours}:
        pairs = [to_pair(row) for row in load_pairs(str(path), columns=parse_columns(given, PAIR_COLUMNS))]
        assert all(p["prompt"] and p["chosen"] and p["rejected"] for p in pairs), pairs
    else:
        conversations = to_conversations(load_rows(str(path), columns=parse_columns(given)))
        assert all(c["messages"][-1]["role"] == "assistant" for c in conversations), conversations


def test_every_columns_example_of_the_pages_is_found():
    """The examples the tests above read: a page that shows one more is picked up, one fewer is noticed."""
    assert {(page, value) for page, _, value, _ in column_examples()} >= {
        ("docs/DATA.md", "instruction=question,response=answer"),
        ("docs/DATA.md", "{instruction: question, response: answer}"),
        ("docs/DPO.md", "prompt=question"), ("docs/USAGE.md", "prompt=question,chosen=better,rejected=worse")}


def python_imports(pages=PAGES) -> list[tuple[str, str]]:
    """(page:line, the line) for every `from tinyllama_ft... import` / `import tinyllama_ft...` line of the pages'
    Python blocks: what a reader copies into a notebook first."""
    found = []
    for page in pages:
        fence = None
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            text = line.strip()
            if text.startswith("```"):
                fence = text[3:].strip().lower() if fence is None else None
            elif fence == "python" and re.match(r"(from tinyllama_ft[\w.]* import |import tinyllama_ft)", text):
                found.append((f"{page.relative_to(ROOT).as_posix()}:{number}", text.split("#")[0].strip()))
    return found


@pytest.mark.parametrize("where, line", python_imports())
def test_docs_python_imports_import(where, line):
    """The pages' Python examples import what they name from where they say (the wings' module paths)."""
    exec(line, {})  # noqa: S102 - a line of our own docs
