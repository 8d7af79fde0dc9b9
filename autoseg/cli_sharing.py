"""Commands for sharing and support: export-model, install-model, import-nnunet, export-onnx, env (registered by
autoseg.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from autoseg.cli import DatasetArg, _console, app, guarded
from autoseg.cli_inference import FOLD_HELP, _folds
from autoseg.serialization import to_jsonable


@app.command("export-model", context_settings={"allow_extra_args": True})
@guarded
def export_model_command(
    ctx: typer.Context,
    dataset: DatasetArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="The archive to write, e.g. model.zip.")],
    configurations: Annotated[list[str], typer.Option("--configuration", "-c", help=(
        "Configuration(s) to pack: -c 3d_fullres, or -c 2d 3d_fullres. A cascade brings its 3d_lowres along."))],
    folds: Annotated[list[str] | None, typer.Option("--folds", "-f", help=FOLD_HELP)] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="final, best or latest.")] = "final",
    plans_name: Annotated[str, typer.Option("--plans", "-p", help=(
        "Plans identifier of the model folders, e.g. resenc."))] = "autoseg",
) -> None:
    """Pack trained models into one zip for another machine or lab: plans, labels, settings, the
    network weights of the chosen folds (no optimizer state) and find-best's postprocessing rules.

    Example: autoseg export-model 4 -c 3d_fullres -f 0 1 2 3 4 -o hippocampus.zip
    Then, elsewhere: autoseg install-model hippocampus.zip, or autoseg predict -m hippocampus.zip -i in/ -o out/
    """
    from autoseg import api

    extra = list(ctx.args)  # nnU-Net style lists: configuration names are never numbers, folds always are
    fold_list = _folds(list(folds or []) + [a for a in extra if a.isdigit() or a == "all"])
    names = list(configurations) + [a for a in extra if not (a.isdigit() or a == "all")]
    manifest = api.export_model(dataset, output, configurations=names, folds=list(fold_list) if fold_list else None,
                                checkpoint=checkpoint, plans_name=plans_name)
    size = output.stat().st_size / 2**20
    _console().print(f"wrote {output} ({size:.1f} MiB)", soft_wrap=True)
    for model in manifest.models:
        _console().print(f"  {model.folder}: folds {' '.join(model.folds)}", soft_wrap=True)
    if manifest.postprocessing:
        _console().print("  with find-best's postprocessing rules", soft_wrap=True)


@app.command("install-model")
@guarded
def install_model_command(
    ctx: typer.Context,
    archive: Annotated[Path, typer.Argument(help="A zip written by `autoseg export-model`.")],
    results: Annotated[Path | None, typer.Option("--results", help=(
        "Results root to install into (default: AUTOSEG_RESULTS)."))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace model folders that are already there.")
                         ] = False,
) -> None:
    """Unpack a model archive into the results root, after checking every file in it.

    Nothing but plans, labels, settings, checkpoints and postprocessing rules is accepted; absolute
    paths, `..`, links and files that differ from the manifest's sha256 are refused, and checkpoints
    load with weights_only. Afterwards predict with -d DATASET -c CONFIGURATION as on the training machine
    (with -m MODEL_FOLDER when --results is not AUTOSEG_RESULTS); the commands are printed.
    """
    from autoseg import api
    from autoseg.paths import data_root

    installed = api.install_model(archive, results=results, overwrite=overwrite)
    console = _console()
    console.print(f"installed into {installed.results}", soft_wrap=True)
    # predict -d looks under AUTOSEG_RESULTS: elsewhere, the model folder itself has to be named
    in_default_root = installed.results.parent.resolve() == data_root("results").resolve()
    for model in installed.manifest.models:
        plans = model.folder.rsplit("__", 1)[1]
        where = (f"-d {installed.manifest.dataset} -c {model.configuration}" + ("" if plans == "autoseg" else
                 f" -p {plans}") if in_default_root else f"-m {installed.results / model.folder}")
        console.print(f"  autoseg predict -i INPUT -o OUTPUT {where} --checkpoint {installed.manifest.checkpoint}",
                      soft_wrap=True)
    if installed.postprocessing is not None:
        console.print(f"  autoseg postprocess -i OUTPUT -o OUTPUT_PP --rules {installed.postprocessing}",
                      soft_wrap=True)


@app.command("import-nnunet", context_settings={"allow_extra_args": True})
@guarded
def import_nnunet_command(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help=(
        "An nnU-Net v2 model folder <Trainer>__<Plans>__<configuration>, or a zip of nnUNetv2_export_model_to_zip."))],
    output: Annotated[Path | None, typer.Option("--output", "-o", help=(
        "Folder to write the model folder into (default: AUTOSEG_RESULTS/<dataset of its plans.json>)."))] = None,
    configuration: Annotated[str | None, typer.Option("--configuration", "-c", help=(
        "The model to import from a zip that holds several, e.g. 3d_fullres."))] = None,
    folds: Annotated[list[str] | None, typer.Option("--folds", "-f", help=FOLD_HELP)] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="final, best or latest (checkpoint_*.pth).")
                          ] = "final",
    postprocessing: Annotated[bool, typer.Option("--postprocessing/--no-postprocessing", help=(
        "Convert crossval_results_folds_*/postprocessing.json into autoseg's rules."))] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model folder that is already there.")
                         ] = False,
) -> None:
    """Turn a trained nnU-Net v2 model (folder or zip) into an autoseg model folder (same weights, same preprocessing).

    Read without nnunetv2 and without unpickling: plans.json, dataset.json, checkpoints loaded weights-only
    (numpy scalars allowed), postprocessing.json (never the .pkl). A network class, normalisation or
    resampling autoseg cannot reproduce exactly is refused with its name. A cascade stage
    (3d_cascade_fullres) brings its 3d_lowres model along when that folder is beside it (or in the zip).
    `autoseg predict -m FOLDER` also takes the nnU-Net folder or zip directly (converted once into a cache).
    Example: autoseg import-nnunet nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres
    """
    from autoseg import api

    fold_list = _folds(list(folds or []) + list(ctx.args))  # -f 0 1 2 as nnU-Net lists folds
    imported = api.import_nnunet(source, output, checkpoint=checkpoint, folds=list(fold_list) if fold_list else None,
                                 postprocessing=postprocessing, overwrite=overwrite, configuration=configuration)
    console = _console()
    axes = " ".join(map(str, imported.mirror_axes)) or "none"
    console.print(f"wrote {imported.folder} ({imported.trainer}, folds {' '.join(imported.folds)}, test-time "
                  f"mirroring over axes {axes})", soft_wrap=True)
    if imported.previous is not None:
        console.print(f"wrote {imported.previous.folder} (its first stage, folds {' '.join(imported.previous.folds)};"
                      " predict runs it first)", soft_wrap=True)
    console.print(f"  autoseg predict -i INPUT -o OUTPUT -m {imported.folder} --checkpoint {imported.checkpoint}",
                  soft_wrap=True)
    if imported.postprocessing is not None:
        console.print(f"  autoseg postprocess -i OUTPUT -o OUTPUT_PP --rules {imported.postprocessing}",
                      soft_wrap=True)


@app.command("export-onnx")
@guarded
def export_onnx_command(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write (plus OUTPUT.json).")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset whose trained model to export.")
                       ] = None,
    configuration: Annotated[str, typer.Option("--configuration", "-c", help="Configuration of the model.")
                             ] = "3d_fullres",
    model: Annotated[Path | None, typer.Option("--model", "-m", help="A model folder instead of -d/-c.")] = None,
    fold: Annotated[str, typer.Option("--fold", "-f", help="The fold whose network to export.")] = "0",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="final, best or latest.")] = "final",
    plans_name: Annotated[str, typer.Option("--plans", "-p", help=(
        "Plans identifier of the model folder, e.g. resenc."))] = "autoseg",
    opset: Annotated[int | None, typer.Option("--opset", min=7, help="ONNX opset (default: torch's choice).")
                     ] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help=(
        "Compare onnxruntime's output with PyTorch's on a random batch."))] = True,
) -> None:
    """Export one fold's network to ONNX: a patch in (dynamic batch), full-resolution logits out.

    The graph is the network only: preprocessing (resampling, normalisation), the sliding window and
    the export to the scan's geometry stay in autoseg; OUTPUT.json records what a deployment must do.
    Needs onnx and onnxruntime: pip install -e ".\\[onnx]" in the autoseg checkout.
    Example: autoseg export-onnx -d 4 -c 3d_fullres -f 0 -o hippocampus_fold0.onnx
    """
    from autoseg import api

    exported = api.export_onnx(output, dataset=dataset, configuration=configuration, model=model, fold=fold,
                               checkpoint=checkpoint, plans_name=plans_name, opset=opset, check=check)
    checked = "not checked" if exported.max_abs_diff is None else f"max |onnx - torch| {exported.max_abs_diff:.2e}"
    _console().print(f"wrote {exported.path} (opset {exported.opset}, input {exported.input_name} "
                     f"{tuple(exported.input_shape)}, {checked})", soft_wrap=True)
    _console().print(f"preprocessing and labels: {exported.sidecar}", soft_wrap=True)


@app.command("env")
@guarded
def env_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts and issue templates).")] = False,
) -> None:
    """Versions, CUDA, GPUs, the CPUs this job may use and the path settings: paste it into a bug report."""
    from autoseg.runtime.report import environment_report

    report = environment_report()
    if as_json:
        typer.echo(json.dumps(to_jsonable(report), indent=2))
        return
    from autoseg.cli_tables import environment_table

    _console().print(environment_table(report))
