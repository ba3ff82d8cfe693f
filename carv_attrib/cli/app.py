"""The `carv-attrib` command: a thin Typer app; each verb lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from carv_attrib import __version__
from carv_attrib.cli import demo, encode, evaluate, featurize, frames, inspect, make, plan, score
from carv_attrib.cli.common import state

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
        int, typer.Option("--verbose", "-v", count=True, help="More logs (-vv: debug, tracebacks).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors; no progress.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state.verbose = verbose
    state.quiet = quiet


app.command("demo")(demo.demo)
app.command("encode")(encode.encode)
app.command("featurize")(featurize.featurize)
app.command("index")(featurize.index)
app.command("score")(score.score)
app.command("plan")(plan.plan)
app.command("evaluate")(evaluate.evaluate)
app.command("frames")(frames.frames)
app.command("status")(inspect.status)
app.command("env")(inspect.env)
app.command("make-model")(make.make_model)
app.command("make-demo-data")(make.make_demo_data)


def main() -> None:
    app()
