"""Shared CLI plumbing: logging set-up and turning BraError into a one-line message with exit code 2."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from bra.errors import BraError
from bra.vocab import NULL_SAE

logger = logging.getLogger("bra")


def setup_logging(verbose: int) -> None:
    """INFO by default, DEBUG with -v; quiet third-party loggers."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    for noisy in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock", "fsspec",
                  "numcodecs"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class StorePathType(click.ParamType):
    """A store location: a local path (a ``Path``, as ``click.Path`` gives) or a URL such as
    ``s3://bucket/x.zarr``, ``memory://x.zarr`` or ``file:///abs/x.zarr`` (kept as a string: pathlib would
    collapse its ``//``)."""

    name = "path_or_url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        text = str(value)
        return text if "://" in text else Path(text)


STORE_PATH = StorePathType()


class SAESourceType(click.ParamType):
    """An SAE to read: a path (a ``Path``), or the word ``none`` (kept as the string `bra.vocab.NULL_SAE`:
    no SAE, the raw residual dimensions; write ``./none`` for a folder of that name)."""

    name = "path"  # as click.Path names it; the help text says `none` is accepted too

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        return NULL_SAE if str(value) == NULL_SAE else Path(str(value))


SAE_SOURCE = SAESourceType()
SAE_SOURCE_HELP = ("SAE: a fit run dir, a SAELens folder (architecture topk, jumprelu or standard), a Gemma "
                   "Scope params.npz or its folder (layer from a layer_<N> folder in the path, else "
                   "--layer or the store's), a seed .pt, or 'none' (no SAE: the raw residual dimensions "
                   "are the latents).")


def run_cli(group: click.Group, argv: list[str] | None = None) -> int:
    """Invoke a click group; BraError and OS errors become ``error: <one line>`` and exit code 2."""
    try:
        group.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:  # bad flags or values: one line too, with where to find help
        usage = isinstance(exc, click.UsageError) and exc.ctx is not None
        hint = f" (see `{exc.ctx.command_path} --help`)" if usage and exc.ctx else ""
        click.echo(f"error: {(exc.format_message().splitlines() or [''])[0]}{hint}", err=True)
        return exc.exit_code
    except BraError as exc:
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except OSError as exc:
        click.echo(f"error: {_os_error_line(exc)}", err=True)
        return 2
    return 0


NPROC_OPTION = click.option(
    "--nproc", type=click.IntRange(min=1), default=1, show_default=True,
    help="Processes on this machine: re-runs this command under torchrun --standalone --nproc-per-node N "
         "(for several machines run torchrun yourself, as README 'Scaling out' shows).")


def relaunch_under_torchrun(ctx: click.Context, module: str, nproc: int) -> None:
    """With ``nproc`` > 1, run this same command in ``nproc`` processes under torchrun and exit with its
    code; with 1, return (the caller goes on in this process)."""
    if nproc <= 1:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError("--nproc cannot be used inside torchrun (it started the processes)")
    from bra.dist import launch

    sys.exit(launch(module, command_argv(ctx, skip=("nproc",)), nproc))


def command_argv(ctx: click.Context, skip: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives a subcommand the parameters ``ctx`` parsed (the group's ``-v`` count
    included), so a relaunched process parses exactly what this one did."""
    verbose = int(ctx.find_root().params.get("verbose") or 0)
    argv = ["-v"] * verbose + [str(ctx.info_name)]
    for param in ctx.command.params:
        if param.name in skip or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            argv.append(str(value))
            continue
        if not isinstance(param, click.Option) or value is None:
            continue
        name = param.opts[0]
        if param.is_flag:
            if value:
                argv.append(name)
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                argv += [name, str(item)]
        else:
            argv += [name, str(value)]
    return argv


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError; "File exists"/"Not a directory" on a path under a regular file says so."""
    name = exc.filename
    if exc.errno == errno.ENOSPC:
        return f"disk full (no space left on device) writing {name or 'output'}; free space and re-run"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR) and name is not None:
        blocker = next((q for q in [Path(name), *Path(name).parents] if q.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = "" if blocker == Path(name) else f"cannot write {name}: "
            return f"{where}{blocker} is a file, not a directory"
    return f"{exc.strerror or exc}: {name or ''}".rstrip(": ")
