"""Sharing trained models: model archives (export, checked install) and ONNX export of a network."""

from autoseg.sharing.archive import ArchivedModel, ArchiveError, ArchiveManifest, export_model, read_manifest
from autoseg.sharing.install import InstalledModel, install_model

__all__ = ["ArchiveError", "ArchiveManifest", "ArchivedModel", "InstalledModel", "export_model", "install_model",
           "read_manifest"]
