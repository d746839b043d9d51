"""Shared CLI plumbing: logging set-up and turning BraError into a one-line message with exit code 2."""

from __future__ import annotations

import logging
import os
import sys

import click

from bra.errors import BraError

logger = logging.getLogger("bra")


def setup_logging(verbose: int) -> None:
    """INFO by default, DEBUG with -v; quiet third-party loggers."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "fsspec", "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(group: click.Group, argv: list[str] | None = None) -> int:
    """Invoke a click group; BraError and OS errors become ``error: <one line>`` and exit code 2."""
    try:
        group.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except BraError as exc:
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        return 2
    return 0

