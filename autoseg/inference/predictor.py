"""Predictor: the trained networks of one model folder, ready to segment arrays or files.

`Predictor.from_folder(folder)` rebuilds the network from the folder's plan and loads each fold's
weights (weights_only); `predict(images, geometry=...)` preprocesses exactly as in training, slides
the window, averages the folds and returns the label map on the input's own grid. A cascade stage
(3d_cascade_fullres) also needs `previous=`: the previous stage's label map of the same scan.
`PredictOptions.engine` runs each fold's network with another CPU engine (OpenVINO, ONNX Runtime; see
autoseg.inference.engines).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoseg.dataset.contract import Dataset
from autoseg.dataset.load import read_dataset_json
from autoseg.errors import SettingsError
from autoseg.inference.engines import CompiledNetwork, CompileSpec, prepare_network
from autoseg.inference.export import LabelSemantics, restore_prediction
from autoseg.inference.probability_file import ProbabilityFile, save_probabilities_file
from autoseg.inference.sliding import WindowSettings, sliding_window_logits, sliding_window_slabs
from autoseg.inference.streaming import StreamedLabels, streamed_export_is_exact
from autoseg.inference.tiling import mirror_combinations
from autoseg.io.geometry import DUMMY_2D_SPACING, Geometry
from autoseg.io.readers import read_images, read_label
from autoseg.log import get_logger
from autoseg.model_folder import (
    CheckpointError,
    ModelFolder,
    PreviousStage,
    load_checkpoint,
    network_in_channels,
    previous_stage,
)
from autoseg.planning.contract import Configuration, Plans
from autoseg.preprocessing.case import case_properties, preprocess_arrays
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.previous import one_hot, to_preprocessed_grid
from autoseg.runtime.device import keep_freed_memory, pick_device, precision_dtype

log = get_logger("inference")


@dataclass(frozen=True)
class Prediction:
    """A label map (z, y, x) on the input's grid, its geometry, and probabilities (c, z, y, x) if asked."""

    labels: np.ndarray
    geometry: Geometry
    probabilities: np.ndarray | None = None


#: Input voxels of one network call up to which mirrored copies are stacked on the CPU (a 40x56x40 patch:
#: all 8 copies in one call; 128^3: one copy a call). Measured in docs/benchmarks.md ("mirrors per call").
CPU_CALL_VOXELS = 1 << 20

#: Volumes (voxels on the network's grid) from which on an engine's intermediate buffers are freed after the
#: last tile: the last rows' logits and the export cannot reuse an engine's pool (CompiledNetwork.release_memory),
#: and allocating it again costs milliseconds, negligible beside the minutes of a volume this large (256^3).
RELEASE_ENGINE_MEMORY_VOXELS = 1 << 24


@dataclass(frozen=True)
class PredictOptions:
    """Knobs of prediction; every one is a flag of `autoseg predict`."""

    folds: tuple[str, ...] | None = None  # None: every fold with the checkpoint
    checkpoint: str = "final"
    device: str = "auto"
    tta: bool = True
    step_size: float = 0.5
    tiles_per_batch: int | None = None  # None: 1 on CPU, the plan's batch size on a GPU
    amp: bool = True
    cpu_bf16: bool = False  # the older spelling of precision="bf16" on CPU
    #: auto (mixed precision on CUDA; on CPUs bf16 where native, else fp32), fp32 or bf16 (faster with native bf16; the
    #: output changes slightly: docs/inference.md)
    precision: str = "auto"
    engine: str = "torch"  # auto, torch, openvino or onnxruntime (autoseg.inference.engines; CPU engines)
    accumulator: str = "float32"  # or float16: half the memory of the sliding window's open rows
    #: mirrored copies per network call (None: on CPU as many as keep a call under CPU_CALL_VOXELS; 1 on GPU)
    mirrors_per_call: int | None = None


class Predictor:
    """Networks of one configuration (one per fold) and what is needed to use them."""

    def __init__(self, networks: Sequence[nn.Module] | None, *, plans: Plans, config: Configuration,
                 dataset: Dataset, window: WindowSettings | None, device: torch.device, amp: torch.dtype | None,
                 source: Path | None = None, folds: tuple[str, ...] = (),
                 loader: Callable[[], tuple[list[nn.Module], WindowSettings]] | None = None) -> None:
        """`networks` and `window` may be None with a `loader` that returns them: the weights are then read on
        first use (`load()`), so a rerun whose cases are all written already never reads a checkpoint."""
        if networks is None and loader is None:
            raise ValueError("Predictor needs networks and a window, or a loader")
        self._networks = None if networks is None else list(networks)
        self._window, self._loader = window, loader
        self.source, self.folds = source, folds
        self.plans, self.config, self.dataset = plans, config, dataset
        self.semantics = LabelSemantics.from_dataset(dataset)
        self.device, self.amp = device, amp
        self.previous: PreviousStage | None = previous_stage(config, dataset)

    def load(self) -> None:
        """Read and prepare the networks now (checkpoint errors surface here, once, not per case)."""
        if self._networks is None:
            assert self._loader is not None
            self._networks, self._window = self._loader()

    @property
    def networks(self) -> list[nn.Module]:
        self.load()
        return self._networks  # type: ignore[return-value]

    @property
    def window(self) -> WindowSettings:
        if self._window is None:
            self.load()
        return self._window  # type: ignore[return-value]

    @classmethod
    def from_folder(cls, folder: str | Path, options: PredictOptions | None = None) -> Predictor:
        """Open a model folder (`<results>/<dataset>/<configuration>__<plans>`) for prediction: plans, labels
        and folds now, the weights on first use (`load()`)."""
        options = options or PredictOptions()
        model = ModelFolder(Path(folder))
        plans = model.load_plans()
        config = plans.configurations[configuration_name(model, plans)]
        dataset = read_dataset_json(model.dataset_file)
        checkpoint = checkpoint_to_use(model, options.checkpoint)
        folds = options.folds or _available_folds(model, checkpoint)
        device = pick_device(options.device)
        if device.type == "cpu":  # every tile frees and reallocates large activations: 2.2x faster (benchmarks.md)
            keep_freed_memory()
        tiles = options.tiles_per_batch or (1 if device.type == "cpu" else config.batch_size)
        precision = "bf16" if options.cpu_bf16 and device.type == "cpu" else options.precision
        amp = precision_dtype(device, precision if options.amp else "fp32")
        spec = CompileSpec(patch=tuple(config.patch_size), in_channels=network_in_channels(plans, config, dataset),
                           tiles=tiles, precision="bf16" if amp == torch.bfloat16 and device.type == "cpu" else "fp32",
                           threads=torch.get_num_threads())
        accumulator = check_accumulator(options.accumulator)

        def load_networks() -> tuple[list[nn.Module], WindowSettings]:
            loaded = [load_fold_network(model, fold, checkpoint, plans, config, dataset) for fold in folds]
            mirror_axes = tuple(a for a in loaded[0][1] if all(a in axes for _, axes in loaded)) if options.tta else ()
            copies = mirrors_per_call(options.mirrors_per_call, len(mirror_combinations(mirror_axes)), tiles,
                                      config.patch_size, device)
            call = dataclasses.replace(spec, tiles=tiles * copies)  # engines compile for the stacked batch
            networks = [prepare_network(network.to(device), engine=options.engine, spec=call, device=device,
                                        checkpoint=model.checkpoint(fold, checkpoint))
                        for fold, (network, _) in zip(folds, loaded)]
            window = WindowSettings(patch=tuple(config.patch_size), step=options.step_size, mirror_axes=mirror_axes,
                                    tiles_per_batch=tiles, accumulator=accumulator, mirrors_per_call=copies)
            engines = sorted({getattr(network, "engine", "torch") for network in networks})
            log.info("loaded %s (folds %s) on %s with the %s engine; test-time mirroring over axes %s",
                     model.root.name, ", ".join(folds), device, "/".join(engines), window.mirror_axes or "none")
            return networks, window

        return cls(None, plans=plans, config=config, dataset=dataset, window=None, device=device, amp=amp,
                   source=model.root.resolve(), folds=tuple(folds), loader=load_networks)

    @property
    def num_channels(self) -> int:
        """Image channels of a scan (a cascade's previous-stage channels come on top)."""
        return len(self.plans.channel_names)

    def predict_logits(self, data: np.ndarray, *, after_last_call: Callable[[], None] | None = None) -> np.ndarray:
        """Mean logits (classes, z, y, x) over folds and mirrors for a preprocessed volume (c, z, y, x);
        `after_last_call` runs once every tile has been through the networks (see _release_after_window)."""
        logits = sliding_window_logits(self.networks, data, self.window, num_classes=self.plans.num_classes,
                                       device=self.device, amp=self.amp, after_last_call=after_last_call)
        return logits.numpy()

    def predict_preprocessed(self, data: np.ndarray, properties: CaseProperties, *,
                             previous: np.ndarray | None = None, with_probabilities: bool = False,
                             probabilities_file: Path | None = None) -> Prediction:
        """A case already on the network's grid (e.g. from the training cache) -> its original grid.

        previous: for a cascade stage, the previous stage's label map (z, y, x) on the same grid as `data`.
        with_probabilities: also return the class probabilities (held in memory for the whole volume);
        probabilities_file: write them to this CASE.npz instead, a few rows at a time.
        """
        data = self._with_previous(data, previous)
        release = self._release_after_window(data)
        if with_probabilities or not streamed_export_is_exact(data.shape[1:], properties, self.config):
            return self._predict_whole_volume(data, properties, with_probabilities, probabilities_file, release)
        sink = None if probabilities_file is None else ProbabilityFile(
            probabilities_file, properties, plans=self.plans, classes=self.plans.num_classes,
            background_outside=not self.semantics.is_regions)
        try:  # labels (and probabilities) decided slab by slab while the window slides
            labels = StreamedLabels(data.shape[1:], properties, plans=self.plans, config=self.config,
                                    semantics=self.semantics, num_classes=self.plans.num_classes, probabilities=sink)
            for slab in sliding_window_slabs(self.networks, data, self.window, num_classes=self.plans.num_classes,
                                             device=self.device, amp=self.amp, after_last_call=release):
                labels.add(slab.start, slab.logits.numpy())
            return Prediction(labels=labels.finish(), geometry=properties.geometry)
        finally:
            if sink is not None:
                sink.close()

    def _predict_whole_volume(self, data: np.ndarray, properties: CaseProperties, with_probabilities: bool,
                              probabilities_file: Path | None, release: Callable[[], None] | None) -> Prediction:
        """The logits of the whole volume at once: for probabilities asked as an array, and for plans whose
        export cannot go row by row (streamed_export_is_exact)."""
        logits = self.predict_logits(data, after_last_call=release)
        want = with_probabilities or probabilities_file is not None
        restored, probabilities = restore_prediction(logits, properties, plans=self.plans, config=self.config,
                                                     semantics=self.semantics, with_probabilities=want)
        if probabilities_file is not None and not with_probabilities:
            save_probabilities_file(probabilities_file, probabilities)
            probabilities = None
        return Prediction(labels=restored, geometry=properties.geometry, probabilities=probabilities)

    def _release_after_window(self, data: np.ndarray) -> Callable[[], None] | None:
        """What frees the engines' buffers after the last tile of a volume (c, z, y, x) of at least
        RELEASE_ENGINE_MEMORY_VOXELS; None for smaller ones, whose next case reuses the buffers."""
        return self.release_engine_memory if int(np.prod(data.shape[1:])) >= RELEASE_ENGINE_MEMORY_VOXELS else None

    def release_engine_memory(self) -> None:
        """Free the intermediate buffers of the networks compiled by an engine (torch's need nothing)."""
        for network in self.networks:
            if isinstance(network, CompiledNetwork):
                network.release_memory()

    def predict(self, images: np.ndarray, *, geometry: Geometry | None = None,
                spacing: Sequence[float] | None = None, previous: np.ndarray | None = None,
                with_probabilities: bool = False, probabilities_file: Path | None = None) -> Prediction:
        """Segment one scan: images (c, z, y, x) as read, with its geometry or just its spacing (z, y, x).

        previous: for a cascade stage, the previous stage's label map of this scan (z, y, x), as read.
        with_probabilities / probabilities_file: see predict_preprocessed.
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 3:
            images = images[None]
        geometry = geometry or _geometry_from_spacing(images.shape[1:], spacing)
        if images.shape[0] != self.num_channels:
            raise SettingsError(f"the scan has {images.shape[0]} channel(s), the model expects {self.num_channels} "
                                f"({', '.join(self.plans.channel_names)})",
                                hint="give every channel as CASE_0000, CASE_0001, ... in the model's order")
        self._check_dimension(geometry)
        self._check_previous(previous)
        prepared = preprocess_arrays(images, None, geometry, plans=self.plans, config=self.config)
        properties = case_properties("", images.shape, geometry, prepared, plans=self.plans)
        if self.previous is not None and previous is not None:
            previous = to_preprocessed_grid(previous, properties, plans=self.plans, config=self.config)
        return self.predict_preprocessed(prepared.data, properties, previous=previous,
                                         with_probabilities=with_probabilities, probabilities_file=probabilities_file)

    def _check_previous(self, previous: np.ndarray | None) -> None:
        """A previous-stage segmentation is given exactly when the model is a cascade stage."""
        if self.previous is None and previous is not None:
            raise SettingsError(f"{self.config.name} takes no previous-stage segmentation",
                                hint="leave out previous= / --prev-stage (only cascade stages use it)")
        if self.previous is not None and previous is None:
            stage = self.previous.configuration
            raise SettingsError(f"{self.config.name} needs the {stage} segmentation of the scan",
                                hint=f"pass previous=<{stage} label map>, or `--prev-stage DIR` with its "
                                     f"predictions (or let `autoseg predict` run {stage} first)")

    def _with_previous(self, data: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The network's input: data, plus the previous stage's one-hot channels for a cascade stage."""
        self._check_previous(previous)
        if self.previous is None or previous is None:
            return data
        stage = self.previous.configuration
        if tuple(previous.shape) != tuple(data.shape[1:]):
            raise SettingsError(f"the {stage} segmentation has shape {previous.shape}, the scan {data.shape[1:]}",
                                hint="give the previous stage's prediction of this very scan")
        channels = one_hot(previous, self.previous.values)
        return np.concatenate([np.asarray(data, dtype=np.float32), channels], axis=0)

    def _check_dimension(self, geometry: Geometry) -> None:
        trained_on_2d_images = self.plans.original_median_spacing[0] == DUMMY_2D_SPACING
        if geometry.dim == 2 and not trained_on_2d_images:
            raise SettingsError("this is a 2D image but the model was trained on 3D scans",
                                hint="give the whole 3D volume (one file per channel), not a single slice")

    def predict_files(self, paths: Sequence[str | Path], *, previous: str | Path | None = None,
                      with_probabilities: bool = False) -> Prediction:
        """Read a case's channel files (in channel order) and segment it; `previous`: the previous
        stage's label file (cascade stages)."""
        images, geometry = read_images(paths)
        previous_labels = None if previous is None else read_label(previous)[0]
        return self.predict(images, geometry=geometry, previous=previous_labels,
                            with_probabilities=with_probabilities)


def mirrors_per_call(requested: int | None, mirrors: int, tiles: int, patch: Sequence[int],
                     device: torch.device) -> int:
    """Mirrored copies per network call: `requested` (at most the mirrors there are), else on the CPU as many
    as keep one call's input under CPU_CALL_VOXELS voxels (small patches: the cores stay busier on one
    larger call), and 1 on a GPU (nnU-Net's way; a GPU is already busy with one copy, and memory is tight)."""
    if requested is not None:
        if requested < 1:
            raise SettingsError(f"mirrors per call must be at least 1, not {requested}", hint="pass 1 or more")
        return max(1, min(requested, mirrors))
    if device.type != "cpu":
        return 1
    voxels = tiles * int(np.prod([int(n) for n in patch]))
    return max(1, min(mirrors, CPU_CALL_VOXELS // max(voxels, 1)))


def check_accumulator(name: str) -> str:
    from autoseg.inference.sliding import ACCUMULATORS

    if name not in ACCUMULATORS:
        raise SettingsError(f"unknown accumulator {name!r}", hint=f"choose one of: {', '.join(ACCUMULATORS)}")
    return name


def configuration_name(model: ModelFolder, plans: Plans) -> str:
    name = model.root.name.split("__")[0]
    if name not in plans.configurations:
        raise CheckpointError(f"the folder name does not start with a configuration of its plan ({name!r})",
                              path=model.root, hint="keep the folder's name as `autoseg train` wrote it")
    return name


def checkpoint_to_use(model: ModelFolder, requested: str) -> str:
    """`requested`, except that a folder without any final checkpoint but with exactly one other kind
    (a model exported or installed with `--checkpoint best`) uses that kind, with a warning."""
    if requested != "final" or model.folds("final"):
        return requested
    kinds = [kind for kind in ("best", "latest") if model.folds(kind)]
    if len(kinds) != 1:
        return requested
    log.warning("%s has no final checkpoint; using checkpoint_%s (pass --checkpoint to choose)",
                model.root.name, kinds[0])
    return kinds[0]


def _available_folds(model: ModelFolder, checkpoint: str) -> tuple[str, ...]:
    folds = model.folds(checkpoint)
    if not folds:
        raise CheckpointError(f"no fold has a checkpoint_{checkpoint}.pt", path=model.root,
                              hint="train at least one fold to the end, or pass --checkpoint latest/best")
    return folds


def load_fold_network(model: ModelFolder, fold: str, checkpoint: str, plans: Plans, config: Configuration,
                  dataset: Dataset) -> tuple[nn.Module, tuple[int, ...]]:
    from autoseg.model.build import build_network

    payload = load_checkpoint(model.checkpoint(fold, checkpoint))
    in_channels = network_in_channels(plans, config, dataset)
    network = build_network(config.topology, in_channels=in_channels, num_classes=plans.num_classes)
    try:
        network.load_state_dict(payload["network"])
    except RuntimeError as err:
        raise CheckpointError("the checkpoint does not fit the folder's plan", path=model.checkpoint(fold, checkpoint),
                              hint="the folder mixes runs of different plans; retrain this fold") from err
    network.deep_supervision = False
    network.eval()
    return network, tuple(payload.get("mirror_axes", range(config.dim)))


def _geometry_from_spacing(shape: Sequence[int], spacing: Sequence[float] | None) -> Geometry:
    if spacing is None or len(spacing) != len(shape):
        raise SettingsError("predict() needs the scan's geometry or its spacing (one value per axis, z y x)",
                            hint="pass geometry=Geometry from autoseg.io.read_images, or spacing=(sz, sy, sx)")
    dim = len(shape)
    identity = tuple(float(i == j) for i in range(dim) for j in range(dim))
    return Geometry(shape=tuple(int(s) for s in shape), file_spacing=tuple(float(s) for s in reversed(spacing)),
                    origin=(0.0,) * dim, direction=identity)
