"""Commands after training: predict, evaluate, ensemble, postprocess, find-best (registered by autoseg.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from autoseg.cli import DatasetArg, PartOpt, WorkersOpt, _console, app, guarded
from autoseg.errors import SettingsError

FOLD_HELP = ("Folds to average (default: every trained fold). Repeat (-f 0 -f 1), or list them as nnU-Net does: "
             "-f 0 1 2 3 4.")


@app.command("predict", context_settings={"allow_extra_args": True})
@guarded
def predict_command(
    ctx: typer.Context,
    source: Annotated[Path, typer.Option("--input", "-i", help="Folder of CASE_0000<ending> scans, or one file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the CASE<ending> label maps.")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset whose trained model to use.")] = None,
    configuration: Annotated[str, typer.Option("--configuration", "-c", help=(
        "2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres."))] = "3d_fullres",
    folds: Annotated[list[str] | None, typer.Option("--folds", "-f", help=FOLD_HELP)] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help=(
        "A model folder (<config>__<plans>) anywhere on disk, instead of -d/-c."))] = None,
    plans_name: Annotated[str, typer.Option("--plans", "-p", help=(
        "Plans identifier of the model folder (<config>__<plans>), e.g. resenc."))] = "autoseg",
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-chk", help=(
        "final, best or latest (-chk: nnU-Net's spelling)."))] = "final",
    device: Annotated[str, typer.Option("--device", "-device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    tta: Annotated[bool, typer.Option("--tta/--no-tta", " /--disable_tta", help=(
        "Mirroring test-time augmentation (8x work in 3D); --disable_tta is nnU-Net's spelling of --no-tta."))
                   ] = True,
    step_size: Annotated[float, typer.Option("--step-size", "-step_size", min=0.05, max=1.0, help=(
        "Tile step as a fraction of the patch (0.5: tiles overlap by half)."))] = 0.5,
    tiles_per_batch: Annotated[int | None, typer.Option("--tiles-per-batch", min=1, help=(
        "Tiles per forward pass (default: 1 on CPU, the plan's batch size on GPU)."))] = None,
    mirrors_per_call: Annotated[int | None, typer.Option("--mirrors-per-call", min=1, help=(
        "Mirrored copies of the tiles per forward pass (default: on CPU as many as keep a pass under 2^20 "
        "input voxels, e.g. all 8 for a 40x56x40 patch; 1 on GPU)."))] = None,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = True,
    precision: Annotated[str, typer.Option("--precision", help=(
        "auto (mixed precision on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX, see `autoseg env`), "
        "measured equivalent; fp32 on other CPUs), fp32, or bf16 (~2-3x faster than fp32 where native; the "
        "labels differ from fp32's on ~0.01 % of the voxels)."))] = "auto",
    cpu_bf16: Annotated[bool, typer.Option("--cpu-bf16", help="Same as --precision bf16 on CPU.")] = False,
    engine: Annotated[str, typer.Option("--engine", help=(
        "torch, openvino, onnxruntime (CPU engines: pip install \"autoseg\\[openvino]\" / \"autoseg\\[onnx]\"), or "
        "auto: the fastest installed engine that reproduces torch's output on this model, else torch. "
        "See docs/inference.md."))] = "torch",
    accumulator: Annotated[str, typer.Option("--accumulator", help=(
        "float32, or float16: half the memory for the sliding window's running sum on huge volumes; the label "
        "can change where two classes tie within ~1e-3 (docs/inference.md)."))] = "float32",
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", "--save_probabilities", help=(
        "Also write CASE.npz with class probabilities (for `autoseg ensemble`)."))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Predict cases whose output exists too.")] = False,
    part: PartOpt = None,
    prev_stage: Annotated[Path | None, typer.Option("--prev-stage", "-prev_stage_predictions", help=(
        "Cascade only: folder of the 3d_lowres predictions of these scans (CASE<ending>). Default: run the "
        "3d_lowres model first, into OUTPUT/.previous_3d_lowres."))] = None,
) -> None:
    """Segment new scans with a trained model; outputs open on top of the inputs in ITK-SNAP / Slicer.

    Example: autoseg predict -i scans/ -o segmentations/ -d 4 -c 3d_fullres -f 0 1 2 3 4
    Scans are named like the training images (CASE_0000.nii.gz, CASE_0001.nii.gz for a 2nd channel).
    A case that cannot be read is reported and skipped; the exit code is 1 if any case failed.
    Many scans: run N processes with --part 1/N ... N/N (scripts/slurm_predict.sbatch), then once without
    --part to check that every case is there (docs/cluster.md).
    """
    from autoseg import api
    from autoseg.inference import PredictOptions

    fold_list = _folds(list(folds or []) + list(ctx.args))
    options = PredictOptions(folds=fold_list, checkpoint=checkpoint, device=device, tta=tta, step_size=step_size,
                             tiles_per_batch=tiles_per_batch, amp=amp, cpu_bf16=cpu_bf16,
                             precision=precision, engine=engine, accumulator=accumulator,
                             mirrors_per_call=mirrors_per_call)
    report = api.predict(source, output, dataset=dataset, configuration=configuration, plans_name=plans_name,
                         model=model, options=options, overwrite=overwrite, save_probabilities=save_probabilities,
                         prev_stage=prev_stage, part=part)
    console = _console()
    console.print(f"{len(report.written)} written, {len(report.skipped)} already there, {len(report.failed)} failed "
                  f"-> {output}", soft_wrap=True)
    for case_id, message in report.failed.items():
        _console(stderr=True).print(f"[bold red]failed:[/] {escape(f'{case_id}: {message}')}", soft_wrap=True,
                                    markup=True)
    if report.failed:
        raise typer.Exit(1)


def _folds(values: list[str]) -> tuple[str, ...] | None:
    for value in values:
        if not (value.isdigit() or value == "all"):
            raise SettingsError(f"unexpected argument {value!r}", hint="folds are numbers or `all`: -f 0 1 2 3 4")
    return tuple(dict.fromkeys(values)) or None


@app.command("evaluate")
@guarded
def evaluate_command(
    ctx: typer.Context,
    predictions: Annotated[Path, typer.Argument(help="Folder of predicted CASE<ending> label maps.")],
    reference: Annotated[Path, typer.Argument(help="Folder of reference labels with the same file names.")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help=(
        "Dataset for the label names (default: the prediction folder's prediction.json)."))] = None,
    distances: Annotated[bool, typer.Option("--distances", help="Also HD95 and normalised surface Dice (mm).")
                         ] = False,
    tolerance: Annotated[float, typer.Option("--tolerance-mm", min=0.0, help="Surface Dice tolerance in mm.")
                         ] = 1.0,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Summary file (default PRED/summary.json).")
                      ] = None,
    workers: WorkersOpt = 2,
) -> None:
    """Dice, IoU, TP/FP/FN and volumes per case and label; HD95 and surface Dice with --distances.

    Cases present in both folders are compared; the summary goes to PRED/summary.json.
    """
    from autoseg import api
    from autoseg.cli_tables import evaluation_table

    summary = api.evaluate(predictions, reference, dataset=dataset, distances=distances, tolerance_mm=tolerance,
                           workers=workers, output=output)
    _console().print(evaluation_table(summary))
    _console().print(f"summary: {output or predictions / 'summary.json'}", soft_wrap=True)


@app.command("overlay")
@guarded
def overlay_command(
    ctx: typer.Context,
    images: Annotated[Path, typer.Argument(help="Folder of scans CASE_0000<ending> (e.g. imagesTr, or new scans).")],
    labels: Annotated[Path, typer.Argument(help="Folder of label maps CASE<ending> (labelsTr, or predictions).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the CASE.png pictures.")],
) -> None:
    """One PNG per case: the slice with the most labelled voxels, labels coloured over the grey scan.

    Example: autoseg overlay raw/Dataset004_Hippocampus/imagesTr raw/Dataset004_Hippocampus/labelsTr -o png/
    (or a prediction folder as LABELS to look at what a model did). Channel 0 is shown.
    """
    from autoseg.evaluation.overlay import pair_overlay_cases, write_overlays

    written = write_overlays(pair_overlay_cases(images, labels), output)
    _console().print(f"{len(written)} overlay(s) -> {output}", soft_wrap=True)


@app.command("ensemble", context_settings={"allow_extra_args": True})
@guarded
def ensemble_command(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Option("--input", "-i", help=(
        "Prediction folders written with --save-probabilities: -i OUT_A OUT_B (or -i A -i B)."))],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the ensembled label maps.")],
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="Also write the mean CASE.npz.")
                                  ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo cases whose output exists.")] = False,
    workers: WorkersOpt = 2,
) -> None:
    """Average the class probabilities of several predictions (configurations) case by case."""
    from autoseg import api

    folders = list(inputs) + [Path(extra) for extra in ctx.args]
    written = api.ensemble(folders, output, overwrite=overwrite, save_probabilities=save_probabilities,
                           workers=workers)
    _console().print(f"{len(written)} case(s) ensembled from {len(folders)} folders -> {output}", soft_wrap=True)


@app.command("postprocess")
@guarded
def postprocess_command(
    ctx: typer.Context,
    source: Annotated[Path, typer.Option("--input", "-i", help="Prediction folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the postprocessed label maps.")],
    rules: Annotated[Path, typer.Option("--rules", help="postprocessing.json written by `autoseg find-best`.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo cases whose output exists.")] = False,
    workers: WorkersOpt = 2,
) -> None:
    """Keep only the largest connected component where cross-validation showed that it helps."""
    from autoseg import api

    written = api.postprocess(source, output, rules, overwrite=overwrite, workers=workers)
    _console().print(f"{len(written)} case(s) postprocessed -> {output}", soft_wrap=True)


@app.command("find-best", context_settings={"allow_extra_args": True})
@guarded
def find_best_command(
    ctx: typer.Context,
    dataset: DatasetArg,
    configurations: Annotated[list[str] | None, typer.Option("--configuration", "-c", help=(
        "Configuration(s) to consider: -c 2d 3d_fullres (default: every one with all folds validated)."))] = None,
    ensembles: Annotated[bool, typer.Option("--ensembles/--no-ensembles", help="Also try pairs of configurations.")
                         ] = True,
    workers: WorkersOpt = 2,
    plans_names: Annotated[list[str] | None, typer.Option("--plans", "-p", help=(
        "Only the model folders of these plans identifiers (repeat -p). Default: every identifier."))] = None,
) -> None:
    """Pick the best configuration (or pair ensemble, across network families too) by cross-validation Dice,
    decide postprocessing, and print the commands that reproduce it on new scans (also saved as
    inference_instructions.txt).

    Needs every fold of a configuration trained (`autoseg train DATASET CONFIG 0` ... 4).
    """
    from autoseg import api
    from autoseg.evaluation import inference_instructions

    names = list(configurations or []) + list(ctx.args) or None  # nnU-Net style lists: -c 2d 3d_fullres
    choice = api.find_best(dataset, configurations=names, allow_ensembles=ensembles, workers=workers,
                           plans_names=plans_names)
    _console().print(inference_instructions(choice), soft_wrap=True)


@app.command("compare")
@guarded
def compare_command(dataset: DatasetArg) -> None:
    """Every trained model folder of DATASET side by side: Dice per class, parameters, receptive field, seconds
    per training iteration, prediction seconds per case, estimated and measured memory.

    Written to the dataset's results folder as comparison.md (the table), comparison.png (the figure) and
    comparison.json; `autoseg find-best` writes them too, with cross-validation Dice. Train two families to
    compare, e.g. `autoseg plan D --network enet`, `autoseg train D 3d_fullres 0 -p enet`.
    """
    from autoseg import api
    from autoseg.cli_tables import comparison_table
    from autoseg.evaluation.compare import FIGURE_FILE, TABLE_FILE, table_rows
    from autoseg.paths import resolve_dataset

    comparison = api.compare(dataset)
    if not comparison.rows:
        raise SettingsError(f"no trained model folder of {comparison.dataset} has a finished fold",
                            hint=f"train one first: autoseg train {comparison.dataset} 3d_fullres 0")
    _console().print(comparison_table(table_rows(comparison), comparison.dataset))
    results = resolve_dataset(dataset).results
    _console().print(f"table: {results / TABLE_FILE}\nfigure: {results / FIGURE_FILE}", soft_wrap=True)
