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

#: command name -> "module:attribute", relative to this package
COMMANDS = {
    "composefs": "compat:composefs",
    "image": "images:image",
    "deploy": "deploy:deploy",
    "rollback": "deploy:rollback",
    "status": "deploy:status",
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
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        return super().get_command(ctx, name)


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

            self._store = Store.open(self.config.root, config=self.config, create=create)
        return self._store


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(path_type=str), metavar="DIR",
              help="Store root (default /var/lib/apt-layer; env APT_LAYER_ROOT).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Configuration file (default /etc/apt-layer/config.toml).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
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
    if root is not None and not str(root):
        raise click.BadParameter("must not be empty", param_hint="'--root'")
    ctx.obj = Settings(Path(root) if root is not None else None, config_path, quiet)


def main(args: list[str]) -> int:
    """Run a command line: one-line errors with distinct exit codes, no tracebacks."""
    try:
        rc = cli.main(args=args, prog_name="apt-layer", standalone_mode=False)
    except AptLayerError as e:
        click.echo(f"apt-layer: {e}", err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("apt-layer: aborted", err=True)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours: say so in one line, unless debugging
        if os.environ.get("APT_LAYER_DEBUG"):
            raise
        click.echo(f"apt-layer: internal error: {type(e).__name__}: {e} "
                   "(set APT_LAYER_DEBUG=1 for a traceback)", err=True)
        return 70
    return rc if isinstance(rc, int) else 0

