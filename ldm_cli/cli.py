"""The `ldm` command line: the Typer app, its subcommands (each a thin function in `commands/`), and `main`.

Every user-facing failure is an `LdmError`, printed as one `error:` line with its exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click
import typer

from ldm_cli import __version__
from ldm_cli.commands import convert, data, evaluate, sample, train
from ldm_cli.errors import LdmError, one_line

app = typer.Typer(
    help="Train and sample latent diffusion models: images → autoencoder → latents → U-Net → samples.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Dataset tools: the built-in shapes dataset, and checking a folder.", no_args_is_help=True)

# in the order `ldm --help` lists them: the pipeline's own order, then the tools
for name, command in (
    ("train-vae", train.train_vae),
    ("eval-vae", evaluate.eval_vae),
    ("quickstart", train.quickstart),
    ("eval-samples", evaluate.eval_samples),
    ("encode", train.encode),
    ("train-diffusion", train.train_diffusion),
    ("train-lora", train.train_lora_command),
    ("sample", sample.sample),
    ("img2img", sample.img2img),
    ("inpaint", sample.inpaint_command),
    ("convert", convert.convert_command),
):
    app.command(name)(command)
app.add_typer(data_app, name="data")
data_app.command("shapes")(data.data_shapes)
data_app.command("check")(data.data_check)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """ldm: latent diffusion, end to end."""


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except LdmError as error:
        if debug:
            raise
        typer.echo(f"error: {one_line(error)}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
