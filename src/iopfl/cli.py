"""The ``iopfl`` command line (typer). Mistakes a user can make end in one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler

from iopfl.errors import UserError
from iopfl.results import GLOBAL, PERSONALIZED

app = typer.Typer(
    help="Inside-outside personalized federated learning (IOP-FL) for medical image segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "-o", "--override", metavar="KEY=VALUE", help="Override a config key, e.g. -o fl.rounds=3 (repeatable)."
    ),
]


def _print_version(asked: bool) -> None:
    if asked:
        import platform

        import torch

        from iopfl import __version__

        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        print(f"iopfl {__version__} (Python {platform.python_version()}, torch {torch.__version__}, {cuda})")
        raise typer.Exit()


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit."),
    ] = False,
):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    sites: Annotated[int, typer.Option(min=2, help="Number of sites.")] = 6,
    cases: Annotated[int, typer.Option(min=3, help="Cases (volumes) per site.")] = 8,
    size: Annotated[int, typer.Option(min=16, help="In-plane size in pixels.")] = 64,
    slices: Annotated[int, typer.Option(min=3, help="Slices per volume.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a synthetic multi-site dataset (SAML NIfTI layout)."""
    from iopfl.data.synthetic import generate_synthetic

    path = generate_synthetic(out, sites=sites, cases=cases, size=size, slices=slices, seed=seed)
    console.print(f"wrote {sites} sites × {cases} cases to {path}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    override: Overrides = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<method>).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")
    ] = False,
):
    """Run one federated training run."""
    from iopfl.commands.train import train_run
    from iopfl.config import load_config

    cfg = load_config(config, override or [])
    if resume and out is None:
        raise UserError("--resume needs --out RUN (the run directory to continue)")
    run_dir = out or Path("runs") / cfg.fl.method
    if resume and (run_dir / "config.yaml").exists():
        cfg = load_config(run_dir / "config.yaml", override or [])
    results = train_run(cfg, run_dir, resume=resume, console=console)
    _print_results(results, run_dir)


@app.command()
def inspect(
    config: Annotated[Path, typer.Argument(help="YAML config whose data to check.")], override: Overrides = None
):
    """Load and check a dataset (every file is read): cases per site and split, foreground share."""
    from rich.table import Table

    from iopfl.config import load_config
    from iopfl.data import load_dataset

    cfg = load_config(config, override or [])
    spec = load_dataset(cfg.data)
    table = Table(title=f"{spec.name}: {spec.in_channels} input channels, {spec.num_classes} classes")
    for col in ("site", "train", "val", "test", "slices", "foreground %"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for name, site in spec.sites.items():
        cases = site.all_cases()
        pixels = sum(c.mask.size for c in cases if c.mask is not None)
        fg = sum(int((c.mask > 0).sum()) for c in cases if c.mask is not None)
        table.add_row(
            name,
            str(len(site.train)),
            str(len(site.val)),
            str(len(site.test)),
            str(sum(c.num_slices for c in cases)),
            f"{100 * fg / max(pixels, 1):.2f}",
        )
    Console().print(table)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's runs.")] = Path("runs/demo"),
    override: Overrides = None,
):
    """Synthetic sites → FedAvg and IOP-FL inside → per-site comparison table."""
    from iopfl.commands.train import run_demo

    run_demo(out, override or [], console=console)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option("--out", help="Markdown file (CSV and PNG written beside it).")] = Path(
        "report.md"
    ),
):
    """Comparison tables across runs and methods (mean ± std over seeds)."""
    from iopfl.report.compare import compare_runs

    compare_runs(list(runs), out)
    console.print(out.read_text())
    console.print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_suffix('.png')}")


flower = typer.Typer(help="The Flower app for deployments across machines (docs/deployment.md).", no_args_is_help=True)
app.add_typer(flower, name="flower")

CopyTo = Annotated[
    Path | None,
    typer.Argument(
        help="Copy the files into this folder (new, or without files of "
        "the same names); without it, print where they are."
    ),
]


@flower.command("app")
def flower_app(dest: CopyTo = None):
    """The Flower app folder that `flwr run` takes: print its path in the installed package, or copy it."""
    from iopfl.engine.flower import app_folder

    print(_folder_or_copy(app_folder(), dest))


@app.command()
def configs(dest: CopyTo = None):
    """The YAML configs that ship with iopfl (`configs/`): print their folder, or copy them."""
    from iopfl import CONFIG_DIR

    print(_folder_or_copy(CONFIG_DIR, dest))


def _folder_or_copy(folder: Path, dest: Path | None) -> Path:
    """``folder`` itself, or ``dest`` after copying ``folder``'s files into it; an existing file is
    never overwritten (refused before anything is written)."""
    if dest is None:
        return folder
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file, not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    taken = [dest / p.name for p in files if (dest / p.name).exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists; not overwriting it")
    from iopfl.fileio import atomic_write_bytes

    for path in files:
        atomic_write_bytes(dest / path.name, path.read_bytes())
    return dest


@app.command()
def adapt(
    run: Annotated[Path, typer.Argument(help="A finished training run directory.")],
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="Held-out site of the run's dataset, a folder of images / NIfTI volumes, "
            "or a site folder (images/ + masks/, scored).",
        ),
    ],
    method: Annotated[str, typer.Option("--method", help="iopfl | tent | bn | ensemble | global | all.")] = "iopfl",
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN/outside/<target>).")] = None,
    override: Overrides = None,
):
    """Outside personalization: adapt to an unseen site at test time; write masks (+ metrics with labels).

    Test-time settings are today's defaults plus -o adapt.KEY=VALUE, not the run's own adapt section.
    Adaptive methods (tent, iopfl) run under a label-free safeguard; a warning says when it fell back."""
    from iopfl.commands.adapt import run_adapt

    out_dir = out or run / "outside" / Path(target).name
    results = run_adapt(run, target, method, out_dir, override or [])
    if results.models:
        from iopfl.report.tables import models_table

        print(models_table(results.models))
    from iopfl.commands.adapt import fallback_warning

    warning = fallback_warning(results.safeguard)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]", highlight=False)
    console.print(f"predictions written to {out_dir}")


# a Flower site's own copy of its personalised model (predict and export read it the same way)
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="On a Flower site's own machine: its node config state-dir, for a personalised model it did not publish.",
    ),
]


@app.command()
def predict(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="[RUN] INPUTS...",
            help="A finished training run directory (not with --model-file), then "
            "image files, NIfTI volumes, folders of them, or site folders (images/ + masks/); masks come out "
            "at each input's size.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the masks.")],
    site: Annotated[str | None, typer.Option("--site", help="Whose personalized model to use.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help=f"{PERSONALIZED} | {GLOBAL} (default {PERSONALIZED}).")
    ] = None,
    state_dir: StateDirOption = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="cpu | cuda | cuda:N (default: the run's runtime.device; with --model-file the CPU)."
        ),
    ] = None,
    model_file: Annotated[
        Path | None,
        typer.Option(
            "--model-file", help="A file from `iopfl export` (ONNX or TorchScript) instead of RUN, --site and --model."
        ),
    ] = None,
):
    """Segment new images or volumes with a site's val-selected model, or with an exported model file."""
    if model_file is not None:
        from iopfl.commands.export import predict_with_file

        if site is not None or model is not None or state_dir is not None:
            raise UserError("--model-file is one exported model: it takes no RUN, --site, --model or --state-dir")
        written = predict_with_file(model_file, paths, out, device)
    else:
        from iopfl.commands.predict import run_predict

        if site is None or len(paths) < 2:
            raise UserError("predict needs RUN, --site SITE and at least one input (or --model-file FILE and inputs)")
        written = run_predict(paths[0], site, paths[1:], out, model or PERSONALIZED, state_dir, device)
    console.print(f"wrote {len(written)} masks to {out}")


@app.command(name="export")
def export_model(
    run: Annotated[Path, typer.Argument(help="A finished training run directory.")],
    site: Annotated[str, typer.Option("--site", help="Whose model to export.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write.")],
    model: Annotated[str, typer.Option("--model", help=f"{PERSONALIZED} | {GLOBAL}.")] = PERSONALIZED,
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript.")] = "onnx",
    state_dir: StateDirOption = None,
):
    """Export a site's val-selected model to ONNX or TorchScript, with its input preprocessing and class
    names in the file's metadata (docs/EXPORT.md); `iopfl predict --model-file` runs it."""
    from iopfl.commands.export import export_run_model

    meta = export_run_model(run, site, model, fmt, out, state_dir)
    console.print(
        f"wrote {out}: {meta['model']} model of {meta['site']}, input [batch, {meta['input']['channels']}, "
        f"height, width] (trained at {meta['input']['image_size']}²), classes "
        f"{', '.join(meta['class_names'])}",
        markup=False,
        highlight=False,
    )


def _print_results(results: dict, run_dir: Path) -> None:
    from iopfl.commands.terminal import results_table

    Console().print(results_table(results))
    console.print(f"run directory: {run_dir}")


def main() -> None:
    """Entry point: user errors → one line on stderr, exit 2; no traceback."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; `iopfl train ... --resume` continues from the last checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    main()
