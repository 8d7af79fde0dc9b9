"""The `autoseg` command line: a thin typer layer over `autoseg.api`.

Every command resolves DATASET the same way (numeric id, DatasetXXX_Name under the raw root,
or a path), prints user mistakes as two lines (what is wrong, how to fix it) with exit code 2,
and shows the traceback only with --debug.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from autoseg import __version__
from autoseg.errors import AutosegError, SettingsError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="autoseg",
    help=(
        "Self-configuring U-Net segmentation for medical volumes.\n\n"
        "Typical flow: autoseg example-dataset -> autoseg check 900 -> autoseg plan 900 -> "
        "autoseg preprocess 900 -> autoseg train 900 3d_fullres 0 -> autoseg predict -i scans -o out -d 900 "
        "-> autoseg evaluate out labels.\n"
        "DATASET is a numeric id (900), a folder name under $AUTOSEG_RAW (Dataset900_Example) "
        "or a path to a raw dataset folder. Paths: AUTOSEG_RAW / AUTOSEG_PREPROCESSED / "
        "AUTOSEG_RESULTS (nnU-Net's nnUNet_* variables work too); default ./autoseg_data/."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DatasetArg = Annotated[str, typer.Argument(help="Dataset id (4), name (Dataset004_Hippocampus) or folder path.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=1, help="Parallel worker processes.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute the fingerprint even if cached.")]
PlansOpt = Annotated[str | None, typer.Option("--plans", "-p", help=(
    "Plans identifier: the network of `autoseg plan --network NAME` (e.g. resenc). Default: the default "
    "plans (plans.json, the U-Net)."))]
PartOpt = Annotated[str | None, typer.Option("--part", metavar="I/N", help=(
    "Only part I of N of the cases (every N-th from the I-th; 1 <= I <= N): N processes or SLURM array tasks "
    "share the work, each case once."))]
BudgetOpt = Annotated[float, typer.Option("--gpu-memory-gb", min=1.0, help="GPU memory budget for training, GiB.")]


def _console(stderr: bool = False):
    """A console that prints text as it is: paths and messages may hold brackets (scan[1].nii.gz,
    "autoseg[openvino]") that rich markup would eat. Styled lines pass markup=True and escape() their values."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False)


def guarded(func: F) -> F:
    """Turn AutosegError into a two-line message and exit code 2 (traceback with --debug).

    Commands take `ctx: typer.Context` as a keyword so the wrapper can read --debug.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                _refuse_values_after_switches(kwargs.get("ctx"))
                return func(*args, **kwargs)
            except OSError as err:  # disk full, read-only, permissions: a sentence and a fix, not a traceback
                raise os_error(err) from err
        except AutosegError as err:
            context = kwargs.get("ctx")
            if isinstance(context, typer.Context) and (context.find_root().obj or {}).get("debug"):
                raise
            where = f"{err.path}: " if err.path else ""
            console = _console(stderr=True)
            console.print(f"[bold red]error:[/] {escape(where + err.message)}", soft_wrap=True, markup=True)
            if err.hint:
                console.print(f"[bold]fix:[/] {escape(err.hint)}", soft_wrap=True, markup=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


#: Words that, as a positional argument, most likely followed a switch (`--overwrite true`).
_SWITCH_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _refuse_values_after_switches(context: Any) -> None:
    """`--overwrite true` parses as the switch plus a positional "true" (a folder named true, a dataset named
    true): refuse it with the fix instead of writing into ./true. (typer vendors its own click: duck typing.)"""
    if not hasattr(context, "params") or not hasattr(context, "command"):
        return
    for param in context.command.params:
        value = context.params.get(param.name or "")
        if getattr(param, "param_type_name", "") == "argument" and isinstance(value, (str, Path)) and \
                str(value).strip().lower() in _SWITCH_WORDS:
            name = (param.name or "an argument").upper()
            raise SettingsError(f"{str(value)!r} given as {name}: switches take no value",
                                hint="write the switch alone (--overwrite, --tta) and --no-SWITCH to turn one off "
                                     "(--no-tta); a folder really named like that: give its absolute path")


#: errno -> what to do about it (the message itself is the system's).
_OS_HINTS = {
    errno.ENOSPC: "free disk space, or point AUTOSEG_RESULTS / AUTOSEG_PREPROCESSED / -o at a disk with room",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "you may not write or read there: check the folder's permissions, or use another folder",
    errno.EPERM: "the operation is not permitted there: check the folder's permissions, or use another folder",
    errno.ENOTDIR: "a path expected to be a folder is a file: check the paths and AUTOSEG_* variables "
                   "(`autoseg env` shows them)",
    errno.EISDIR: "a path expected to be a file is a folder: check the file names you passed",
}


def os_error(err: OSError) -> AutosegError:
    """An OSError as autoseg's two-line error: the system's reason, the file, and what to do."""
    path = err.filename if isinstance(err.filename, str) else None
    return AutosegError(err.strerror or str(err), path=path,
                        hint=_OS_HINTS.get(err.errno or 0, "check the path, the disk and the permissions"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"autoseg {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Options for every command."""
    from autoseg.log import configure

    configure(verbosity=1 if verbose else 0)
    ctx.obj = {"debug": debug}


@app.command("example-dataset")
@guarded
def example_dataset_command(
    ctx: typer.Context,
    out: Annotated[Path | None, typer.Argument(help="Folder to create; default <raw root>/Dataset900_Example.")] = None,
    cases: Annotated[int, typer.Option("--cases", min=2, help="Number of labelled cases.")] = 10,
    modality: Annotated[str, typer.Option("--modality", help="ct or mri.")] = "ct",
    anisotropic: Annotated[bool, typer.Option("--anisotropic", help="Thick slices (~0.7x0.7x4.5 mm).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same dataset.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Approximate edge length in voxels.")] = 48,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset there.")] = False,
) -> None:
    """Write a small synthetic labelled dataset (nnU-Net raw layout): autoseg's built-in example."""
    from autoseg import api
    from autoseg.paths import data_root

    target = out if out is not None else data_root("raw") / "Dataset900_Example"
    api.example_dataset(target, n_cases=cases, modality=modality, anisotropic=anisotropic,
                        seed=seed, size=size, overwrite=overwrite)


@app.command("check")
@guarded
def check_command(ctx: typer.Context, dataset: DatasetArg, workers: WorkersOpt = 2) -> None:
    """Check a raw dataset and report every problem at once (file, fault, fix). Never modifies files."""
    from autoseg import api
    from autoseg.paths import resolve_dataset

    location = resolve_dataset(dataset)
    problems = api.check(location.raw, workers=workers)
    console = _console()
    for problem in problems:
        colour = "red" if problem.severity == "error" else "yellow"
        console.print(f"[{colour}]{problem.severity}[/] {escape(f'{problem.path}: {problem.fault}')}\n"
                      f"      fix: {escape(problem.fix)}", soft_wrap=True, markup=True)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if errors:
        console.print(f"[bold red]{escape(location.name)}: {errors} error(s), {warnings} warning(s)[/]", markup=True)
        raise typer.Exit(1)
    n_cases = len(api.load(location.raw).cases)
    console.print(f"[bold green]{escape(location.name)}: OK[/] - {n_cases} cases, {warnings} warning(s)", markup=True)


@app.command("fingerprint")
@guarded
def fingerprint_command(
    ctx: typer.Context, dataset: DatasetArg, workers: WorkersOpt = 2, force: ForceOpt = False
) -> None:
    """Extract (or reuse) the dataset fingerprint: spacings, shapes, foreground intensities."""
    from autoseg import api
    from autoseg.cli_tables import fingerprint_table

    result = api.fingerprint(dataset, workers=workers, force=force)
    _console().print(fingerprint_table(result))


@app.command("plan")
@guarded
def plan_command(
    ctx: typer.Context,
    dataset: DatasetArg,
    gpu_memory_gb: BudgetOpt = 8.0,
    workers: WorkersOpt = 2,
    force: ForceOpt = False,
    network: Annotated[str, typer.Option("--network", help=(
        "Network family to plan (`list` prints them). Another family than unet writes plans__NAME.json, "
        "selected later with -p NAME."))] = "unet",
    upsampling: Annotated[str | None, typer.Option("--upsampling", help=(
        "Decoder upsampling: transposed_conv (default), interp_conv or pixel_shuffle."))] = None,
) -> None:
    """Plan the 2d / 3d_fullres (/ 3d_lowres / 3d_cascade_fullres) configurations and write plans.json
    (plans__IDENTIFIER.json for another network family or upsampling)."""
    from autoseg import api
    from autoseg.cli_tables import plans_table

    if network.lower() == "list":
        _print_networks(dataset, gpu_memory_gb, workers)
        return
    plans = api.plan(dataset, memory_budget_gb=gpu_memory_gb, workers=workers, force=force, network=network,
                     upsampling=upsampling)
    console = _console()
    table, notes = plans_table(plans)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True, markup=True)


@app.command("networks")
@guarded
def networks_command(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Argument(help=(
        "Dataset to size each family for (parameters, receptive field, memory); optional."))] = None,
    gpu_memory_gb: BudgetOpt = 8.0,
    workers: WorkersOpt = 2,
) -> None:
    """List the network families `autoseg plan --network NAME` accepts, one line each (docs/networks.md)."""
    _print_networks(dataset, gpu_memory_gb, workers)


def _print_networks(dataset: str | None, gpu_memory_gb: float, workers: int) -> None:
    from autoseg import api
    from autoseg.cli_tables import network_lines

    for line in network_lines(api.networks(dataset, memory_budget_gb=gpu_memory_gb, workers=workers)):
        _console().print(line, soft_wrap=True)


@app.command("preprocess", context_settings={"allow_extra_args": True})
@guarded
def preprocess_command(
    ctx: typer.Context,
    dataset: DatasetArg,
    configurations: Annotated[list[str] | None, typer.Option(
        "--configuration", "-c", help="Configuration(s) to preprocess: -c 2d 3d_fullres (or -c 2d -c 3d_fullres). "
        "Default 3d_fullres (2d for 2D data).")] = None,
    workers: WorkersOpt = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo finished cases too.")] = False,
    plans_name: PlansOpt = None,
    part: PartOpt = None,
) -> None:
    """Crop, normalise and resample every case into the cache the trainer reads (resumable).

    Run `autoseg plan DATASET` first. Finished cases are skipped, so an interrupted run picks up
    where it stopped; cases whose raw files or plan changed are redone. Large datasets: N processes
    or SLURM tasks with --part 1/N ... N/N (scripts/slurm_preprocess.sbatch, docs/cluster.md).
    """
    from autoseg import api

    plans = api.load_plans(dataset, plans_name)
    given = list(configurations or []) + list(ctx.args)  # nnU-Net style lists: -c 2d 3d_fullres
    names = tuple(given or (["3d_fullres"] if "3d_fullres" in plans.configurations else ["2d"]))
    folders = api.preprocess(dataset, configurations=names, workers=workers, overwrite=overwrite,
                             plans_name=plans_name, part=part)
    for name, folder in folders.items():
        _console().print(f"{name}: {folder}", soft_wrap=True)


@app.command("train")
@guarded
def train_command(
    ctx: typer.Context,
    dataset: DatasetArg,
    configuration: Annotated[str, typer.Argument(help=(
        "2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres (see plans.json)."))],
    fold: Annotated[str, typer.Argument(help="Fold 0-4 of the 5-fold cross-validation, or all.")],
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Epochs (default 1000).")] = None,
    iterations: Annotated[int | None, typer.Option("--iterations-per-epoch", min=1,
                                                   help="Training iterations per epoch (default 250).")] = None,
    val_iterations: Annotated[int | None, typer.Option("--val-iterations", min=0,
                                                       help="Validation batches per epoch (default 50).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Initial learning rate (default 0.01).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Override the plan's.")] = None,
    augmentation: Annotated[str | None, typer.Option("--augmentation", help="default or none.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-j", min=0, help=(
        "Data-loading processes (default: from the CPUs allotted to this job; 0 = in-process)."))] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", min=1,
                                                         help="Epochs between latest checkpoints (50).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling and augmentation.")] = None,
    init: Annotated[str | None, typer.Option("--init", help=(
        "How the output heads start: prior (at the class frequencies of the training patches; default) or "
        "nnunet (He init as nnU-Net, for exact comparisons). See docs/training.md."))] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", min=0, help=(
        "Iterations of linear learning-rate warm-up at the start (default 0)."))] = None,
    batch_dice: Annotated[bool | None, typer.Option("--batch-dice/--sample-dice", help=(
        "Pool the Dice over the batch or per sample (default: the plan's batch_dice)."))] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (default on).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help=(
        "auto (mixed precision on CUDA, fp32 on CPU for training), fp32, or bf16 (autocast; on CPU fast only "
        "with native bf16: AVX512-BF16 / AMX, see `autoseg env`)."))] = None,
    compile_network: Annotated[bool | None, typer.Option("--compile/--no-compile",
                                                         help="torch.compile on CUDA (default off).")] = None,
    resume: Annotated[bool, typer.Option("--continue", help=(
        "Continue from the last checkpoint; with a larger --epochs, extend a finished run."))] = False,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help=(
        "At the end, predict the fold's validation cases with full sliding windows and evaluate them."))] = True,
    plans_name: PlansOpt = None,
) -> None:
    """Train one fold of one configuration; writes the model folder under AUTOSEG_RESULTS.

    Multi-GPU: `torchrun --nproc_per_node 4 -m autoseg train DATASET 3d_fullres 0` (DDP).
    """
    from autoseg import api

    given = {"epochs": epochs, "iterations_per_epoch": iterations, "val_iterations": val_iterations,
             "initial_lr": lr, "batch_size": batch_size, "augmentation": augmentation, "workers": workers,
             "checkpoint_every": checkpoint_every, "seed": seed, "amp": amp, "compile": compile_network,
             "init": init, "warmup_iterations": warmup, "batch_dice": batch_dice, "precision": precision}
    overrides = {key: value for key, value in given.items() if value is not None}
    fold_value: int | str = int(fold) if fold.isdigit() else fold
    folder = api.train(dataset, configuration, fold_value, overrides=overrides, device=device, resume=resume,
                       validate=validate, plans_name=plans_name)
    _console().print(f"model folder: {folder}", soft_wrap=True)
    summary_file = folder / f"fold_{fold_value}" / "validation" / "summary.json"
    if validate and summary_file.is_file():
        from autoseg.cli_tables import evaluation_table
        from autoseg.evaluation import load_summary

        _console().print(evaluation_table(load_summary(summary_file)))


# registers predict, evaluate, ... and export-model, install-model, env on `app`
from autoseg import cli_inference, cli_sharing  # noqa: E402,F401,I001


def _flags_without_type_in_help() -> None:
    """typer 0.29 with click 8.5 prints the Python type `<bool>` after every switch in --help, as if it took a
    value (and users then write `--overwrite true`). A switch shows no type column."""
    import typer.core

    original = typer.core.TyperOption.display_type_rich
    if getattr(original, "switch_aware", False):
        return

    def display_type_rich(self: typer.core.TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else original(self, ctx)

    display_type_rich.switch_aware = True  # type: ignore[attr-defined]
    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type_in_help()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
