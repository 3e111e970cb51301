"""Export a hybrid as a self-contained Hugging Face folder, loadable without dtr_core."""

from .hf_folder import ExportManifest, export_hybrid

__all__ = ["ExportManifest", "export_hybrid"]
