"""The `carv-attrib` command: a thin Typer app; each verb lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from carv_attrib import __version__
from carv_attrib.cli import (
    cost,
    curate,
    demo,
    encode,
    evaluate,
    featurize,
    finetune,
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

# "\b": click keeps the paragraph's line breaks instead of rewrapping it
EPILOG = """\b
A typical run (README: Usage):
  carv-attrib encode clips.json --videos DIR -m MODEL -r RUN
  carv-attrib finetune RUN -m MODEL -o FT   (optional: adapt MODEL first)
  carv-attrib plan RUN -m MODEL        (optional: a proposal q(σ))
  carv-attrib cost RUN --clips 1000000 (optional: size the whole job)
  carv-attrib featurize RUN -m MODEL   (K draws per encode -> index;
                                        --checkpoint FT after finetune)
  carv-attrib score gen.mp4 -r RUN -p "its prompt" -o out.json
  carv-attrib report out.json -o report.html
Try it first: carv-attrib demo demo-run"""

app = typer.Typer(
    name="carv-attrib",
    help="Which training clips shaped this generated video? Data attribution for Wan2.1 video diffusion "
    "models with CARV variance reduction: encode once, reuse each encode for K draws, project, index, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are printed literally ([vid], [b]…[/b] in examples)
    epilog=EPILOG,
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


# In workflow order: --help lists them so (then the tools)
COMMANDS = {
    "demo": demo.demo,
    "encode": encode.encode,
    "finetune": finetune.finetune,
    "plan": plan.plan,
    "cost": cost.cost,
    "featurize": featurize.featurize,
    "index": featurize.index,
    "generate": generate.generate,
    "score": score.score,
    "report": report.report,
    "curate": curate.curate,
    "evaluate": evaluate.evaluate,
    "status": inspect.status,
    "frames": frames.frames,
    "env": inspect.env,
    "make-model": make.make_model,
    "make-demo-data": make.make_demo_data,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(common_options(_command))


def main() -> None:
    app()


if __name__ == "__main__":  # python -m carv_attrib.cli.app, as the console script
    main()
