"""The package installs (`pip install .`) and runs from another folder: a throwaway virtualenv gets this
checkout's package and its `tinyllama-ft` console script, and the installed copy, not the checkout, is
what imports and trains. torch and the rest come from this environment (a `.pth` file adds its
site-packages behind the new one's), so nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT
from tinyllama_ft.settings.config import SAMPLE_DATA

SAMPLE_NAME = Path(SAMPLE_DATA).name

SKIP = shutil.ignore_patterns(".git", ".venv", ".venv-lowest", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache")


def run(args, cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
def test_pip_install_gives_a_console_script_that_runs_from_another_folder(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=SKIP)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ)
    scripts = venv / ("Scripts" if os.name == "nt" else "bin")
    python = scripts / ("python.exe" if os.name == "nt" else "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(scripts), env.get("PATH", "")])
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    env).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer-environment.pth").write_text("\n".join(sorted(ours)) + "\n", encoding="utf-8")

    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
         str(source)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import tinyllama_ft, tinyllama_ft.settings.config as c, os; print(tinyllama_ft.__file__); "
                 "print(os.path.isfile(c.SAMPLE_DATA))"], elsewhere, env).stdout.split()
    assert Path(where[0]).is_relative_to(site) and where[1] == "True"  # the installed copy, its samples included
    console = scripts / ("tinyllama-ft.exe" if os.name == "nt" else "tinyllama-ft")
    assert "commands:" in run([console, "--help"], elsewhere, env).stdout
    bad = run([console, "no-such-command"], elsewhere, env, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command")

    run([console, "train", "--preset", "smoke", "--output_dir", "runs/smoke", "--max_steps", 2,
         "--num_generate", 2, "--max_new_tokens", 4], elsewhere, env)
    assert (elsewhere / "runs" / "smoke" / "metrics.json").is_file()
    recorded = (elsewhere / "runs" / "smoke" / "run_config.json").read_text(encoding="utf-8")
    assert SAMPLE_NAME in recorded  # the bundled sample, by its name (and hash) ...
    assert str(site) not in recorded and str(source) not in recorded  # ... not by this machine's folders
