"""retrieve: folders of images -> convnet embeddings -> FAISS indexes, maps and visualisations."""

from __future__ import annotations

__version__ = "0.1.0"

# The public API is imported lazily so that `import retrieval` (and `retrieve --help`) stays fast:
# torch and faiss take seconds to import and most CLI paths only need one of them.
__all__ = ["Index", "IndexConfig", "open_index"]


def __getattr__(name: str):
    if name in ("Index", "open_index"):
        from retrieval import api

        return getattr(api, name)
    if name == "build_index":
        # Indexing is a batch job (pipelines/), which the library never imports.
        raise AttributeError("build_index is a batch job: from pipelines.index_folder import build_index")
    if name == "IndexConfig":
        from retrieval.config import IndexConfig

        return IndexConfig
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
