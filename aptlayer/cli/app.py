"""The ``apt-layer`` command line under click: parse, call the Store, print.

Commands are imported only when used, so that ``apt-layer recover`` at boot
does not pay for modules it never runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import AptLayerError
from .options import CONFIG_HELP, QUIET_HELP, ROOT_HELP, adopt, check_root, error_json, json_requested

#: command name -> "module:attribute", relative to this package
COMMANDS = {
    "composefs": "compat:composefs",
    "image": "images:image",
    "deploy": "deploy:deploy",
    "rollback": "deploy:rollback",
    "status": "deploy:status",
    "cleanup": "deploy:cleanup",
    "tx": "tx:tx",
    "gc": "maint:gc",
    "fsck": "maint:fsck",
    "journal": "maint:journal",
    "log": "maint:log",
    "audit": "maint:audit",
    "recover": "recover:recover",
    "watch": "watch:watch",
    "base": "base:base",
    "install": "layer:install",
    "uninstall": "layer:uninstall",
    "override": "layer:override",
    "upgrade": "layer:upgrade",
    "rebase": "layer:rebase",
    "packages": "layer:packages",
    "diff": "layer:diff",
    "push": "oci:push",
    "pull": "oci:pull",
    "boot": "boot:boot",
    "etc": "boot:etc",
    "check": "boot:check",
}


class LazyGroup(click.Group):
    """A group whose subcommands live in modules imported on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """The command ``name``, given the global options (see :func:`.options.adopt`)."""
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return adopt(getattr(importlib.import_module(f"{__package__}.{module}"), attr))
        command = super().get_command(ctx, name)
        return adopt(command) if command is not None else None


class Settings:
    """What the global options say; the store is opened on first use."""

    def __init__(self, root: Path | None, config: Path | None, quiet: bool):
        self.root_option = root
        self.config_path = config
        self.quiet = quiet
        self._config = None
        self._store = None

    @property
    def config(self):
        if self._config is None:
            from .. import config

            self._config = config.load(self.config_path, self.root_option)
        return self._config

    def store(self, create: bool = False):
        """The Store at the configured root, opened on demand.

        Only the commands that make sense on an empty store (``image
        create``, ``tx begin``, ``recover``) pass ``create``: any other, given
        a mistyped root, says there is no store there instead of making one.
        """
        if self._store is None:
            from ..store import Store
            from .privilege import require_root, writes

            ctx = click.get_current_context()
            write = writes(ctx)
            if write:
                require_root(ctx)
            self._store = Store.open(self.config.root, config=self.config, create=create, write=write)
        return self._store


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(path_type=str), metavar="DIR", help=ROOT_HELP)
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE", help=CONFIG_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.version_option(__version__, prog_name="apt-layer")
@click.pass_context
def cli(ctx: click.Context, root: str | None, config_path: Path | None, quiet: bool) -> None:
    """Atomic, deduplicated ComposeFS images for Debian and Ubuntu.

    apt-layer builds ComposeFS images from directory trees into a
    content-addressed object store, mounts, deploys and rolls them back, and
    collects objects no image needs. Every operation is an event in an
    append-only SQLite journal (ROOT/journal.db) that you can audit with SQL.

    \b
    Example:
      apt-layer image create /srv/rootfs base
      apt-layer deploy base
      apt-layer status
    """
    check_root(root)
    ctx.obj = Settings(Path(root) if root is not None else None, config_path, quiet)


def main(args: list[str]) -> int:
    """Run a command line: one-line errors with distinct exit codes, no tracebacks.

    This is the one place where an error becomes an exit code. Under
    ``--json`` the error is also printed on stdout as ``{"error": MESSAGE,
    "exit": CODE}`` (docs/json.md), so a script reads one JSON document
    whatever happened.
    """
    as_json = json_requested(args)

    def fail(message: str, code: int, usage: click.ClickException | None = None) -> int:
        if usage is not None:
            usage.show()
        else:
            click.echo(f"apt-layer: {message}", err=True)
        if as_json:
            click.echo(error_json(message, code))
        return code

    try:
        rc = cli.main(args=args, prog_name="apt-layer", standalone_mode=False)
    except AptLayerError as e:
        return fail(str(e), e.exit_code)
    except click.ClickException as e:
        return fail(e.format_message(), e.exit_code, usage=e)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return fail("interrupted", 130)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug of ours: say so in one line, unless debugging
        if os.environ.get("APT_LAYER_DEBUG"):
            raise
        return fail(f"internal error: {type(e).__name__}: {e} (set APT_LAYER_DEBUG=1 for a traceback)", 70)
    return rc if isinstance(rc, int) else 0

