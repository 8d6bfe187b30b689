"""Shell completion scripts in completions/: current with the Typer app, and they really complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMPLETIONS = REPO / "completions"
# `mal` as installed beside this Python (the console script the completion scripts call).
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _generate_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mal_completions_generate", COMPLETIONS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_scripts_are_current():
    generate = _generate_module()
    for shell, name in generate.FILES.items():
        assert (COMPLETIONS / name).read_text() == generate.script(shell), (
            f"completions/{name} is stale: run `python completions/generate.py`"
        )
    assert (COMPLETIONS / "_mal").read_text().startswith("#compdef mal\n")
    done = subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _complete(shell: str, words: str, **extra) -> str:
    env = dict(ENV, _MAL_COMPLETE=f"complete_{shell}", **extra)
    if shell == "bash":
        parts = words.split(" ")
        env.update(COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1))
    else:
        env["_TYPER_COMPLETE_ARGS"] = words
    return subprocess.run(["mal"], env=env, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.skipif(shutil.which("mal", path=ENV["PATH"]) is None, reason="the `mal` console script is not installed")
def test_the_app_answers_completion_requests():
    assert "viz" in _complete("bash", "mal v").split()
    assert "yolo" in _complete("bash", "mal export ").split()
    assert "--worst" in _complete("bash", "mal viz --wo").split()
    assert "export" in _complete("zsh", "mal ex")
    assert "yolo" in _complete("fish", "mal export y", _TYPER_COMPLETE_FISH_ACTION="get-args")


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("mal", path=ENV["PATH"]) is None,
    reason="needs bash and the `mal` console script",
)
def test_bash_script_completes_in_bash():
    script = (
        f'source "{COMPLETIONS / "mal.bash"}"; '
        'COMP_WORDS=(mal lab); COMP_CWORD=1; _mal_completion mal; echo "${COMPREPLY[@]}"; '
        'COMP_WORDS=(mal label --for); COMP_CWORD=2; _mal_completion mal; echo "${COMPREPLY[@]}"'
    )
    done = subprocess.run(["bash", "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["label", "--format"]
