"""benchmarks/gpu_check.py on CPU (--device cpu --quick, tiny networks): every section runs and reports."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from autoseg.serialization import save_contract

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: Keys of a row whose value must be a positive number when present (seconds, rates, FLOPs).
POSITIVE = ("_s", "_per_s", "flops", "estimate_gb")


@pytest.fixture()
def prepared(small_training_setup, tmp_path: Path) -> Path:
    """A copy of the small preprocessed example with plans.json and dataset.json beside its cache, as
    benchmarks/gpu_prepare.sh lays out the Hippocampus data for the GPU machine."""
    dataset, plans, _, root = small_training_setup
    data = tmp_path / "data" / dataset.name
    shutil.copytree(root / "pre" / dataset.name, data)
    save_contract(data / "plans.json", plans)
    shutil.copyfile(Path(dataset.root) / "dataset.json", data / "dataset.json")
    return data


def _numbers(value: Any) -> list[tuple[str, float]]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in
                ([(key, item)] if isinstance(item, (int, float)) and not isinstance(item, bool) else _numbers(item))]
    if isinstance(value, list):
        return [pair for item in value for pair in _numbers(item)]
    return []


def test_cpu_quick_run_reports_every_section(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for missing in ("SimpleITK", "nibabel"):  # as on the GPU machine: the check must not need them
        monkeypatch.setitem(sys.modules, missing, None)
    import gpu_check

    out = tmp_path / "out"
    code = gpu_check.main(["--device", "cpu", "--quick", "--data", str(prepared), "--work", str(tmp_path / "work"),
                           "--json", str(out / "check.json"), "--markdown", str(out / "check.md")])
    assert code == 0
    result = json.loads((out / "check.json").read_text())
    assert list(result["sections"]) == list(gpu_check.SECTIONS) and result["tiny"]
    for name, section in result["sections"].items():
        assert section["status"] == "ok", (name, section["reason"], section.get("traceback"))
        assert section["rows"], name
        for row in section["rows"]:
            assert "error" not in row and row["figure"] and row["what"], (name, row)
            for key, number in _numbers(row):
                assert math.isfinite(number), (name, key)
                if key.endswith(POSITIVE):
                    assert number > 0, (name, key, number)
    steps = {row["what"].split(", ")[-1] for row in result["sections"]["train_steps"]["rows"]}
    assert {"fp32", "bf16", "fp16 + GradScaler", "fp32 + channels-last", "bf16 + compile"} <= steps
    prediction = result["sections"]["prediction"]["rows"]
    assert all(row["max_abs_difference"] == 0 for row in prediction if "max_abs_difference" in row)
    assert result["sections"]["ddp"]["rows"][0]["replicas_identical"]
    table = (out / "check.md").read_text()
    assert "| section | what | figure | detail |" in table
    assert all(f"| {name} |" in table for name in gpu_check.SECTIONS)


def test_a_failing_section_is_recorded_and_the_others_still_run(prepared: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    def broken(check: Any) -> dict[str, Any]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.SECTIONS, "memory", broken)
    out = tmp_path / "check.json"
    gpu_check.main(["--device", "cpu", "--quick", "--data", str(prepared), "--work", str(tmp_path / "work"),
                    "--sections", "environment,memory,loader", "--json", str(out)])
    sections = json.loads(out.read_text())["sections"]
    assert sections["memory"]["status"] == "failed"
    assert sections["memory"]["reason"].startswith("failed: RuntimeError: CUDA error")
    assert sections["environment"]["status"] == sections["loader"]["status"] == "ok"
