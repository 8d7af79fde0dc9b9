"""Rich tables for the command line (presentation only; the numbers come from the stages)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from autoseg.evaluation.contract import EvaluationSummary
from autoseg.fingerprint.contract import Fingerprint
from autoseg.planning.contract import Plans
from autoseg.planning.networks import NetworkSummary
from autoseg.runtime.report import EnvironmentReport


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "x".join(_fmt(v) for v in value)
    return str(value)


def fingerprint_table(fp: Fingerprint) -> Table:
    """Dataset geometry (median, min, max) and per-channel foreground intensities."""
    table = Table(title=f"{fp.dataset_name}: {len(fp.cases)} cases", title_justify="left")
    for column in ("", "median", "min", "max"):
        table.add_column(column)
    spacings = np.asarray(fp.spacings)
    shapes = np.asarray(fp.shapes_after_crop)
    for name, values in (("spacing (z,y,x) mm", spacings), ("shape after crop", shapes)):
        stats = (np.median(values, 0), values.min(0), values.max(0))
        table.add_row(name, *(_fmt(tuple(round(float(v), 3) for v in s)) for s in stats))
    table.add_row("kept after crop", _fmt(fp.median_relative_size_after_crop), "", "")
    for channel, stats in zip(fp.channel_names, fp.intensity):
        table.add_row(f"{channel} foreground", _fmt(stats.median), _fmt(stats.min), _fmt(stats.max))
        table.add_row(f"{channel} mean / std", _fmt(stats.mean), _fmt(stats.std), "")
        table.add_row(f"{channel} p0.5 / p99.5", _fmt(stats.percentile_00_5), _fmt(stats.percentile_99_5), "")
    return table


def plans_table(plans: Plans) -> tuple[Table, list[str]]:
    """One column per configuration, one row per planned quantity (fits 80 columns);
    the planner's notes are returned separately."""
    from autoseg.planning import summarize

    rows = summarize(plans)
    title = f"{plans.dataset_name}: plans for a {plans.memory_budget_gb:g} GiB GPU"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for row in rows:
        table.add_column(str(row.get("name", "")))
    fields = [key for key in rows[0] if key not in ("name", "notes")] if rows else []
    for field in fields:
        table.add_row(field.replace("_", " "), *(_fmt(row[field]) for row in rows))
    notes = [f"{row.get('name', '')}: {note}" for row in rows for note in row.get("notes", [])]
    return table, notes


def evaluation_table(summary: EvaluationSummary) -> Table:
    """Mean metrics per label over the evaluated cases, and the foreground mean."""
    from autoseg.evaluation import summary_rows

    header, *rows = summary_rows(summary)
    table = Table(title=f"{len(summary.cases)} case(s) evaluated", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == header[0] else "right")
    for row in rows:
        table.add_row(*row)
    return table


def environment_table(report: EnvironmentReport) -> Table:
    """`autoseg env`: one row per fact a bug report needs."""
    table = Table(title="autoseg environment", title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("autoseg", report.autoseg)
    table.add_row("python", f"{report.python} on {report.platform}")
    for name, version in report.packages.items():
        table.add_row(name, version or Text("not installed", style="dim"))
    table.add_row("torch CUDA build", report.torch_cuda or "none (CPU build)")
    table.add_row("cuDNN", str(report.cudnn) if report.cudnn else "-")
    for gpu in report.gpus:
        table.add_row(f"GPU {gpu.index}", f"{gpu.name}, {gpu.memory_gib:g} GiB, compute {gpu.capability}"
                                          f"{', bf16' if gpu.bf16 else ''}")
    if not report.gpus:
        table.add_row("GPU", "none visible" + (" (Apple MPS available)" if report.mps else ""))
    table.add_row("CPUs", f"{report.cpus_allotted} allotted to this job (host has {report.cpus_host})")
    cpu = report.cpu
    bf16 = [flag for flag, present in (("AVX512-BF16", cpu.avx512_bf16), ("AMX-BF16", cpu.amx_bf16)) if present]
    table.add_row("CPU", f"{cpu.name}; native bf16: {', '.join(bf16) if bf16 else 'no'}")
    table.add_row("--precision auto on CPU", cpu_auto_precision(cpu.native_bf16))
    engines = [Text(f"{name} {version}") if version else Text.assemble(name, (" (not installed)", "dim"))
               for name, version in report.engines.items()]
    table.add_row("inference engines", Text(", ").join(engines))
    for setting in report.paths:
        source = f"from {setting.variable}" if setting.variable else "default: variable not set"
        missing = ("", "") if setting.exists else (", missing", "yellow")
        table.add_row(f"{setting.kind} root", Text.assemble(f"{setting.path} ({source}", missing, ")"))
    for name, value in report.job.items():
        table.add_row(name, value)
    return table



def network_lines(summaries: list[NetworkSummary]) -> list[str]:
    """`autoseg networks`: one line per family, with its size for the dataset when one was given."""
    width = max((len(s.name) for s in summaries), default=0)
    lines = []
    for s in summaries:
        line = f"{s.name:<{width}}  {s.description}"
        if s.problem:
            line += f" | cannot be planned: {s.problem}"
        elif s.configuration:
            line += (f" | {s.configuration}: {(s.parameters or 0) / 1e6:.2f} M parameters, receptive field "
                     f"{_fmt(s.receptive_field)} voxels ({_fmt(s.receptive_field_mm)} mm), "
                     f"{s.estimated_memory_gb or 0:.2f} GiB")
        lines.append(line)
    return lines


def comparison_table(rows: list[tuple[str, ...]], dataset: str) -> Table:
    """`autoseg compare`: the rows of `autoseg.evaluation.compare.table_rows` (header first)."""
    header, *body = rows
    table = Table(title=f"{dataset}: trained models", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in ("model", "network", "folds") else "right")
    for row in body:
        table.add_row(*row)
    return table


def cpu_auto_precision(native_bf16: bool) -> str:
    """What `--precision auto` does on this CPU for prediction and for training, and why."""
    from autoseg.runtime.device import cpu_auto_is_bf16

    if not native_bf16:
        return "fp32 (no native bf16: --precision bf16 would be emulated and slow)"
    predict, train = cpu_auto_is_bf16("predict"), cpu_auto_is_bf16("train")
    text = {True: "bf16 (native, measured equivalent: docs/inference.md)", False: "fp32"}
    if predict == train:
        return text[predict] + ("" if predict else " (AUTOSEG_CPU_AUTO_PRECISION=fp32)")
    return (f"predict: {text[predict]}; train: {text[train]}"
            + (" (not measured equivalent for this purpose; --precision bf16 asks for it)" if not train else ""))
