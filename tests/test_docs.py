"""Every code block in the docs runs, and every file shown in them is the real file."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, SCRIPTS, free_port

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


def shell_script(doc: Path) -> str:
    """The doc's bash lines as one script; install steps dropped, long trainings cut to a few steps."""
    lines = []
    for _, code in blocks(doc, "bash"):
        for line in code.splitlines():
            line = re.sub(r"^pip install .*? && ", "", line)
            if line.strip() and not line.startswith("#") and "pip install" not in line and "pytest" not in line:
                lines.append(re.sub(r"--training-max-steps \d+", "--training-max-steps 20", line))
    return "\n".join(lines)


@pytest.mark.parametrize("doc", [d for d in DOCS if shell_script(d)], ids=lambda p: p.name)
def test_shell_commands_run_in_order(doc, tmp_path):
    """Run as a user would, from a folder holding the package (for paths like llm/training/train.py)."""
    (tmp_path / "llm").symlink_to(REPO / "llm")
    (tmp_path / "my_corpus.txt").write_text((REPO / "README.md").read_text() * 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env["PATH"] = SCRIPTS + os.pathsep + env.get("PATH", "")
    env.update(LLM_LOGGING_PROGRESS_BAR="false", LLM_DATA_CACHE_DIR=str(tmp_path / "cache"),
               PET_MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    script = "set -euo pipefail\n" + shell_script(doc)
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert list(tmp_path.glob("runs/*/summary.json"))
