"""Configuration: ``/etc/apt-layer/config.toml``, overridable by ``--config``.

Precedence, strongest first: command-line options, environment
(``APT_LAYER_ROOT``), the configuration file, built-in defaults. A bad value
is an error that names the key; unknown keys are errors too, so a typo never
silently does nothing.

Example file::

    root = "/var/lib/apt-layer"
    backend = "auto"            # auto | python | upstream

    [deploy]
    mount = "/run/apt-layer/current"   # where `recover --boot` mounts the deployment

    [gc]
    grace_seconds = 0           # spare unreferenced objects younger than this

    [apt]
    dir = "/etc/apt"            # whose sources and trusted.gpg.d/ layering uses
    lists_max_age_seconds = 600 # package lists this fresh are used without apt-get update
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput, NotFound

DEFAULT_CONFIG = Path("/etc/apt-layer/config.toml")
DEFAULT_ROOT = Path("/var/lib/apt-layer")
DEFAULT_APT_DIR = Path("/etc/apt")
DEFAULT_LISTS_MAX_AGE = 600
BACKENDS = ("auto", "python", "upstream")


@dataclass(frozen=True)
class Config:
    root: Path = DEFAULT_ROOT
    backend: str = "auto"
    deploy_mount: Path | None = None
    gc_grace_seconds: int = 0
    #: the apt configuration directory whose sources and trusted keys layering uses
    apt_dir: Path = DEFAULT_APT_DIR
    #: seconds during which package lists fetched for the same sources are used without an update
    apt_lists_max_age: int = DEFAULT_LISTS_MAX_AGE
    source: Path | None = None


def _bad(path: Path, key: str, why: str) -> InvalidInput:
    return InvalidInput(f"{path}: {key}: {why}")


def _string(path: Path, key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(path, key, "must be a non-empty string")
    return value


def parse(path: Path, data: dict) -> dict:
    """The settings a configuration file's TOML ``data`` makes (only the keys it sets); errors name ``path``."""
    out: dict = {}
    known = {"root", "backend", "deploy", "gc", "apt"}
    for key in data:
        if key not in known:
            raise _bad(path, key, "unknown key")
    if "root" in data:
        out["root"] = Path(_string(path, "root", data["root"]))
        if not out["root"].is_absolute():
            raise _bad(path, "root", "must be an absolute path")
    if "backend" in data:
        backend = _string(path, "backend", data["backend"])
        if backend not in BACKENDS:
            raise _bad(path, "backend", f"must be one of {', '.join(BACKENDS)}")
        out["backend"] = backend
    deploy = data.get("deploy", {})
    if not isinstance(deploy, dict) or set(deploy) - {"mount"}:
        raise _bad(path, "deploy", "a table with the single key 'mount'")
    if "mount" in deploy:
        out["deploy_mount"] = _absolute(path, "deploy.mount", deploy["mount"])
    gc = data.get("gc", {})
    if not isinstance(gc, dict) or set(gc) - {"grace_seconds"}:
        raise _bad(path, "gc", "a table with the single key 'grace_seconds'")
    if "grace_seconds" in gc:
        out["gc_grace_seconds"] = _whole(path, "gc.grace_seconds", gc["grace_seconds"])
    out.update(_parse_apt(path, data.get("apt", {})))
    return out


def _parse_apt(path: Path, apt: object) -> dict:
    """The ``[apt]`` table: ``dir`` and ``lists_max_age_seconds``."""
    out: dict = {}
    if not isinstance(apt, dict) or set(apt) - {"dir", "lists_max_age_seconds"}:
        raise _bad(path, "apt", "a table with the keys 'dir' and 'lists_max_age_seconds'")
    if "dir" in apt:
        out["apt_dir"] = _absolute(path, "apt.dir", apt["dir"])
    if "lists_max_age_seconds" in apt:
        out["apt_lists_max_age"] = _whole(path, "apt.lists_max_age_seconds", apt["lists_max_age_seconds"])
    return out


def _absolute(path: Path, key: str, value: object) -> Path:
    """``value`` as an absolute path, or the error naming ``key``."""
    out = Path(_string(path, key, value))
    if not out.is_absolute():
        raise _bad(path, key, "must be an absolute path")
    return out


def _whole(path: Path, key: str, value: object) -> int:
    """``value`` as a whole number >= 0 (not a boolean), or the error naming ``key``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(path, key, "must be a whole number >= 0")
    return value


def load(path: Path | None = None, root: str | os.PathLike | None = None) -> Config:
    """The effective configuration. ``path`` given explicitly must exist."""
    values: dict = {}
    cfg_path = path or DEFAULT_CONFIG
    try:
        raw = cfg_path.read_bytes()
    except FileNotFoundError:
        if path is not None:
            raise NotFound(f"{path}: configuration file not found") from None
        raw = None
    except OSError as e:
        raise InvalidInput(f"{cfg_path}: {e.strerror}") from None
    if raw is not None:
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InvalidInput(f"{cfg_path}: not valid TOML: {e}") from None
        values = parse(cfg_path, data)
        values["source"] = cfg_path
    env_root = os.environ.get("APT_LAYER_ROOT")
    if env_root is not None:
        if not env_root:
            raise InvalidInput("APT_LAYER_ROOT is set but empty: unset it or name the store's root")
        values["root"] = Path(env_root)
    if root is not None:
        values["root"] = Path(root)
    return Config(**values)
