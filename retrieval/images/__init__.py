"""Images: scan folders, decode files through a Decoder, and decode whole folders crash-isolated."""

from __future__ import annotations

from retrieval.images.decode import (
    MAX_PIXELS,
    Decoder,
    PILDecoder,
    Transform,
    load_tensor,
    open_image,
)
from retrieval.images.isolate import decode_all
from retrieval.images.loader import CRASH_SIGNALS, Batch, ImageDataset, collate, file_row
from retrieval.images.policy import IsolationPolicy
from retrieval.images.scanning import (
    IMAGE_EXTENSIONS,
    ImageFileEntry,
    content_hash,
    is_index_dir,
    label_of,
    scan,
)
from retrieval.images.thumbs import placeholder, square_thumbnail

__all__ = [
    "CRASH_SIGNALS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "Batch",
    "Decoder",
    "ImageDataset",
    "ImageFileEntry",
    "IsolationPolicy",
    "PILDecoder",
    "Transform",
    "collate",
    "content_hash",
    "decode_all",
    "file_row",
    "is_index_dir",
    "label_of",
    "load_tensor",
    "open_image",
    "placeholder",
    "scan",
    "square_thumbnail",
]
