"""Push and pull (aptlayer.oci): OCI layouts, a real registry, umoci, chunking by package, failures.

The registry is Debian's docker-registry (the CNCF Distribution registry),
started on 127.0.0.1 with a temporary storage folder and stopped after; skopeo
carries images to and from it. Tests that need one of the tools skip, saying
which is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aptlayer import errors
from aptlayer.cli.app import main
from aptlayer.oci import chunking, distribute, transport
from aptlayer.oci.layout import OciLayout
from aptlayer.store import Store
from test_bases import rich_tree

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (tools/setup.sh installs it)")
    return path


# --- the registry ---------------------------------------------------------------------------


class Registry:
    """docker-registry serving a temporary storage folder on 127.0.0.1."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.storage = folder / "storage"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        (folder / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([_need("docker-registry"), "serve", str(self.folder / "config.yml")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.folder / "log", "ab"))
        for _ in range(200):  # up to 10 s for it to listen
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        pytest.skip(f"docker-registry did not start: {(self.folder / 'log').read_text()[-300:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def ref(self, repo: str) -> str:
        return f"docker://{self.host}/{repo}"

    def blob_data(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@pytest.fixture
def registry(tmp_path: Path):
    _need("skopeo")
    reg = Registry(tmp_path / "registry")
    reg.start()
    yield reg
    reg.stop()


# --- helpers ----------------------------------------------------------------------------------


def cli(*args: str) -> int:
    return main(list(args))


def state(store: Store) -> tuple:
    """What a failed pull must leave as it was: the images and the journal's events."""
    return ([(i.name, i.digest) for i in store.journal.images()], store.journal.last_seq())


def fsck_clean(root: Path, capsys) -> None:
    capsys.readouterr()
    assert cli("--root", str(root), "fsck") == 0, capsys.readouterr()


def second_store(tmp_path: Path, name: str = "b") -> Store:
    return Store.open(tmp_path / name)


def write_package_tree(root: Path, packages: dict[str, tuple[str, dict[str, bytes]]]) -> Path:
    """A root with a dpkg database: ``{name: (version, {path: content})}``; every mtime set to T0."""
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    status = []
    for name, (version, files) in sorted(packages.items()):
        for path, content in files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        dirs = sorted({str(Path(p).parent) for p in files})
        (info / f"{name}.list").write_text("/.\n" + "".join(f"{d}\n" for d in dirs) + "".join(
            f"{p}\n" for p in sorted(files)))
        (info / f"{name}.md5sums").write_text("".join(f"{hashlib.md5(c).hexdigest()}  {p.lstrip('/')}\n"
                                                      for p, c in sorted(files.items())))
        status.append(f"Package: {name}\nStatus: install ok installed\nVersion: {version}\n"
                      f"Architecture: amd64\nDescription: {name}\n")
    (root / "var/lib/dpkg/status").write_text("\n".join(status))
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/hostname").write_text("machine\n")  # owned by no package
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        os.utime(path, (T0, T0), follow_symlinks=False)
    return root


def package_set(change: str | None = None) -> dict[str, tuple[str, dict[str, bytes]]]:
    """Two big packages (a layer each) and twenty small ones (sharing buckets); ``change`` gets a new version."""
    def content(name: str, n: int, size: int) -> bytes:
        seed = hashlib.sha256(f"{name}-{n}-{'new' if name == change else 'old'}".encode()).digest()
        return (seed * (size // 32 + 1))[:size]

    pkgs = {}
    for name, size in [("bigone", 1_300_000), ("bigtwo", 1_100_000)] + [(f"small{i:02d}", 3000) for i in range(20)]:
        files = {f"/usr/share/{name}/file{n}": content(name, n, size // 2) for n in range(2)}
        pkgs[name] = ("2.0" if name == change else "1.0", files)
    return pkgs


def layer_holdings(layout_dir: Path, tag: str) -> dict[str, str]:
    """What each layer of a pushed image holds -> its digest."""
    _, manifest = OciLayout(layout_dir).resolve(tag)
    return {d["annotations"]["org.apt-layer.layer"]: d["digest"] for d in manifest["layers"]}


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.root
def test_oci_layout_round_trip_gives_the_same_image_in_a_second_store(store, tmp_path, capsys) -> None:
    """Owners, modes, xattrs (binary), hard links, symlinks, devices, a fifo, nanosecond mtimes."""
    src = rich_tree(tmp_path / "src", nanoseconds=True)
    made = store.create(str(src), "rich")
    pushed = distribute.push(store, "rich", f"oci:{tmp_path / 'layout'}:v1")
    assert pushed["digest"] == made["digest"]
    other = second_store(tmp_path)
    pulled = distribute.pull(other, f"oci:{tmp_path / 'layout'}:v1", "rich")
    assert pulled["digest"] == made["digest"] and pulled["verified"]
    assert other.image_file("rich").read_bytes() == store.image_file("rich").read_bytes()
    assert other.missing_objects("rich") == []
    event = next(other.journal.events(kind="image.pulled"))
    assert event.subject == "rich" and event.data["source"] == f"oci:{tmp_path / 'layout'}:v1"
    assert event.data["manifest_digest"] == pushed["manifest_digest"]
    assert event.tx == next(other.journal.events(kind="image.created")).tx
    other.close()
    fsck_clean(tmp_path / "b", capsys)


def test_an_image_of_format_version_1_comes_back_as_itself(store, tmp_path) -> None:
    from aptlayer.builder import CreateOptions

    made = store.create(str(write_package_tree(tmp_path / "src", package_set())), "v1",
                        CreateOptions(min_version=1, max_version=1, backend="python"))
    assert made["digest"] != store.create(str(tmp_path / "src"), "v0", CreateOptions(backend="python"))["digest"]
    distribute.push(store, "v1", f"oci:{tmp_path / 'layout'}")
    assert distribute.pull(second_store(tmp_path), f"oci:{tmp_path / 'layout'}", "v1")["digest"] == made["digest"]


def test_pushing_twice_writes_the_same_blobs(store, tmp_path) -> None:
    src = write_package_tree(tmp_path / "src", package_set())
    store.create(str(src), "img")
    first = distribute.push(store, "img", f"oci:{tmp_path / 'one'}")
    second = distribute.push(store, "img", f"oci:{tmp_path / 'two'}")
    assert first["manifest_digest"] == second["manifest_digest"]
    assert sorted(os.listdir(tmp_path / "one/blobs/sha256")) == sorted(os.listdir(tmp_path / "two/blobs/sha256"))


def test_registry_round_trip_through_the_cli(store, tmp_path, registry, capsys) -> None:
    src = write_package_tree(tmp_path / "src", package_set())
    made = store.create(str(src), "img")
    store.close()
    root_a, root_b = str(tmp_path / "store"), str(tmp_path / "b")
    assert cli("--root", root_a, "push", "img", registry.ref("fleet/img:v1"), "--tls-verify=false", "--json") == 0
    pushed = json.loads(capsys.readouterr().out)
    assert pushed["layers"] > 3
    # skopeo sees a standard image with apt-layer's annotation
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", registry.ref("fleet/img:v1")],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(raw)["annotations"]["org.apt-layer.composefs.digest"] == made["digest"]
    assert cli("--root", root_b, "pull", registry.ref("fleet/img:v1"), "img", "--tls-verify=false", "--json") == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["digest"] == made["digest"] and pulled["manifest_digest"] == pushed["manifest_digest"]
    assert pulled["fetched_layers"] == pushed["layers"] and pulled["verified"]
    other = Store.open(root_b)
    assert other.missing_objects("img") == []
    other.close()
    fsck_clean(tmp_path / "b", capsys)


def test_plain_http_needs_tls_verify_false(store, tmp_path, registry, capsys) -> None:
    store.create(str(write_package_tree(tmp_path / "src", package_set())), "img")
    store.close()
    rc = cli("--root", str(tmp_path / "store"), "push", "img", registry.ref("img:v1"))
    assert rc == 12
    assert capsys.readouterr().err.startswith(f"apt-layer: pushing to {registry.ref('img:v1')}: ")


# --- transfer only what is missing -----------------------------------------------------------------


def test_a_new_version_changes_only_the_layers_of_its_changed_package(store, tmp_path) -> None:
    v1 = write_package_tree(tmp_path / "v1", package_set())
    v2 = write_package_tree(tmp_path / "v2", package_set(change="small07"))
    v3 = write_package_tree(tmp_path / "v3", package_set(change="bigtwo"))
    for name, tree in (("v1", v1), ("v2", v2), ("v3", v3)):
        store.create(str(tree), name)
        distribute.push(store, name, f"oci:{tmp_path / 'layout'}:{name}")
    one, two, three = (layer_holdings(tmp_path / "layout", tag) for tag in ("v1", "v2", "v3"))
    assert set(one) == set(two) == set(three)
    bucket = next(k for k in one if k.startswith(f"packages {chunking.bucket_of('small07') + 1}/"))
    assert "small07" in bucket.split(": ")[1].split()
    assert {k for k in one if one[k] != two[k]} == {bucket, "dpkg database"}
    assert {k for k in one if one[k] != three[k]} == {"package bigtwo", "dpkg database"}
    assert "package bigone" in one and "files of no package" in one and list(one)[-1] == "directories"


def test_listed_paths_are_found_through_the_links_of_the_tree(tmp_path) -> None:
    """Merged /usr: dpkg lists /bin/tool, the tree has it at /usr/bin/tool (/bin is a link to usr/bin)."""
    from aptlayer.composefs.scan import scan

    root = tmp_path / "t"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"x" * 100)
    (root / "usr/sbin").mkdir()
    (root / "usr/sbin/daemon").write_bytes(b"y" * 100)
    (root / "bin").symlink_to("usr/bin")
    (root / "sbin").symlink_to("/usr/sbin")
    (root / "loop").symlink_to("loop")
    tree = scan(str(root)).root
    owners = chunking.owners_from_lists(tree, {"p:amd64": ["/", "/bin", "/bin/tool", "/loop/x"],
                                               "q:amd64": ["/sbin/daemon", "/usr/bin/tool"]})
    assert owners == {b"/bin": "p", b"/usr/bin/tool": "p", b"/usr/sbin/daemon": "q"}


def test_pull_reads_only_new_layers_and_writes_no_object_twice(store, tmp_path) -> None:
    store.create(str(write_package_tree(tmp_path / "v1", package_set())), "v1")
    store.create(str(write_package_tree(tmp_path / "v2", package_set(change="bigone"))), "v2")
    for tag in ("v1", "v2"):
        distribute.push(store, tag, f"oci:{tmp_path / 'layout'}:{tag}")
    other = second_store(tmp_path)
    first = distribute.pull(other, f"oci:{tmp_path / 'layout'}:v1", "v1")
    objects = {p: p.stat() for p in (tmp_path / "b/images/objects").rglob("*") if p.is_file()}
    second = distribute.pull(other, f"oci:{tmp_path / 'layout'}:v2", "v2")
    assert first["layers_read"] == first["layers"]
    assert second["layers_read"] == 2  # bigone's layer and the dpkg database's
    for path, before in objects.items():
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), path
    assert second["digest"] == store.journal.image("v2").digest


def test_registry_pull_fetches_only_layers_it_lacks(store, tmp_path, registry) -> None:
    store.create(str(write_package_tree(tmp_path / "v1", package_set())), "v1")
    store.create(str(write_package_tree(tmp_path / "v2", package_set(change="small03"))), "v2")
    for tag in ("v1", "v2"):
        distribute.push(store, tag, registry.ref(f"img:{tag}"), tls_verify=False)
    other = second_store(tmp_path)
    distribute.pull(other, registry.ref("img:v1"), "v1", tls_verify=False)
    second = distribute.pull(other, registry.ref("img:v2"), "v2", tls_verify=False)
    assert second["fetched_layers"] == 2 and second["layers_read"] == 2
    assert second["digest"] == store.journal.image("v2").digest


# --- interoperability ---------------------------------------------------------------------------------


def _umoci_image_of(tree: Path, layout: Path) -> None:
    umoci = _need("umoci")
    subprocess.run([umoci, "init", "--layout", str(layout)], check=True)
    subprocess.run([umoci, "new", "--image", f"{layout}:t"], check=True)
    bundle = layout.parent / "bundle"
    subprocess.run([umoci, "unpack", "--image", f"{layout}:t", str(bundle)], check=True, capture_output=True)
    shutil.rmtree(bundle / "rootfs")
    subprocess.run(["cp", "-a", str(tree), str(bundle / "rootfs")], check=True)
    subprocess.run([umoci, "repack", "--image", f"{layout}:t", str(bundle)], check=True)


@pytest.mark.root
def test_an_image_umoci_made_of_a_directory_pulls_to_what_image_create_gives(store, tmp_path) -> None:
    """umoci writes whole-second mtimes, so the tree has only those (nanoseconds: see the oci round trip)."""
    tree = rich_tree(tmp_path / "src", nanoseconds=False)
    made = store.create(str(tree), "created")
    _umoci_image_of(tree, tmp_path / "umoci")
    pulled = distribute.pull(store, f"oci:{tmp_path / 'umoci'}:t", "pulled")
    assert pulled["digest"] == made["digest"] and not pulled["verified"]


@pytest.mark.root
def test_umoci_unpacks_a_pushed_image_into_the_same_tree(store, tmp_path) -> None:
    """What a container runtime unpacks from the layers is the tree: image create of it gives the same digest."""
    umoci = _need("umoci")
    made = store.create(str(rich_tree(tmp_path / "src", nanoseconds=True)), "rich")
    distribute.push(store, "rich", f"oci:{tmp_path / 'layout'}:v1")
    subprocess.run([umoci, "unpack", "--image", f"{tmp_path / 'layout'}:v1", str(tmp_path / "bundle")], check=True,
                   capture_output=True)
    assert store.create(str(tmp_path / "bundle/rootfs"), "unpacked")["digest"] == made["digest"]


def _tar(members: list[tuple[str, bytes | None | str]]) -> bytes:
    """A tar stream: None makes a directory, a str a symbolic link to it, bytes a file."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = T0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, data, 0o777
                t.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def hand_layout(path: Path, layers: list[bytes]) -> str:
    """An OCI layout of uncompressed tar ``layers`` written by hand, tagged t; its reference."""
    layout = OciLayout(path)
    layout.init()
    descs = [layout.write_blob(data, "application/vnd.oci.image.layer.v1.tar") for data in layers]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": layout.write_blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
                "layers": descs}
    layout.tag("t", layout.write_blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"))
    return f"oci:{path}:t"


@pytest.mark.root
def test_whiteouts_of_later_layers_remove_what_earlier_ones_made(store, tmp_path) -> None:
    """Three layers: files, a whiteout of one and an opaque directory, one more file."""
    ref = hand_layout(tmp_path / "hand", [
        _tar([("./", None), ("a/", None), ("a/gone", b"x"), ("a/kept", b"y"), ("d/", None), ("d/old", b"z")]),
        _tar([("a/.wh.gone", b""), ("d/.wh..wh..opq", b""), ("d/new", b"n")]),
        _tar([("a/later", b"l")])])
    expected = tmp_path / "expected"
    for path, data in (("a/kept", b"y"), ("a/later", b"l"), ("d/new", b"n")):
        (expected / path).parent.mkdir(parents=True, exist_ok=True)
        (expected / path).write_bytes(data)
    for path in (expected / "a/kept", expected / "a/later", expected / "d/new", expected / "a", expected / "d",
                 expected):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.utime(path, (T0, T0))
    pulled = distribute.pull(store, ref, "hand")
    assert pulled["digest"] == store.create(str(expected), "expected")["digest"]


@pytest.mark.parametrize("layers, message", [
    ([[("../escape", b"x")]], "a path with '..'"),
    ([[("a", "/etc"), ("a/x", b"x")]], "a is not a directory"),
    ([[("b", "/etc")], [("b/x", b"x")]], "b is not a directory"),
])
def test_hostile_layers_are_refused(store, tmp_path, capsys, layers, message) -> None:
    ref = hand_layout(tmp_path / "hostile", [_tar(members) for members in layers])
    store.close()
    assert cli("--root", str(tmp_path / "store"), "pull", ref, "x") == 2
    assert message in capsys.readouterr().err
    assert Store.open(tmp_path / "store").journal.images() == []


def test_pull_into_a_name_taken_is_a_conflict(store, tmp_path, capsys) -> None:
    _pushed_layout(store, tmp_path)
    store.close()
    assert cli("--root", str(tmp_path / "store"), "pull", f"oci:{tmp_path / 'layout'}:v1", "img") == 4


# --- failures ---------------------------------------------------------------------------------------------


def _pushed_layout(store: Store, tmp_path: Path) -> tuple[Path, dict]:
    store.create(str(write_package_tree(tmp_path / "src", package_set())), "img")
    distribute.push(store, "img", f"oci:{tmp_path / 'layout'}:v1")
    _, manifest = OciLayout(tmp_path / "layout").resolve("v1")
    return tmp_path / "layout", manifest


def test_a_blob_that_does_not_match_its_digest_is_refused(store, tmp_path) -> None:
    layout, manifest = _pushed_layout(store, tmp_path)
    blob = OciLayout(layout).blob_path(manifest["layers"][-3]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    other = second_store(tmp_path)
    before = state(other)
    with pytest.raises(errors.IntegrityError, match="does not match its digest"):
        distribute.pull(other, f"oci:{layout}:v1", "img")
    assert state(other) == before and other.journal.image("img") is None


def test_a_manifest_naming_a_missing_blob_is_refused(store, tmp_path) -> None:
    layout, manifest = _pushed_layout(store, tmp_path)
    OciLayout(layout).blob_path(manifest["layers"][-1]["digest"]).unlink()
    other = second_store(tmp_path)
    before = state(other)
    with pytest.raises(errors.IntegrityError, match="is missing"):
        distribute.pull(other, f"oci:{layout}:v1", "img")
    assert state(other) == before and not list((tmp_path / "b/images").glob("*.composefs"))


def test_layers_that_do_not_give_the_annotated_digest_make_no_image(store, tmp_path) -> None:
    layout_dir, manifest = _pushed_layout(store, tmp_path)
    layout = OciLayout(layout_dir)
    manifest["annotations"]["org.apt-layer.composefs.digest"] = "0" * 64
    layout.tag("v1", layout.write_blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"))
    other = second_store(tmp_path)
    with pytest.raises(errors.IntegrityError, match="not the image that was pushed"):
        distribute.pull(other, f"oci:{layout_dir}:v1", "img")
    assert other.journal.image("img") is None and other.journal.images() == []
    assert [e.kind for e in other.journal.events()] == ["tx.begun", "tx.aborted"]


def test_registry_failures_exit_12_and_leave_no_image(store, tmp_path, registry, capsys) -> None:
    """A blob the registry lost, a blob whose bytes changed in its storage, the registry gone."""
    dpkg_layer = {}
    for tag, change in (("lost", "small01"), ("damaged", "small02"), ("gone", "small03")):
        store.create(str(write_package_tree(tmp_path / tag, package_set(change=change))), tag)
        distribute.push(store, tag, registry.ref(f"img-{tag}:v1"), tls_verify=False)
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", registry.ref(f"img-{tag}:v1")],
                             capture_output=True, text=True, check=True).stdout
        # its own (the status file differs); the registry shares the other blobs between repositories
        dpkg_layer[tag] = next(d["digest"] for d in json.loads(raw)["layers"]
                               if d["annotations"]["org.apt-layer.layer"] == "dpkg database")
    store.close()
    root_b = str(tmp_path / "b")
    Store.open(root_b).close()
    other = Store.open(root_b)
    before = state(other)
    other.close()
    registry.blob_data(dpkg_layer["lost"]).unlink()
    assert cli("--root", root_b, "pull", registry.ref("img-lost:v1"), "lost", "--tls-verify=false") == 12
    err = capsys.readouterr().err
    assert err.startswith(f"apt-layer: pulling {registry.ref('img-lost:v1')}: reading blob {dpkg_layer['lost']}")
    assert "404" in err
    data = registry.blob_data(dpkg_layer["damaged"])
    data.write_bytes(b"not the layer" + data.read_bytes()[13:])
    assert cli("--root", root_b, "pull", registry.ref("img-damaged:v1"), "damaged", "--tls-verify=false") == 12
    assert f"Digest did not match, expected {dpkg_layer['damaged']}" in capsys.readouterr().err
    registry.stop()
    assert cli("--root", root_b, "pull", registry.ref("img-gone:v1"), "gone", "--tls-verify=false") == 12
    assert "connection refused" in capsys.readouterr().err
    other = Store.open(root_b)
    assert state(other) == before
    other.close()
    fsck_clean(tmp_path / "b", capsys)


def _pull_process(root: str, ref: str, name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aptlayer", "--root", root, "pull", ref, name, "--tls-verify=false",
                           "--json"], capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})


def test_a_pull_stopped_half_way_resumes_where_it_stopped(store, tmp_path, registry, capsys) -> None:
    """Killed after its second layer: nothing recorded; the next pull fetches nothing and reads the rest."""
    store.create(str(write_package_tree(tmp_path / "src", package_set())), "img")
    pushed = distribute.push(store, "img", registry.ref("img:v1"), tls_verify=False)
    root_b = str(tmp_path / "b")
    killed = _pull_process(root_b, registry.ref("img:v1"), "img", APT_LAYER_FAULT="pull.after-layer:2")
    assert killed.returncode == -signal.SIGKILL
    other = Store.open(root_b)
    assert other.journal.images() == []
    other.close()
    done = _pull_process(root_b, registry.ref("img:v1"), "img")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fetched_layers"] == 0 and result["layers_read"] == pushed["layers"] - 2
    assert result["digest"] == pushed["digest"]
    fsck_clean(tmp_path / "b", capsys)


def test_the_registry_stopped_during_a_pull(store, tmp_path, registry, capsys) -> None:
    """Paused as skopeo is about to fetch, the registry stopped, then let go: exit 12, no image."""
    store.create(str(write_package_tree(tmp_path / "src", package_set())), "img")
    distribute.push(store, "img", registry.ref("img:v1"), tls_verify=False)
    root_b = str(tmp_path / "b")
    Store.open(root_b).close()
    proc = subprocess.Popen([sys.executable, "-m", "aptlayer", "--root", root_b, "pull", registry.ref("img:v1"),
                             "img", "--tls-verify=false"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APT_LAYER_PAUSE": "pull.before-fetch"})
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    registry.stop()
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 12 and "connection refused" in err, err
    other = Store.open(root_b)
    assert other.journal.images() == [] and [e.kind for e in other.journal.events()] == []
    other.close()
    fsck_clean(tmp_path / "b", capsys)


# --- references and the command line ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("oci:/srv/x", transport.Reference("oci:/srv/x", path="/srv/x")),
    ("oci:/srv/x:v1", transport.Reference("oci:/srv/x:v1", path="/srv/x", tag="v1")),
    ("docker://127.0.0.1:5000/a/b:v1", transport.Reference("docker://127.0.0.1:5000/a/b:v1",
                                                           remote="docker://127.0.0.1:5000/a/b:v1")),
])
def test_references(text: str, expected: transport.Reference) -> None:
    assert transport.parse(text) == expected


@pytest.mark.parametrize("text", ["/srv/x", "oci:", "docker://", "docker:///x", "http://host/x"])
def test_bad_references_are_invalid_input(store, text: str) -> None:
    with pytest.raises(errors.InvalidInput):
        transport.parse(text)


def test_pull_of_a_missing_layout_or_tag_is_not_found(store, tmp_path, capsys) -> None:
    assert cli("--root", str(tmp_path / "s"), "pull", f"oci:{tmp_path / 'nowhere'}", "x") == 3
    _pushed_layout(store, tmp_path)
    assert cli("--root", str(tmp_path / "s"), "pull", f"oci:{tmp_path / 'layout'}:v9", "x") == 3
    assert "no image tagged 'v9'" in capsys.readouterr().err


def test_push_of_a_missing_image_is_not_found(store, tmp_path, capsys) -> None:
    assert cli("--root", str(tmp_path / "store"), "push", "nope", f"oci:{tmp_path / 'l'}") == 3
