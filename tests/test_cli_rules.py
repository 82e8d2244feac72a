"""Every command of ``apt-layer`` is held to the same rules, read from click's own registry.

A command added later (by any branch) is walked like the others, and fails
here until it keeps the rules:

1. it takes the global options ``--root``, ``--config`` and ``-q`` after its
   name, and its ``--help`` shows them (``options.adopt`` does this for every
   command the group resolves);
2. it takes ``--json`` (every command prints data);
3. docs/json.md says what it prints under ``--json``, and what it prints
   has exactly the documented keys and types;
4. under ``--json``, an error is ``{"error": ..., "exit": N}`` on stdout;
5. its help has an example, and each example line parses;
6. it has an invocation in :data:`SAMPLES` (args that parse), which this
   file runs against a real store unless :data:`NOT_RUN_HERE` says why not.

The drop-in tools (``composefs mkcomposefs|info|mount``) take upstream's
arguments only: rules 1-6 do not apply to them.

Then every exit code of the README's table is provoked, here or by a named
test elsewhere (:data:`PROVOKED_ELSEWHERE`).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sqlite3
import sys
import tarfile
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from aptlayer.cli import cli, main
from aptlayer.cli.options import takes_raw_arguments
from aptlayer.cli.tree import walk

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "json.md"
README = REPO / "README.md"


ALL = [(path, command) for path, command, _ in walk(cli)]
#: every command that runs (not a group), but the drop-ins
LEAVES = {" ".join(path): command for path, command in ALL
          if path and not isinstance(command, click.Group) and not takes_raw_arguments(command)}
#: every command and group but the drop-ins and the top group
COMMANDS = {" ".join(path): command for path, command in ALL if path and not takes_raw_arguments(command)}

#: an invocation of each command (the words after its name): {src}, {tmp}, {tx} are filled in
SAMPLES: dict[str, list[str]] = {
    "audit": ["SELECT name, digest FROM v_images"],
    "base bootstrap": ["bookworm", "new-base"],
    "boot complete": [],
    "boot entries": ["--boot-dir", "{tmp}/boot"],
    "check": [],
    "cleanup": ["-r"],
    "deploy": ["other"],
    "diff": ["base", "other"],
    "etc diff": [],
    "fsck": [],
    "gc": ["--dry-run"],
    "image create": ["{src}", "new"],
    "image delete": ["other"],
    "image dump": ["base"],
    "image export": ["base", "{tmp}/base.tar"],
    "image import": ["{tmp}/tree.tar", "imported"],
    "image info": ["base"],
    "image list": [],
    "image ls": ["base"],
    "image missing-objects": ["base"],
    "image mount": ["base", "{tmp}/mnt"],
    "image objects": ["base"],
    "image unmount": ["{tmp}/mnt"],
    "install": ["htop", "--from", "base", "--no-deploy"],
    "journal checkpoint": ["--key", "{tmp}/journal.key"],
    "journal rebuild": [],
    "journal verify": [],
    "log": ["-n", "5"],
    "override remove": ["nano", "--from", "base"],
    "override reset": ["--from", "base"],
    "packages": ["base"],
    "pull": ["oci:{tmp}/layout:v1", "pulled"],
    "push": ["base", "oci:{tmp}/layout:v1"],
    "rebase": ["other"],
    "recover": [],
    "rollback": [],
    "status": [],
    "tx begin": [],
    "tx commit": ["{tx}"],
    "tx list": [],
    "tx rollback": ["{tx}"],
    "tx show": ["{tx}"],
    "uninstall": ["htop", "--from", "base"],
    "upgrade": ["--check", "--from", "base"],
    "watch": ["--duration", "0"],
}

#: commands whose sample does not run to success here, and where they are tested instead
NOT_RUN_HERE = {
    "base bootstrap": "mmdebstrap and a Debian archive (tests/test_bases.py)",
    "image export": "root and kernel mounts (tests/test_bases.py)",
    "image mount": "root and kernel mounts (tests/test_cli.py::test_mounted_image_cannot_be_deleted)",
    "image unmount": "root and kernel mounts (tests/test_cli.py::test_mounted_image_cannot_be_deleted)",
    "install": "apt, dpkg and a Debian base (tests/test_layering.py)",
    "uninstall": "apt, dpkg and a Debian base (tests/test_layering.py)",
    "override remove": "apt, dpkg and a Debian base (tests/test_layering.py)",
    "override reset": "apt, dpkg and a Debian base (tests/test_layering.py)",
    "rebase": "apt, dpkg and a Debian base (tests/test_layering.py)",
    "pull": "an OCI image to pull (tests/test_oci.py)",
}

#: a sample's exit code when it is not 0 (a result, not an error: docs/json.md)
SAMPLE_EXIT = {"upgrade": 77}

EPOCH = 1_700_000_000
DPKG_STATUS = ("Package: base-files\nStatus: install ok installed\nPriority: required\nSection: admin\n"
               "Installed-Size: 300\nMaintainer: Someone <someone@example.org>\nArchitecture: amd64\n"
               "Version: 12.4\nDescription: base files\n\n")


# --- running ------------------------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    """``apt-layer ARGS...`` in-process through ``main()``: (exit code, stdout, stderr)."""
    with CliRunner().isolation() as (out, err, _):
        rc = main(list(args))
    return rc, out.getvalue().decode(), err.getvalue().decode()


def make_tree(top: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    for path in sorted(top.rglob("*"), reverse=True) + [top]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
    return top


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """A store with images base (previous), next (current), other; an open transaction staging
    'staged'; a source tree with a dpkg database; a tarball; a config file naming the store."""
    root = tmp_path / "store"
    src = make_tree(tmp_path / "src", {"var/lib/dpkg/status": DPKG_STATUS, "etc/motd": "hello\n" * 20,
                                       "usr/bin/tool": "T" * 3000})
    other = make_tree(tmp_path / "other", {"var/lib/dpkg/status": DPKG_STATUS, "etc/motd": "other\n" * 20})
    for tree, name in ((src, "base"), (src, "next"), (other, "other")):
        assert run("image", "create", "--root", str(root), str(tree), name)[0] == 0
    for name in ("base", "next"):
        assert run("deploy", name, "--root", str(root))[0] == 0
    rc, tx, _ = run("tx", "begin", "--root", str(root))
    assert run("image", "create", "--tx", tx.strip(), str(src), "staged", "--root", str(root))[0] == 0
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:
        tar.add(src, arcname=".")
    config = tmp_path / "config.toml"
    config.write_text(f'root = "{root}"\n')
    values = {"src": str(src), "tmp": str(tmp_path), "tx": tx.strip()}
    return {"root": root, "config": config, "values": values}


def sample(name: str, values: dict) -> list[str]:
    return [*name.split(), *(a.format(**values) for a in SAMPLES[name])]


# --- docs/json.md, read ---------------------------------------------------------------------------------

TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict, "null": type(None)}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented_commands() -> dict[str, str]:
    """command -> what it prints (``array of image``, ``created``, ...), from the table."""
    table = DOC.read_text().split("## What each command prints", 1)[1].split("## Schemas", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = _cells(line)
        if len(cells) == 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].replace("`", "")
    return rows


def documented_schemas() -> dict[str, dict[str, tuple[set[type], bool]]]:
    """schema -> key -> (allowed types, optional)."""
    schemas: dict[str, dict] = {}
    for section in re.split(r"^### ", DOC.read_text().split("## Schemas", 1)[1], flags=re.M)[1:]:
        name, body = section.split("\n", 1)
        keys = {}
        for line in body.splitlines():
            cells = _cells(line)
            if len(cells) == 3 and re.fullmatch(r"`[a-z_]+`", cells[0]):
                words = cells[1].replace(",", " ").split()
                keys[cells[0].strip("`")] = ({TYPES[w] for w in words if w in TYPES}, "optional" in words)
        schemas[name.strip()] = keys
    return schemas


def check_against(schema: str, value, where: str) -> None:
    """``value`` has exactly the keys of ``schema`` (optional ones may be absent), each of a listed type."""
    keys = documented_schemas()[schema]
    if not keys:  # `row`: the query's columns
        assert isinstance(value, dict), f"{where}: not an object"
        return
    assert isinstance(value, dict), f"{where}: not an object but {value!r}"
    missing = {k for k, (_, optional) in keys.items() if not optional} - set(value)
    if "hardlink_of" in value:  # a later name of a hard link: path and hardlink_of only
        missing = set()
    extra = set(value) - set(keys)
    assert not missing, f"{where}: keys docs/json.md lists under `{schema}` are missing: {sorted(missing)}"
    assert not extra, f"{where}: keys not documented under `{schema}` in docs/json.md: {sorted(extra)}"
    for key, item in value.items():
        types, _ = keys[key]
        if bool in types or not isinstance(item, bool):  # JSON's true is not an integer
            assert isinstance(item, tuple(types)), f"{where}: `{key}` is {item!r}, docs/json.md says {types}"


def check_document(prints: str, text: str, where: str) -> None:
    if prints.startswith("lines of "):
        for line in text.splitlines():
            check_against(prints.removeprefix("lines of "), json.loads(line), where)
        return
    value = json.loads(text)
    if prints.startswith("array of "):
        assert isinstance(value, list), f"{where}: docs/json.md says {prints}, got {type(value).__name__}"
        item = prints.removeprefix("array of ")
        for element in value:
            if item == "string":
                assert isinstance(element, str), f"{where}: {element!r} is not a string"
            else:
                check_against(item, element, where)
    else:
        check_against(prints, value, where)


# --- 1, 2: the options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_global_options_are_in_every_commands_help(name: str) -> None:
    rc, out, err = run(*name.split(), "--help")
    assert rc == 0, err
    for option in ("--root DIR", "--config FILE", "-q, --quiet"):
        assert option in out, f"`apt-layer {name} --help` does not show the global option {option}"


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_every_command_takes_json(name: str) -> None:
    options = {opt for p in LEAVES[name].params for opt in getattr(p, "opts", ())}
    assert "--json" in options, (f"`apt-layer {name}` has no --json option: every command that prints data "
                                 "takes one (@json_option from aptlayer/cli/output.py)")


# --- 3: JSON output as documented --------------------------------------------------------------------------


def test_docs_json_lists_every_command_and_only_those() -> None:
    documented = documented_commands()
    assert not set(LEAVES) - set(documented), (
        f"docs/json.md's table does not say what these commands print: {sorted(set(LEAVES) - set(documented))}")
    assert not set(documented) - set(LEAVES), f"docs/json.md lists no such commands: {set(documented) - set(LEAVES)}"
    schemas = documented_schemas()
    for name, prints in documented.items():
        schema = re.sub(r"^(array of|lines of) ", "", prints)
        assert schema == "string" or schema in schemas, f"docs/json.md: `{name}` prints `{schema}`, not documented"


def test_every_command_has_a_sample() -> None:
    lacking = sorted(set(LEAVES) - set(SAMPLES))
    assert not lacking, f"tests/test_cli_rules.py SAMPLES has no invocation for: {lacking} (add one)"
    assert set(NOT_RUN_HERE) <= set(SAMPLES) and set(SAMPLES) <= set(LEAVES)


@pytest.mark.parametrize("name", sorted(set(LEAVES) - set(NOT_RUN_HERE)))
def test_json_output_has_the_documented_keys(world: dict, name: str) -> None:
    """Run with the global options after the command: --config names the store, -q silences."""
    rc, out, err = run(*sample(name, world["values"]), "--json", "-q", "--config", str(world["config"]))
    assert rc == SAMPLE_EXIT.get(name, 0), f"apt-layer {name}: exit {rc}: {err}"
    check_document(documented_commands()[name], out, f"apt-layer {name} --json")


def test_the_entry_schema_covers_every_kind_of_entry(tmp_path: Path) -> None:
    """ls --json of a tree with a symlink, an inline and an external file, an xattr; and of an image
    with a hard link (from a dump: a directory's hard links become separate files, as upstream's do)."""
    root, tree = tmp_path / "store", make_tree(tmp_path / "t", {"big": "B" * 5000, "small": "s"})
    os.symlink("big", tree / "link")
    os.setxattr(tree / "small", "user.note", b"hi")
    assert run("image", "create", str(tree), "t", "--root", str(root))[0] == 0
    rc, out, err = run("image", "ls", "t", "--json", "--root", str(root))
    entries = {e["path"]: e for e in json.loads(out)}
    check_document("array of entry", out, "image ls --json")
    assert entries["/link"]["type"] == "symlink" and entries["/link"]["target"] == "big"
    assert entries["/big"]["type"] == "file" and entries["/big"]["object"] and entries["/big"]["size"] == 5000
    assert entries["/small"]["object"] is None and entries["/small"]["xattrs"] == {"user.note": "hi"}
    rc, dump, _ = run("image", "dump", "t", "--json", "--root", str(root))
    assert json.loads(dump) == json.loads(out)
    rc, objects, _ = run("image", "objects", "t", "--json", "--root", str(root))
    assert json.loads(objects) == [entries["/big"]["object"]]
    big = entries["/big"]
    (tmp_path / "d.dump").write_text(f"/ 4096 40755 2 0 0 0 0.0 - - -\n/big 5000 100644 2 0 0 0 0.0 {big['object']} - "
                                     f"{big['digest']}\n/hard 0 @120000 0 0 0 0 0.0 /big - -\n")
    assert run("image", "create", "--from-file", str(tmp_path / "d.dump"), "d", "--root", str(root))[0] == 0
    rc, out, _ = run("image", "ls", "d", "--json", "--root", str(root))
    check_document("array of entry", out, "image ls --json")
    assert json.loads(out)[1] == {"path": "/hard", "hardlink_of": "/big"}


# --- 4: errors under --json ---------------------------------------------------------------------------------


@pytest.fixture
def newer_store(world: dict) -> Path:
    """The world's store, its journal written by a newer apt-layer: every command refuses it (exit 5)."""
    with sqlite3.connect(world["root"] / "journal.db") as conn:
        conn.execute("PRAGMA user_version = 42")
    conn.close()
    return world["root"]


#: commands that never open the store, so a store's error cannot reach them
STORELESS = {"check": "reads the running kernel only"}


@pytest.mark.parametrize("name", sorted(set(LEAVES) - set(STORELESS)))
def test_an_error_under_json_is_a_json_object(world: dict, newer_store: Path, name: str) -> None:
    """--root after the command names the store (the default root would give another error)."""
    rc, out, err = run(*sample(name, world["values"]), "--json", "--root", str(newer_store))
    message = (f"{newer_store.absolute()}/journal.db: journal written by a newer apt-layer (version 42, "
               "this apt-layer supports up to 3)")
    assert (rc, err) == (5, f"apt-layer: {message}\n"), f"apt-layer {name}"
    assert json.loads(out) == {"error": message, "exit": 5}, f"apt-layer {name}: stdout under --json"


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_a_usage_error_under_json_is_a_json_object(name: str) -> None:
    rc, out, err = run(*name.split(), "--json", "--no-such-option")
    assert rc == 2 and err.endswith("Error: No such option '--no-such-option'.\n")
    assert json.loads(out) == {"error": "No such option '--no-such-option'.", "exit": 2}, f"apt-layer {name}"


def test_without_json_stdout_stays_empty_on_error(world: dict, newer_store: Path) -> None:
    rc, out, _ = run("image", "list", "--root", str(newer_store))
    assert (rc, out) == (5, "")


# --- 5: help examples ---------------------------------------------------------------------------------------


def _example_lines(command: click.Command) -> list[str]:
    text = (command.help or "").split("Example:", 1)[-1]
    return [line[line.index("apt-layer "):] for line in text.splitlines() if "apt-layer " in line]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_examples_parse(name: str) -> None:
    """Each example line of the command's own help parses: its options and arguments exist."""
    command = COMMANDS[name]
    lines = [line for line in _example_lines(command) if line.startswith(f"apt-layer {name}")]
    assert lines, f"`apt-layer {name} --help` has no example of `apt-layer {name} ...`"
    for line in lines:
        words = shlex.split(re.split(r"\s(?:\||&&|;|>)\s", line)[0].replace("$(", "").replace(")", ""))
        args = words[1 + len(name.split()):]
        ctx = click.Context(cli, info_name="apt-layer")
        try:
            command.make_context(name.split()[-1], args, parent=ctx)
        except click.exceptions.Exit:  # an example showing --help
            pass
        except click.UsageError as e:
            pytest.fail(f"example `{line}` of `apt-layer {name}` does not parse: {e.format_message()}")


# --- exit codes ------------------------------------------------------------------------------------------


def documented_exit_codes() -> set[int]:
    table = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}


#: codes provoked by tests in other files (kept there: they need their own setup)
PROVOKED_ELSEWHERE = {
    7: ("tests/test_cli.py", "test_non_root_user_gets_exit_7"),
    8: ("tests/test_cli.py", "test_full_disk_during_create_exits_8"),
    11: ("tests/test_security_permissions.py", "test_a_journal_owned_by_another_user_is_refused"),
    12: ("tests/test_oci.py", "test_plain_http_needs_tls_verify_false"),
}
#: codes provoked in this file, by the test named
PROVOKED_HERE = {0: "test_json_output_has_the_documented_keys", 1: "test_exit_1_an_operation_failed",
                 2: "test_exit_2_invalid_input", 3: "test_exit_3_not_found", 4: "test_exit_4_conflict",
                 5: "test_an_error_under_json_is_a_json_object", 6: "test_exit_6_damaged_store",
                 9: "test_exit_9_kernel_feature_missing", 10: "test_exit_10_a_check_found_damage",
                 70: "test_exit_70_internal_error", 77: "test_json_output_has_the_documented_keys",
                 130: "test_exit_130_interrupted"}


def test_every_documented_exit_code_is_provoked_by_a_test() -> None:
    codes = documented_exit_codes()
    assert codes == set(PROVOKED_HERE) | set(PROVOKED_ELSEWHERE), "README's exit-code table and the tests differ"
    here = Path(__file__).read_text()
    for code, test in PROVOKED_HERE.items():
        assert f"def {test}(" in here, (code, test)
    for code, (file, test) in PROVOKED_ELSEWHERE.items():
        source = (REPO / file).read_text()
        body = source.split(f"def {test}(", 1)
        assert len(body) == 2 and str(code) in body[1].split("\ndef ", 1)[0], (code, file, test)


def test_exit_1_an_operation_failed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    rc, _, err = run("tx", "begin", "--root", str(tmp_path / "file" / "store"))
    assert (rc, err) == (1, f"apt-layer: cannot create store at {tmp_path}/file/store: Not a directory\n")


@pytest.mark.parametrize("args, message", [
    (["image", "create", "{src}/etc/motd", "x"],
     "source {src}/etc/motd: not a directory (for a composefs-dump(5) file, pass --from-file)"),
    (["log", "--since", "yesterday"],
     "--since 'yesterday' is not a UTC time: give ISO 8601 or a prefix of it, e.g. 2026-11-25 or 2026-11-25T10:00"),
    (["log", "--until", "2026-13"],
     "--until '2026-13' is not a UTC time: give ISO 8601 or a prefix of it, e.g. 2026-11-25 or 2026-11-25T10:00"),
    (["audit", ""], 'audit: the query is empty (e.g. apt-layer audit "SELECT * FROM v_images")'),
    (["audit", "SELECT 1; SELECT 2"], "audit runs one SQL statement at a time; this query has more than one"),
    (["image", "create", "{src}", "a b"], "invalid image name 'a b': image names are letters, digits and "
                                          ". _ + -, starting with a letter or digit, not ending in .composefs"),
    (["image", "create", "{src}", "x:y@z"], "invalid image name 'x:y@z': image names are letters, digits and "
                                            ". _ + -, starting with a letter or digit, not ending in .composefs"),
    (["image", "create", "{src}", "n.composefs"], "invalid image name 'n.composefs': image names are letters, "
                                                  "digits and . _ + -, starting with a letter or digit, not ending "
                                                  "in .composefs"),
    (["image", "create", "{src}", "_x"], "invalid image name '_x': image names are letters, digits and "
                                         ". _ + -, starting with a letter or digit, not ending in .composefs"),
])
def test_exit_2_invalid_input(world: dict, args: list[str], message: str) -> None:
    root = world["root"]
    before = run("log", "--json", "--root", str(root))[1]
    rc, out, err = run(*[a.format(**world["values"]) for a in args], "--root", str(root))
    assert (rc, out, err) == (2, "", f"apt-layer: {message.format(**world['values'])}\n")
    assert run("log", "--json", "--root", str(root))[1] == before


def test_log_kind_must_be_a_kind_events_have(world: dict) -> None:
    rc, _, err = run("log", "--kind", "bogus", "--root", str(world["root"]))
    assert rc == 2 and err.startswith("apt-layer: --kind 'bogus': no event has that kind; the kinds are ")
    assert "image.created" in err and "undeployed" in err
    assert run("log", "--kind", "image.*", "--root", str(world["root"]))[0] == 0
    assert run("log", "--kind", "drift.*", "--root", str(world["root"]))[0] == 0
    rc, out, _ = run("log", "--since", "2000-01-01 00:00", "--json", "--root", str(world["root"]))
    assert rc == 0 and len(json.loads(out)) >= 10  # a space, as `log` prints times, for the T


def test_names_from_before_the_rule_still_list_deploy_and_delete(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A store made by an apt-layer without the rule (its name check is what the old one did)."""
    from aptlayer import names

    root, tree = tmp_path / "store", make_tree(tmp_path / "t", {"f": "x" * 100})
    monkeypatch.setattr(names, "check_new_image_name", names.check_image_name)  # the old apt-layer
    for name in ("a b", "x.composefs"):
        assert run("image", "create", str(tree), name, "--root", str(root))[0] == 0
    monkeypatch.undo()
    rc, out, _ = run("image", "list", "--json", "--root", str(root))
    assert [i["name"] for i in json.loads(out)] == ["a b", "x.composefs"]
    assert run("deploy", "a b", "--root", str(root))[0] == 0
    assert (root / "images/x.composefs.composefs").is_file()
    rc, _, err = run("image", "delete", "x.composefs", "--root", str(root))
    assert rc == 0, err
    assert not (root / "images/x.composefs.composefs").exists()
    assert run("image", "create", str(tree), "x.composefs", "--root", str(root))[0] == 2


def test_exit_3_not_found(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = world["root"]
    assert run("image", "info", "nosuch", "--root", str(root))[:2] == (3, "")
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("APT_LAYER_COMPOSEFS_BIN", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    if os.path.exists("/usr/sbin/mkcomposefs") or os.path.exists("/sbin/mkcomposefs"):
        pytest.skip("mkcomposefs is installed system-wide")
    rc, out, err = run("image", "create", "--backend", "upstream", world["values"]["src"], "up", "--root", str(root))
    assert (rc, out, err) == (3, "", "apt-layer: --backend upstream: mkcomposefs is not installed (install "
                                     "Debian's composefs package, or use --backend python)\n")


def test_exit_4_conflict(world: dict) -> None:
    rc, out, err = run("deploy", "next", "--json", "--root", str(world["root"]))
    message = "image 'next' is already the current deployment"
    assert (rc, err, json.loads(out)) == (4, f"apt-layer: {message}\n", {"error": message, "exit": 4})


def test_a_second_deploy_in_a_transaction_replaces_the_first(world: dict) -> None:
    root, tx = world["root"], world["values"]["tx"]
    for name in ("other", "base"):
        assert run("deploy", "--tx", tx, name, "--root", str(root))[:2] == (
            0, f"deployment of {name} staged in transaction {tx}\n")
    rc, out, _ = run("tx", "show", tx, "--json", "--root", str(root))
    assert [(o["op"], o["name"]) for o in json.loads(out)["ops"]] == [("create", "staged"), ("deploy", "base")]
    assert run("tx", "commit", tx, "--root", str(root))[1] == f"committed {tx}: image.created staged, deployed base\n"
    assert _slots(root) == {"current": "base", "previous": "next"}
    kinds = [e["kind"] for e in json.loads(run("log", "--tx", tx, "--json", "--root", str(root))[1])]
    assert kinds[::-1] == ["tx.begun", "image.staged", "deploy.staged", "deploy.unstaged", "deploy.staged",
                           "image.created", "deployed", "tx.committed"]


def test_exit_6_damaged_store(world: dict) -> None:
    root = world["root"]
    (root / "images/other.composefs").unlink()
    rc, out, err = run("image", "ls", "other", "--json", "--root", str(root))
    assert rc == 6 and json.loads(out)["exit"] == 6 and "is missing (run apt-layer recover)" in err


def test_exit_9_kernel_feature_missing(world: dict, tmp_path: Path, as_root: None) -> None:
    """--verity require on a store whose file system has no fs-verity."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, _, err = run("image", "mount", "base", str(mnt), "--verity", "require", "--root", str(world["root"]))
    if rc == 0:
        run("image", "unmount", str(mnt), "--root", str(world["root"]))
        pytest.skip("this file system has fs-verity: --verity require works")
    if rc == 7:
        pytest.skip(f"cannot mount here: {err.strip()}")
    assert rc == 9, err


def test_exit_10_a_check_found_damage(world: dict) -> None:
    root = world["root"]
    objects = json.loads(run("image", "objects", "base", "--json", "--root", str(root))[1])
    (root / "images/objects" / objects[0]).unlink()
    rc, out, _ = run("fsck", "--json", "--root", str(root))
    assert rc == 10 and json.loads(out)["ok"] is False
    rc, out, _ = run("image", "missing-objects", "base", "--json", "--root", str(root))
    assert (rc, json.loads(out)) == (10, [objects[0]])


def test_exit_70_internal_error() -> None:
    """A bug (an exception apt-layer does not expect) is one line and exit 70, JSON under --json."""
    @click.command("broken")
    @click.option("--json", "as_json", is_flag=True)
    def broken(as_json):
        raise ZeroDivisionError("a bug")

    cli.add_command(broken)
    try:
        rc, out, err = run("broken", "--json")
    finally:
        del cli.commands["broken"]
    message = "internal error: ZeroDivisionError: a bug (set APT_LAYER_DEBUG=1 for a traceback)"
    assert (rc, err, json.loads(out)) == (70, f"apt-layer: {message}\n", {"error": message, "exit": 70})


def test_exit_130_interrupted(world: dict) -> None:
    """SIGINT (Ctrl-C) in the middle of a create: exit 130, one line, the transaction aborted."""
    root = world["root"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "APT_LAYER_PAUSE": "create.after-begin"}
    proc = subprocess.Popen([sys.executable, "-m", "aptlayer", "image", "create", world["values"]["src"], "late",
                             "--root", str(root), "--json"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "\napt-layer: interrupted\n")  # the newline ends the ^C line
    assert json.loads(out) == {"error": "interrupted", "exit": 130}
    rc, txs, _ = run("tx", "list", "--json", "--root", str(root))
    assert [t["state"] for t in json.loads(txs)][-2:] == ["open", "aborted"]  # the world's, and the create's
    assert [e["data"] for e in json.loads(run("log", "--kind", "tx.aborted", "--json", "--root", str(root))[1])] \
        == [{"reason": "KeyboardInterrupt"}]
    assert "late" not in run("image", "list", "--root", str(root))[1]


# --- cleanup and transactions that replace deployments ---------------------------------------------------


def _slots(root: Path) -> dict:
    status = json.loads(run("status", "--json", "--root", str(root))[1])
    return {slot: (d or {}).get("image") for slot, d in status["deployments"].items()}


def test_cleanup_r_makes_the_rollback_deployment_deletable(world: dict) -> None:
    root = world["root"]
    assert _slots(root) == {"current": "next", "previous": "base"}
    rc, _, err = run("image", "delete", "base", "--root", str(root))
    assert (rc, err) == (4, "apt-layer: image 'base' is the previous deployment; `apt-layer cleanup -r` drops "
                            "the rollback deployment\n")
    rc, out, _ = run("cleanup", "-r", "--root", str(root))
    assert (rc, out) == (0, "dropped the rollback deployment base\n")
    assert _slots(root) == {"current": "next", "previous": None}
    assert not (root / "deploy/previous").exists()
    assert os.readlink(root / "deploy/current") == "../images/next.composefs"
    assert run("image", "delete", "base", "--root", str(root))[:2] == (0, "deleted base\n")
    assert run("cleanup", "-r", "--root", str(root))[1] == "no rollback deployment\n"
    assert run("journal", "verify", "--root", str(root))[0] == 0
    before = run("status", "--json", "--root", str(root))[1]
    assert run("journal", "rebuild", "--root", str(root))[0] == 0
    assert run("status", "--json", "--root", str(root))[1] == before


def test_cleanup_p_withdraws_a_staged_deploy_and_keeps_the_rest(world: dict) -> None:
    root, tx = world["root"], world["values"]["tx"]
    assert run("deploy", "--tx", tx, "staged", "--root", str(root))[0] == 0
    rc, out, _ = run("cleanup", "-p", "--json", "--root", str(root))
    unstaged = json.loads(out)["unstaged"]
    assert unstaged == [{"tx": tx, "image": "staged", "digest": unstaged[0]["digest"]}]
    rc, out, _ = run("tx", "commit", tx, "--json", "--root", str(root))
    assert [(o["op"], o["name"]) for o in json.loads(out)["ops"]] == [("create", "staged")]
    assert _slots(root) == {"current": "next", "previous": "base"}
    assert run("cleanup", "--root", str(root))[0] == 2


def test_a_transaction_deploying_v2_may_delete_the_v1_it_replaces(world: dict) -> None:
    """README's example: create v2, delete the old one, deploy v2, in one transaction."""
    root, tx = world["root"], world["values"]["tx"]
    for args in (["image", "delete", "--tx", tx, "next"], ["image", "delete", "--tx", tx, "base"],
                 ["deploy", "--tx", tx, "staged"]):
        rc, _, err = run(*args, "--root", str(root))
        assert rc == 0, err
    rc, out, err = run("tx", "commit", tx, "--root", str(root))
    assert rc == 0, err
    assert out == (f"committed {tx}: image.created staged, image.deleted next, image.deleted base, deployed staged, "
                   "undeployed next\n")
    assert _slots(root) == {"current": "staged", "previous": None}
    rc, out, _ = run("image", "list", "--json", "--root", str(root))
    assert [(i["name"], i["deployed"]) for i in json.loads(out)] == [("other", []), ("staged", ["current"])]
    assert sorted(os.listdir(root / "deploy")) == ["current"]
    assert run("journal", "verify", "--root", str(root))[0] == 0


def test_a_transaction_may_not_delete_what_stays_deployed(world: dict) -> None:
    root, tx = world["root"], world["values"]["tx"]
    assert run("image", "delete", "--tx", tx, "next", "--root", str(root))[0] == 0
    rc, _, err = run("tx", "commit", tx, "--root", str(root))
    assert (rc, err) == (4, f"apt-layer: cannot commit {tx}: image 'next' is the current deployment; stage a deploy "
                            f"of another image in {tx} first; the transaction stays open (`apt-layer tx rollback "
                            f"{tx}` discards it)\n")
    assert _slots(root) == {"current": "next", "previous": "base"}


# --- messages -------------------------------------------------------------------------------------------


def test_a_staged_delete_says_it_is_staged(world: dict) -> None:
    root, tx = world["root"], world["values"]["tx"]
    rc, out, _ = run("image", "delete", "--tx", tx, "other", "--root", str(root))
    assert (rc, out) == (0, f"delete of other staged in transaction {tx}\n")


def test_drop_ins_refuse_help_as_upstream_but_point_to_ours(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for tool, page in (("mkcomposefs", "mkcomposefs(1)"), ("info", "composefs-info(1)")):
        r = subprocess.run([sys.executable, "-m", "aptlayer", "composefs", tool, "--help"], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 1 and "option --help not recognized" in r.stderr
        assert r.stderr.endswith(f"This is apt-layer's drop-in: see `apt-layer composefs --help` and {page}.\n")


def test_drop_in_store_errors_name_no_python_internals(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"big": "B" * 5000})
    (tmp_path / "notdir").write_text("x")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "aptlayer", "composefs", "mkcomposefs",
                        f"--digest-store={tmp_path}/notdir", str(src), str(tmp_path / "out.cfs")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "[Errno" not in r.stderr and "cannot store in the digest store:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "aptlayer", "composefs", "mkcomposefs", str(src),
                        str(tmp_path / "nosuch/out.cfs")], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stderr) == (1, f"mkcomposefs: {tmp_path}/nosuch/out.cfs: No such file or directory\n")


# --- packaging ------------------------------------------------------------------------------------------


def test_pyproject_lists_every_library_the_code_imports() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = {re.split(r"[<>=!~ \[;]", d, 1)[0].lower().replace("_", "-") for d in deps}
    providers = importlib.metadata.packages_distributions()
    imported = set()
    for path in (REPO / "aptlayer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("aptlayer", "__future__")}
    missing = {m for m in third_party if not {d.lower().replace("_", "-") for d in providers.get(m, [m])} & listed}
    assert not missing, f"pyproject.toml's dependencies lack what these imports need: {sorted(missing)}"
