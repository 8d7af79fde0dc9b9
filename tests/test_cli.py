"""The command line end to end on the synthetic example: exit codes, messages, files written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoseg.cli import app

runner = CliRunner()


def test_help_teaches_the_flow() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("example-dataset", "check", "fingerprint", "plan"):
        assert command in result.output
    assert "AUTOSEG_RAW" in result.output and "train" in result.output


def _help_texts(command, path: str = "autoseg"):
    yield path, command.help or ""
    for parameter in command.params:
        yield f"{path} {parameter.name}", getattr(parameter, "help", None) or ""
    for name, sub in getattr(command, "commands", {}).items():
        yield from _help_texts(sub, f"{path} {name}")


def test_help_texts_keep_their_brackets() -> None:
    """Help is rendered as rich markup: an unescaped [openvino] would vanish from `pip install "autoseg[openvino]"`."""
    import re

    import typer.main

    rich_tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")
    eaten = [(where, tag.group()) for where, text in _help_texts(typer.main.get_command(app))
             for tag in rich_tag.finditer(text)]
    assert eaten == []
    shown = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "400"})
    assert 'autoseg[openvino]' in shown.output


def test_error_hints_keep_their_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from autoseg.cli import guarded
    from autoseg.errors import SettingsError

    @guarded
    def failing() -> None:
        raise SettingsError("engine openvino is not installed", path="/data/scan[1].nii.gz",
                            hint='pip install "autoseg[openvino]"')

    with pytest.raises(typer.Exit):
        failing()
    printed = capsys.readouterr().err
    assert "/data/scan[1].nii.gz" in printed and 'pip install "autoseg[openvino]"' in printed
    assert printed.startswith("error: ") and "[bold" not in printed  # the style itself is still markup


def test_plain_output_lines_keep_their_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    from autoseg.cli import _console

    _console().print('wrote /data/out[1]/model.zip; pip install "autoseg[openvino]"', soft_wrap=True)
    assert capsys.readouterr().out.strip() == 'wrote /data/out[1]/model.zip; pip install "autoseg[openvino]"'


def test_example_check_fingerprint_plan(roots: Path) -> None:
    made = runner.invoke(app, ["example-dataset", "--cases", "3", "--size", "32"])
    assert made.exit_code == 0, made.output
    assert (roots / "raw" / "Dataset900_Example" / "dataset.json").is_file()
    checked = runner.invoke(app, ["check", "900", "-j", "1"])
    assert checked.exit_code == 0, checked.output
    assert "OK" in checked.output and "3 cases" in checked.output
    fingerprinted = runner.invoke(app, ["fingerprint", "900", "-j", "1"])
    assert fingerprinted.exit_code == 0, fingerprinted.output
    assert "CT foreground" in fingerprinted.output
    planned = runner.invoke(app, ["plan", "Dataset900_Example", "--gpu-memory-gb", "8", "-j", "1"])
    assert planned.exit_code == 0, planned.output
    plans_file = roots / "preprocessed" / "Dataset900_Example" / "plans.json"
    plans = json.loads(plans_file.read_text())
    assert "3d_fullres" in plans["configurations"] and "3d_fullres" in planned.output
    for key in ("spacing", "patch_size", "batch_size"):
        assert key in plans["configurations"]["3d_fullres"]
    assert (plans_file.parent / "dataset.json").is_file()


def test_check_reports_broken_files_and_exits_non_zero(roots: Path) -> None:
    runner.invoke(app, ["example-dataset", str(roots / "ds"), "--cases", "2", "--size", "16"])
    victim = next((roots / "ds" / "labelsTr").iterdir())
    victim.write_bytes(b"garbage")
    missing = next((roots / "ds" / "imagesTr").iterdir())
    missing.unlink()
    result = runner.invoke(app, ["check", str(roots / "ds"), "-j", "1"])
    assert result.exit_code == 1
    assert victim.name in result.output and "fix:" in result.output
    assert "error(s)" in result.output


def test_user_mistake_prints_two_lines_and_exit_code_2(roots: Path) -> None:
    result = runner.invoke(app, ["plan", "77"])
    assert result.exit_code == 2
    assert "error:" in result.output and "fix:" in result.output
    assert "Traceback" not in result.output


def test_debug_flag_shows_the_exception(roots: Path) -> None:
    result = runner.invoke(app, ["--debug", "plan", "77"])
    assert result.exit_code != 0 and result.exception is not None


def test_fingerprint_is_cached_and_refreshed_when_files_change(roots: Path) -> None:
    from autoseg import api

    folder = api.example_dataset(roots / "raw" / "Dataset901_Cache", n_cases=2, size=16)
    first = api.fingerprint(901)
    cache = roots / "preprocessed" / "Dataset901_Cache" / "fingerprint.json"
    stamp = cache.stat().st_mtime_ns
    assert api.fingerprint("901") == first and cache.stat().st_mtime_ns == stamp
    label = sorted((folder / "labelsTr").iterdir())[0]
    os.utime(label, ns=(stamp + 10**9, stamp + 10**9))
    refreshed = api.fingerprint("901")
    assert refreshed.source_hash != first.source_hash


def test_system_errors_are_two_lines_with_a_fix_not_a_traceback(roots: Path, monkeypatch) -> None:
    """Issue 19 C1: disk full, read-only or a path variable pointing at a file read as autoseg's errors."""
    import errno

    import typer

    from autoseg.cli import guarded

    @guarded
    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/case.nii.gz")

    with pytest.raises(typer.Exit) as exit_info:
        full_disk()
    assert exit_info.value.exit_code == 2
    (roots / "afile").write_text("not a folder")
    monkeypatch.setenv("AUTOSEG_RESULTS", str(roots / "afile"))
    (roots / "raw" / "Dataset004_Hippocampus").mkdir(parents=True)
    result = CliRunner().invoke(app, ["compare", "Dataset004_Hippocampus"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Not a directory" in result.output and "AUTOSEG_" in result.output


def test_nnunet_spellings_of_predict_flags_are_accepted() -> None:
    """Issue 19: users coming from nnUNetv2_predict type -chk, -device, -step_size, --disable_tta."""
    import typer

    command = typer.main.get_command(app).commands["predict"]
    given = ["-i", "in", "-o", "out", "--disable_tta", "-chk", "best", "-step_size", "0.7", "-device", "cpu",
             "--save_probabilities", "-prev_stage_predictions", "lowres"]
    params = command.make_context("predict", given).params
    assert (params["tta"], params["checkpoint"], params["step_size"], params["device"]) == (False, "best", 0.7, "cpu")
    assert params["save_probabilities"] and str(params["prev_stage"]) == "lowres"
    assert command.make_context("predict", ["-i", "in", "-o", "out"]).params["tta"] is True


def test_evaluate_with_the_folders_swapped_is_refused(tmp_path: Path) -> None:
    """Issue 19: `evaluate GT PRED` (nnU-Net's order) must not evaluate the reference against the predictions."""
    predicted, reference = tmp_path / "pred", tmp_path / "gt"
    predicted.mkdir()
    reference.mkdir()
    (predicted / "prediction.json").write_text("{}")
    result = CliRunner().invoke(app, ["evaluate", str(reference), str(predicted)])
    assert result.exit_code == 2 and "look swapped" in result.output and "PREDICTIONS REFERENCE" in result.output
    assert not (predicted / "summary.json").exists() and not (reference / "summary.json").exists()


def test_preprocess_and_predict_take_a_part_of_the_cases(roots: Path) -> None:
    assert runner.invoke(app, ["example-dataset", "--cases", "3", "--size", "32"]).exit_code == 0
    assert runner.invoke(app, ["plan", "900", "-j", "1"]).exit_code == 0
    cache = roots / "preprocessed" / "Dataset900_Example" / "autoseg_3d_fullres"
    for part, done in (("1/2", 2), ("2/2", 3)):
        result = runner.invoke(app, ["preprocess", "900", "-j", "1", "--part", part])
        assert result.exit_code == 0, result.output
        assert len(list(cache.glob("*.json"))) == done
    wrong = runner.invoke(app, ["predict", "-i", "in", "-o", "out", "-d", "900", "--part", "0/2"])
    assert wrong.exit_code == 2 and "numbered 1 to N" in wrong.output and "Traceback" not in wrong.output


def test_switches_show_no_type_and_refuse_a_value(roots: Path) -> None:
    """Issue 19: --help printed `<bool>` after every switch, and `--overwrite true` wrote into ./true."""
    help_text = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "--continue" in help_text and "<bool>" not in help_text and "BOOLEAN" not in help_text
    result = runner.invoke(app, ["example-dataset", "--overwrite", "true"])
    assert result.exit_code == 2 and "switches take no value" in result.output
    assert not (Path.cwd() / "true").exists()
    elsewhere = roots / "true"  # a folder really named so, given by its full path, is fine
    assert runner.invoke(app, ["example-dataset", str(elsewhere), "--cases", "2", "--size", "16"]).exit_code == 0
    assert (elsewhere / "dataset.json").is_file()
