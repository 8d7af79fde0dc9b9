"""Inference engines: same logits as torch, fallback on disagreement, the export cache, clear install messages."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from model_builders import make_model_folder
from typer.testing import CliRunner

from autoseg.cli import app
from autoseg.errors import SettingsError
from autoseg.inference.engines import (
    ENGINES,
    CacheEntry,
    CompiledNetwork,
    CompileSpec,
    Engine,
    EngineError,
    ModelKey,
    clear_compiled,
    installed_engines,
    prepare_network,
)
from autoseg.inference.engines import select as engine_select
from autoseg.io.readers import read_label
from autoseg.model.build import build_network
from autoseg.model.contract import Topology
from autoseg.runtime.report import cpu_features

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PATCH = (16, 16, 16)
TINY = Topology(3, (4, 8, 8), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (2, 2, 2), (2, 2))


def tiny_network(seed: int = 0) -> torch.nn.Module:
    """A three-stage U-Net (4-8-8 features, deep supervision on as trained) with random weights."""
    torch.manual_seed(seed)
    return build_network(TINY, in_channels=1, num_classes=3).eval()


@pytest.fixture(autouse=True)
def engine_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh engine cache for every test, and nothing compiled in this process yet."""
    monkeypatch.setenv("AUTOSEG_ENGINE_CACHE", str(tmp_path / "engines"))
    clear_compiled()
    yield tmp_path / "engines"
    clear_compiled()


class PerturbedEngine(Engine):
    """A test engine: torch itself plus `offset` on every logit; counts its compilations and releases."""

    name, module, distribution, needs_onnx = "perturbed", "torch", "torch", False

    def __init__(self, offset: float) -> None:
        self.offset, self.compiled, self.released = offset, 0, 0

    def release(self) -> None:
        self.released += 1

    def compile(self, network, onnx_path, spec, workdir):
        self.compiled += 1

        def run(tiles: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return network(torch.from_numpy(tiles)).numpy() + self.offset

        return CompiledNetwork(run, engine=self.name, precision=spec.precision, static_batch=spec.tiles,
                               release=self.release)


@pytest.fixture()
def perturbed(monkeypatch: pytest.MonkeyPatch):
    """Register PerturbedEngine as the first choice of `auto`; yields a setter of its offset."""
    engine = PerturbedEngine(0.0)
    ENGINES.register("perturbed")(engine)
    monkeypatch.setattr(engine_select, "AUTO_ORDER", ("perturbed", "torch"))
    yield engine
    ENGINES.remove("perturbed")


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_engine_logits_equal_torchs_for_full_and_partial_batches(name: str) -> None:
    pytest.importorskip(name)
    pytest.importorskip("onnxscript")
    network = tiny_network()
    spec = CompileSpec(patch=PATCH, in_channels=1, tiles=2)
    compiled = prepare_network(network, engine=name, spec=spec, device=CPU)
    assert isinstance(compiled, CompiledNetwork) and compiled.engine == name
    assert network.deep_supervision is False  # switched off before the export
    for tiles in (2, 1, 3):  # the last batch of a volume may be smaller; a larger one runs in chunks
        x = torch.randn(tiles, 1, *PATCH)
        with torch.inference_mode():
            expected, actual = network(x), compiled(x)
        assert actual.shape == expected.shape == (tiles, 3, *PATCH) and actual.dtype == torch.float32
        spread = float(expected.max() - expected.min())
        assert float((actual - expected).abs().max()) <= 1e-3 * max(1.0, spread)


def test_openvino_runs_on_after_its_intermediate_memory_is_released() -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("onnxscript")
    network = tiny_network()
    compiled = prepare_network(network, engine="openvino", spec=CompileSpec(patch=PATCH, in_channels=1), device=CPU)
    x = torch.randn(1, 1, *PATCH)
    before = compiled(x)
    compiled.release_memory()
    assert torch.equal(compiled(x), before)


@pytest.mark.parametrize("threshold, releases", [(1, 1), (1 << 40, 0)])
def test_the_predictor_releases_engine_memory_after_large_volumes_only(
        perturbed: PerturbedEngine, example_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        threshold: int, releases: int) -> None:
    from autoseg.inference import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "RELEASE_ENGINE_MEMORY_VOXELS", threshold)
    model = make_model_folder(tmp_path / "models", example_dataset)
    predictor = predictor_module.Predictor.from_folder(model.root, predictor_module.PredictOptions(
        engine="perturbed", device="cpu", tta=False, precision="fp32"))
    image = next((example_dataset / "imagesTs").glob("*_0000.nii.gz"))
    prediction = predictor.predict_files([image])
    assert prediction.labels.size > 0 and perturbed.released == releases


def test_static_batches_are_padded_and_chunked() -> None:
    seen: list[int] = []

    def run(tiles: np.ndarray) -> np.ndarray:
        seen.append(len(tiles))
        return tiles * 2.0

    compiled = CompiledNetwork(run, engine="test", precision="fp32", static_batch=2)
    x = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 1, 2, 2)
    assert torch.equal(compiled(x), x * 2) and seen == [2, 2]


def test_auto_falls_back_to_torch_when_an_engine_disagrees(perturbed: PerturbedEngine,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    network, spec = tiny_network(), CompileSpec(patch=PATCH, in_channels=1)
    perturbed.offset = 0.5  # far beyond 1e-3 of the logit range
    with caplog.at_level(logging.WARNING, logger="autoseg.inference"):
        chosen = prepare_network(network, engine="auto", spec=spec, device=CPU)
    assert chosen is network
    assert "perturbed engine's logits differ" in caplog.text and "falling back to torch" in caplog.text
    with pytest.raises(EngineError, match="differ from torch"):  # asked for by name: no silent fallback
        prepare_network(network, engine="perturbed", spec=spec, device=CPU)


def test_auto_takes_a_verified_engine_and_remembers_the_verdict(perturbed: PerturbedEngine, engine_cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[bool] = []
    monkeypatch.setattr(engine_select, "return_freed_memory", lambda: trims.append(True) or True)
    network, spec = tiny_network(), CompileSpec(patch=PATCH, in_channels=1)
    perturbed.offset = 1e-6
    chosen = prepare_network(network, engine="auto", spec=spec, device=CPU)
    assert len(trims) == 1  # the one-off export / reference forward's memory is handed back
    assert isinstance(chosen, CompiledNetwork) and chosen.engine == "perturbed"
    entry = CacheEntry(ModelKey.of(network, spec), root=engine_cache)
    verdict = entry.verdict(f"perturbed-{perturbed.version()}-fp32-tiles1")
    assert verdict is not None and verdict["ok"] and verdict["max_abs_diff"] <= verdict["tolerance"]
    assert prepare_network(network, engine="auto", spec=spec, device=CPU) is chosen  # compiled once per process
    assert perturbed.compiled == 1 and len(trims) == 1
    clear_compiled()  # a new process: compiles again, but the stored verdict spares the comparison

    def fail(*args, **kwargs):
        raise AssertionError("verified twice")

    monkeypatch.setattr(engine_select, "verify", fail)
    assert prepare_network(network, engine="auto", spec=spec, device=CPU).engine == "perturbed"
    assert perturbed.compiled == 2


def test_auto_is_torch_on_a_gpu_and_cpu_engines_refuse_it() -> None:
    network, spec = tiny_network(), CompileSpec(patch=PATCH, in_channels=1)
    assert prepare_network(network, engine="auto", spec=spec, device=torch.device("cuda")) is network
    with pytest.raises(SettingsError, match="runs on the CPU"):
        prepare_network(network, engine="onnxruntime", spec=spec, device=torch.device("cuda"))


def _counting_exporter(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the ONNX export by one that records its calls and writes a placeholder file."""
    from autoseg.model import onnx_graph

    calls: list[Path] = []

    def export(network, example, output, *, opset=None):
        calls.append(Path(output))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"onnx")
        return "test"

    monkeypatch.setattr(onnx_graph, "export_network", export)
    return calls


def test_the_export_is_cached_per_checkpoint(perturbed: PerturbedEngine, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_exporter(monkeypatch)
    monkeypatch.setattr(PerturbedEngine, "needs_onnx", True)
    monkeypatch.setattr(engine_select, "_exportable", lambda engine: True)
    checkpoint = tmp_path / "checkpoint_final.pt"
    network, spec = tiny_network(), CompileSpec(patch=PATCH, in_channels=1)
    torch.save(network.state_dict(), checkpoint)
    prepare_network(network, engine="perturbed", spec=spec, device=CPU, checkpoint=checkpoint)
    assert len(calls) == 1 and calls[0].is_file()
    written = calls[0].stat().st_mtime_ns
    clear_compiled()
    prepare_network(network, engine="perturbed", spec=spec, device=CPU, checkpoint=checkpoint)
    assert len(calls) == 1 and calls[0].stat().st_mtime_ns == written  # reused, not exported again
    retrained = tiny_network(seed=1)
    torch.save(retrained.state_dict(), checkpoint)  # the same file, new weights: a new cache entry
    prepare_network(retrained, engine="perturbed", spec=spec, device=CPU, checkpoint=checkpoint)
    assert len(calls) == 2 and calls[1] != calls[0]
    assert ModelKey.of(retrained, spec, checkpoint=checkpoint).digest() == calls[1].parent.name
    other_patch = CompileSpec(patch=(16, 16, 32), in_channels=1)  # the patch is part of the key
    assert ModelKey.of(retrained, other_patch, checkpoint=checkpoint).digest() != calls[1].parent.name


def test_an_engine_that_is_not_installed_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(type(ENGINES.get("openvino")), "module", "autoseg_no_such_module")
    spec = CompileSpec(patch=PATCH, in_channels=1)
    with pytest.raises(SettingsError) as raised:
        prepare_network(tiny_network(), engine="openvino", spec=spec, device=CPU)
    assert 'pip install "autoseg[openvino]"' in str(raised.value)
    assert installed_engines()["openvino"] is None and installed_engines()["torch"]
    network = tiny_network()
    assert prepare_network(network, engine="auto", spec=spec, device=CPU) is network  # auto: torch without it
    with pytest.raises(SettingsError, match="unknown engine"):
        prepare_network(tiny_network(), engine="tensorrt", spec=spec, device=CPU)
    with pytest.raises(SettingsError, match="no bf16"):
        prepare_network(tiny_network(), engine="onnxruntime", spec=CompileSpec(PATCH, 1, precision="bf16"),
                        device=CPU)


def test_cpu_features_read_the_bf16_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx512f avx512_bf16\n")
    features = cpu_features(str(cpuinfo))
    assert features.name == "Test CPU" and features.avx512_bf16 and not features.amx_bf16 and features.native_bf16
    assert not cpu_features(str(tmp_path / "absent")).native_bf16


def test_predict_with_onnxruntime_end_to_end(example_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = make_model_folder(tmp_path / "models", example_dataset)
    outputs = {}
    for engine in ("torch", "onnxruntime"):
        outputs[engine] = tmp_path / engine
        result = CliRunner().invoke(app, ["predict", "-i", str(example_dataset / "imagesTs"), "-o",
                                          str(outputs[engine]), "-m", str(model.root), "--device", "cpu",
                                          "--no-tta", "--engine", engine])
        assert result.exit_code == 0, result.output
    for case in ("test_000", "test_001"):
        reference, _ = read_label(outputs["torch"] / f"{case}.nii.gz")
        labels, _ = read_label(outputs["onnxruntime"] / f"{case}.nii.gz")
        assert (labels == reference).mean() >= 0.999


def test_the_environment_report_names_every_registered_engine() -> None:
    """runtime.report reads engine versions from package metadata (it may not import inference): keep in step."""
    from autoseg.runtime.report import environment_report

    report = environment_report()
    assert set(report.engines) == set(installed_engines())
    assert {name for name, version in report.engines.items() if version} == \
        {name for name, version in installed_engines().items() if version}
