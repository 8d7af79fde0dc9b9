"""The engine cache: each network's ONNX export and the verdicts of verifying engines on it, kept across runs.

Layout: `<root>/<model key>/model.onnx` (the export, shared by every engine: its batch axis is dynamic),
`entry.json` (what the key was made from, for a person looking at the folder), `verified.json` (one
verdict per engine, engine version, precision and tiles per call), and one folder per engine for its own
files (OpenVINO's compiled blobs). The model key hashes the weights, the architecture (the network's
repr: layer types, kernels, strides, norms), input channels, patch and the torch version that exported
it, so a retrained checkpoint, another plan or another torch gets a new folder and stale files are never
used. Removing the root folder is always safe: the next run exports again.

Weights are identified by the sha256 of the checkpoint file. Hashing the whole file is correct where
size + mtime + a prefix are not (a checkpoint copied or rewritten in the same second keeps both, and the
prefix is the pickle header, the same for every run of a plan), and cheap: sha256 runs at about
1.7 GB/s here (SHA extensions), 0.03 s for the ~45 MB checkpoint (weights and optimizer state) of a
5.6 M-parameter Hippocampus network, ~0.15 s for a 31 M-parameter CT network, against seconds to minutes
of prediction. It is memoised per process by (path, size, mtime) so a file is hashed once per run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from autoseg.inference.engines.base import CompileSpec
from autoseg.serialization import atomic_write

CACHE_VARIABLE = "AUTOSEG_ENGINE_CACHE"
ONNX_FILE = "model.onnx"
_CACHE_FORMAT = 1
_CHUNK = 1 << 20
_file_digests: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """$AUTOSEG_ENGINE_CACHE, else $XDG_CACHE_HOME/autoseg/engines, else ~/.cache/autoseg/engines."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "autoseg" / "engines"


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, memoised per process by (path, size, mtime_ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _file_digests:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        _file_digests[memo] = digest.hexdigest()
    return _file_digests[memo]


def weights_digest(network: nn.Module) -> str:
    """sha256 of the network's state (names and raw bytes), for a network that has no checkpoint file."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str(data.dtype).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelKey:
    """What identifies one exported network (see the module docstring)."""

    weights: str
    architecture: str
    in_channels: int
    patch: tuple[int, ...]
    torch: str
    format: int = _CACHE_FORMAT

    @classmethod
    def of(cls, network: nn.Module, spec: CompileSpec, *, checkpoint: Path | None = None) -> ModelKey:
        weights = file_digest(checkpoint) if checkpoint is not None else weights_digest(network)
        architecture = hashlib.sha256(f"{type(network).__qualname__}\n{network!r}".encode()).hexdigest()
        return cls(weights=weights, architecture=architecture, in_channels=spec.in_channels,
                   patch=tuple(int(p) for p in spec.patch), torch=torch.__version__)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


class CacheEntry:
    """The cache folder of one exported network."""

    def __init__(self, key: ModelKey, root: Path | None = None) -> None:
        self.key = key
        self.path = (root or cache_root()) / key.digest()

    @property
    def onnx(self) -> Path:
        return self.path / ONNX_FILE

    def workdir(self, engine: str) -> Path:
        """A folder for the engine's own files (the engine creates it if it keeps any)."""
        return self.path / engine

    def describe(self, *, checkpoint: Path | None, exporter: str) -> None:
        """Write entry.json: the key in words, where the weights came from and which exporter ran."""
        record = {**asdict(self.key), "checkpoint": None if checkpoint is None else str(checkpoint),
                  "exporter": exporter}
        _write_json(self.path / "entry.json", record)

    def verdict(self, name: str) -> dict | None:
        """The stored verification record `name` (see verify.verdict_name), or None."""
        return self._verdicts().get(name)

    def record_verdict(self, name: str, record: dict) -> None:
        verdicts = self._verdicts()
        verdicts[name] = record
        _write_json(self.path / "verified.json", verdicts)

    def _verdicts(self) -> dict:
        path = self.path / "verified.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # absent or damaged: verify again
            return {}
        return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))
