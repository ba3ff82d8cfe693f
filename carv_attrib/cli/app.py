"""The `carv-attrib` command: a thin Typer app; each verb lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from carv_attrib import __version__
from carv_attrib.cli import (
    curate,
    demo,
    encode,
    evaluate,
    featurize,
    frames,
    generate,
    inspect,
    make,
    plan,
    report,
    score,
)
from carv_attrib.cli.common import state
from carv_attrib.cli.options import common_options

app = typer.Typer(
    name="carv-attrib",
    help="Which training clips shaped this generated video? Data attribution for Wan2.1 video diffusion "
    "models with CARV variance reduction: encode once, reuse each encode for K draws, project, index, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are printed literally ([vid], [b]…[/b] in examples)
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"carv-attrib {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, show_default=False, help="More logs (-vv: debug, tracebacks)."
        ),
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", show_default=False, help="Only data and errors: no progress.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state.verbose = verbose
    state.quiet = quiet


COMMANDS = {
    "demo": demo.demo,
    "encode": encode.encode,
    "featurize": featurize.featurize,
    "index": featurize.index,
    "generate": generate.generate,
    "score": score.score,
    "curate": curate.curate,
    "report": report.report,
    "plan": plan.plan,
    "evaluate": evaluate.evaluate,
    "frames": frames.frames,
    "status": inspect.status,
    "env": inspect.env,
    "make-model": make.make_model,
    "make-demo-data": make.make_demo_data,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(common_options(_command))


def main() -> None:
    app()
