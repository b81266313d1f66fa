"""Every code block in the docs runs, and every file shown in them is the real file."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port

BLOCK = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


def blocks(path: Path, lang: str) -> list[tuple[str | None, str]]:
    return [(m["file"], m["code"]) for m in BLOCK.finditer(path.read_text()) if m["lang"] == lang]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_shown_in_docs_are_the_real_files(doc):
    for name, code in blocks(doc, "python"):
        if name:
            assert code == (REPO / name).read_text(), f"{doc.name} shows a stale copy of {name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for name, code in blocks(doc, "python"):
        exec(compile(code, f"{doc.name}:{name or 'block'}", "exec"), namespace)


def shell_commands(doc: Path) -> list[str]:
    commands = []
    for _, code in blocks(doc, "bash"):
        for line in code.splitlines():
            if line.strip() and not line.startswith("#") and "pip install" not in line:
                commands.append(line)
    return commands


@pytest.mark.parametrize(
    "command", [c for doc in DOCS for c in shell_commands(doc)], ids=lambda c: c[:60]
)
def test_shell_commands_run(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(LLM_LOGGING_LOG_DIR=str(tmp_path / "run"), LLM_LOGGING_PROGRESS_BAR="false",
               LLM_DATA_CACHE_DIR=str(tmp_path / "cache"), PET_MASTER_PORT=str(free_port()),
               PYTHONPATH=str(REPO))
    out = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").exists() or "--help" in command
