"""Bash completion: commands, subcommands, and image names from the store."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

from aptlayer.store import CreateOptions, Store


def complete(words: str, cword: int, **extra: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMP_WORDS": words, "COMP_CWORD": str(cword),
           "_APT_LAYER_COMPLETE": "bash_complete", **extra}
    code = "import sys; from aptlayer.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]


def test_bash_source_script_is_emitted():
    env = {**os.environ, "PYTHONPATH": str(REPO), "_APT_LAYER_COMPLETE": "bash_source"}
    code = "import sys; from aptlayer.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "complete -o nosort -F _apt_layer_completion apt-layer" in r.stdout


def test_commands_and_subcommands_complete():
    assert complete("apt-layer ro", 1) == ["rollback"]
    assert complete("apt-layer image c", 2) == ["create"]
    assert set(complete("apt-layer tx", 2)) == {"begin", "commit", "list", "rollback", "show"}


def test_image_names_complete_from_the_store(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "motd").write_text("hello\n")
    store = Store.open(tmp_path / "store")
    for name in ("base", "base-next", "other"):
        store.create(str(tree), name, CreateOptions(backend="python"))
    store.close()
    root = str(tmp_path / "store")
    assert complete(f"apt-layer --root {root} deploy ba", 4) == ["base", "base-next"]
    assert complete(f"apt-layer --root {root} image info", 5) == ["base", "base-next", "other"]
    assert complete(f"apt-layer deploy --root {root} ba", 4) == ["base", "base-next"]  # --root after the command
    # No store there: no names, and no error printed into the shell.
    assert complete(f"apt-layer --root {tmp_path / 'none'} deploy ", 4) == []
