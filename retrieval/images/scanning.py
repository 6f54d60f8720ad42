"""Finding image files: a deterministic recursive scan that follows symlinks safely."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import BadImageError
from retrieval.paths import user_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageFileEntry:
    """One file found by `scan`: its path relative to the root and its label (parent folder)."""

    path: Path  # absolute (symlinks kept as found, so paths stay under the root)
    relpath: str  # posix, relative to the scanned root
    label: str
    size: int  # bytes
    mtime: float
    # Status change time: a rename, `mv` over the file or `touch -r` moves it even when size and
    # mtime stay (files swapped by name, copies made with `cp -p`), so resume re-embeds them.
    ctime: float = 0.0
    inode: int = 0  # 0: unknown (a file system without them)
    mtime_ns: int = 0


def label_of(relpath: str, root: Path) -> str:
    parent = Path(relpath).parent
    return parent.name if parent.name else root.name


def scan(root: str | os.PathLike) -> tuple[list[ImageFileEntry], list[tuple[str, str]]]:
    """Find image files below `root` in sorted (deterministic) order, following symlinks safely.

    Returns (entries, problems): problems are (relpath, reason) for entries that cannot even be
    stat'ed (dangling links, permission denied), for the skip ledger.
    """
    root = user_path(root).absolute()
    if not root.is_dir():
        raise BadImageError(f"{root} is not a folder.")
    entries: list[ImageFileEntry] = []
    problems: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()
    real_root = root.resolve()

    def walk(directory: Path) -> None:
        try:
            st = directory.stat()
        except OSError as exc:
            problems.append((_printable(directory.relative_to(root).as_posix()), f"unreadable folder: {exc}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # a symlink loop or a second link to a folder already indexed
            return
        seen_dirs.add(key)
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.append((_printable(directory.relative_to(root).as_posix()) or ".", f"unreadable: {exc}"))
            return
        subdirs = []
        for child in children:
            if child.name.startswith("."):
                continue  # hidden files and our own staging folders
            path = Path(child.path)
            rel = path.relative_to(root).as_posix()
            try:
                if child.is_dir(follow_symlinks=True):
                    # A link to a folder inside the root is walked where it really is: followed
                    # here, it would claim that folder's images under its own name (its class
                    # would vanish into the link's). Links to folders elsewhere are followed.
                    inside = child.is_symlink() and _walked_anyway(path.resolve(), real_root)
                    if not inside and not is_index_dir(path):  # an index inside the folder it indexes
                        subdirs.append(path)
                    continue
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                st = child.stat(follow_symlinks=True)
            except OSError as exc:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    problems.append((_printable(rel), f"cannot stat: {exc.strerror or exc}"))
                continue
            shown = _printable(rel)
            if shown != rel:
                # Paths are stored as UTF-8 text (metadata, pages, JSON): one that is not cannot be
                # kept and found again, so it is skipped, shown with its raw bytes escaped.
                problems.append((shown, "file name is not valid UTF-8: rename it to index it"))
                continue
            entries.append(
                ImageFileEntry(
                    path,
                    rel,
                    label_of(rel, root),
                    st.st_size,
                    st.st_mtime,
                    st.st_ctime,
                    st.st_ino,
                    st.st_mtime_ns,
                )
            )
        for sub in subdirs:
            walk(sub)

    walk(root)
    return entries, problems


def _walked_anyway(target: Path, real_root: Path) -> bool:
    """Whether the scan reaches folder `target` by itself: under the root and not hidden (a link
    to `.store/cats` is the only way in to that folder, so it is followed)."""
    if not target.is_relative_to(real_root):
        return False
    return not any(part.startswith(".") for part in target.relative_to(real_root).parts)


def _printable(rel: str) -> str:
    """`rel` itself, or with the bytes of a non-UTF-8 name escaped (`caf\\xe9.png`)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def is_index_dir(path: Path) -> bool:
    """A `retrieve` index directory (its maps and sheets are outputs, never inputs)."""
    manifest = path / "manifest.json"
    if (path / ".staging" / "run.json").exists():
        return True
    try:
        return manifest.is_file() and b'"retrieve-index"' in manifest.read_bytes()[:4096]
    except OSError:
        return False


def content_hash(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes, hex (read in 1 MB blocks: a 100 MP TIFF is not held at once)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
