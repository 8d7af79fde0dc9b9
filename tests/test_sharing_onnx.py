"""ONNX export: the graph gives PyTorch's full-resolution logits for any batch, the sidecar describes the
preprocessing, and failures leave no file behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from model_builders import make_model_folder  # noqa: E402

from autoseg.dataset.load import load_dataset  # noqa: E402
from autoseg.fingerprint import extract_fingerprint  # noqa: E402
from autoseg.inference import PredictOptions, Predictor  # noqa: E402
from autoseg.model import onnx_graph  # noqa: E402
from autoseg.model_folder import CheckpointError, ModelFolder  # noqa: E402
from autoseg.planning import plan  # noqa: E402
from autoseg.planning.contract import Plans  # noqa: E402
from autoseg.serialization import to_jsonable  # noqa: E402
from autoseg.sharing import onnx_export  # noqa: E402
from autoseg.sharing.onnx_export import (  # noqa: E402
    OnnxDependencyError,
    OnnxExport,
    OnnxExportError,
    export_onnx,
    read_onnx_sidecar,
)


@pytest.fixture(scope="module")
def plans(example_dataset: Path) -> Plans:
    dataset = load_dataset(example_dataset)
    return plan(extract_fingerprint(dataset), dataset)


def tiny_model_folder(root: Path, plans: Plans, example_dataset: Path, configuration: str) -> ModelFolder:
    """One untrained fold of a narrow network, with the module's plans."""
    return make_model_folder(root, example_dataset, configuration, plans=plans)


@pytest.fixture(scope="module")
def folder_3d(plans: Plans, example_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelFolder:
    return tiny_model_folder(tmp_path_factory.mktemp("models"), plans, example_dataset, "3d_fullres")


@pytest.fixture(scope="module")
def exported_3d(folder_3d: ModelFolder, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    return export_onnx(folder_3d.root, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _session(path: Path):  # noqa: ANN202 - onnxruntime is imported at runtime
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_three_d_export_gives_pytorchs_full_resolution_logits_for_any_batch(folder_3d: ModelFolder,
                                                                             exported_3d: OnnxExport) -> None:
    result = exported_3d
    assert result.path.is_file() and result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    assert result.input_shape == ("batch", 1, 32, 32, 32) and result.output_shape == ("batch", 3, 32, 32, 32)
    session = _session(result.path)
    (graph_input,), outputs = session.get_inputs(), session.get_outputs()
    assert [o.name for o in outputs] == [result.output_name]  # no deep-supervision outputs
    assert isinstance(graph_input.shape[0], str) and graph_input.type == "tensor(float)"
    network = Predictor.from_folder(folder_3d.root, PredictOptions(tta=False, device="cpu")).networks[0]
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 32, 32, 32, generator=generator)
        with torch.no_grad():
            expected = network(x).numpy()
        (got,) = session.run(None, {result.input_name: x.numpy()})
        assert got.shape == expected.shape == (batch, 3, 32, 32, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-3 * max(1.0, float(np.abs(expected).max())))
        top2 = np.sort(expected, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4  # leave out voxels where two classes tie within rounding
        assert clear.mean() > 0.99
        assert np.array_equal(got.argmax(1)[clear], expected.argmax(1)[clear])
    assert not list(result.path.parent.glob(".*.tmp")) and not list(result.path.parent.glob("*.data"))


def test_sidecar_round_trips_and_says_how_to_preprocess(exported_3d: OnnxExport, plans: Plans) -> None:
    assert exported_3d.sidecar == exported_3d.path.with_name("model.onnx.json")
    raw = json.loads(exported_3d.sidecar.read_text())
    sidecar = read_onnx_sidecar(exported_3d.sidecar)
    assert to_jsonable(sidecar) == raw
    config = plans.configurations["3d_fullres"]
    assert sidecar.patch_size == tuple(raw["patch_size"]) == (32, 32, 32) == tuple(config.patch_size)
    assert sidecar.labels == {"background": (0,), "organ": (1,), "lesion": (2,)}
    assert sidecar.spacing == tuple(config.spacing) and sidecar.normalization == ("ct",)
    assert sidecar.channel_names == plans.channel_names and len(sidecar.intensity) == 1
    assert sidecar.mirror_axes == (0, 1, 2) and sidecar.activation == "softmax" and sidecar.num_classes == 3
    assert sidecar.opset == exported_3d.opset and sidecar.model_file == "model.onnx" and sidecar.fold == "0"


def test_two_d_configuration_exports(plans: Plans, example_dataset: Path, tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path, plans, example_dataset, "2d")
    result = export_onnx(folder.root, tmp_path / "out" / "2d.onnx", opset=18)
    assert result.opset == 18 and result.max_abs_diff is not None
    session = _session(result.path)
    (got,) = session.run(None, {"image": np.zeros((3, 1, 32, 32), dtype=np.float32)})
    assert got.shape == (3, 3, 32, 32)
    assert read_onnx_sidecar(result.sidecar).patch_size == (32, 32)


def test_torchscript_exporter_is_the_fallback(folder_3d: ModelFolder, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "_has_dynamo_exporter", lambda: False)  # as on torch < 2.5
    monkeypatch.setattr(onnx_graph, "has_dynamo_exporter", lambda: False)
    result = export_onnx(folder_3d.root, tmp_path / "m.onnx", opset=17)
    assert result.exporter == "torchscript" and result.opset == 17
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    (got,) = _session(result.path).run(None, {"image": np.zeros((3, 1, 32, 32, 32), dtype=np.float32)})
    assert got.shape == (3, 3, 32, 32, 32)


def test_missing_fold_or_checkpoint_names_the_path(folder_3d: ModelFolder, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found") as caught:
        export_onnx(folder_3d.root, tmp_path / "m.onnx", fold="3")
    assert caught.value.path == str(folder_3d.checkpoint(3, "final"))
    with pytest.raises(CheckpointError) as caught:
        export_onnx(folder_3d.root, tmp_path / "m.onnx", checkpoint="best")
    assert caught.value.path == str(folder_3d.checkpoint(0, "best"))
    with pytest.raises(CheckpointError, match="plans.json"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    assert not list(tmp_path.glob("m.onnx*"))


def test_output_folder_and_missing_packages_are_clear_errors(folder_3d: ModelFolder, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OnnxExportError, match="folder") as caught:
        export_onnx(folder_3d.root, tmp_path)
    assert caught.value.path == str(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(OnnxDependencyError, match="onnxruntime") as missing:
        export_onnx(folder_3d.root, tmp_path / "m.onnx")
    assert '.[onnx]' in missing.value.hint and 'onnxruntime' in missing.value.hint


def test_a_failed_export_leaves_no_file(folder_3d: ModelFolder, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(OnnxExportError, match="exporter exploded"):
        export_onnx(folder_3d.root, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_mismatch_with_pytorch_is_an_error_and_leaves_no_file(
    folder_3d: ModelFolder, exported_3d: OnnxExport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    # the graph exported before (saves a second export), checked with a tolerance that any difference exceeds
    monkeypatch.setattr(onnx_export, "_export", lambda *args, **kwargs: (onnx.load(exported_3d.path), "dynamo"))
    monkeypatch.setattr(onnx_export, "_RELATIVE_TOLERANCE", -1.0)
    with pytest.raises(OnnxExportError, match="differ from PyTorch") as caught:
        export_onnx(folder_3d.root, tmp_path / "m.onnx")
    assert caught.value.path == str(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
