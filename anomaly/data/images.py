"""Reading images from disk as 8-bit RGB arrays, within a pixel limit.

8-bit greyscale and RGB PNGs (all of MVTec AD) are decoded by OpenCV, about
1.6x faster than Pillow on a 900x900 image and, PNG being lossless, with the
same pixels; every other file goes through Pillow.

Limits and rules, the same for every decoder:

* **Pixel limit.** An image of more than :func:`max_image_pixels` pixels (default
  100 million, e.g. 10000 x 10000; environment variable ``ANOMALY_MAX_IMAGE_PIXELS``)
  is refused from its header, before anything is decoded: a small compressed
  file can otherwise expand to gigabytes.
* **Alpha.** Every image with transparency (RGBA, LA, palette with a transparent
  colour) is composited onto black: a fully transparent pixel reads as black
  whatever its colour values.
* **Orientation.** An EXIF orientation tag is applied (the image as a viewer shows it), by
  both decoders, to images and masks alike.
* **Bit depth.** Integer greyscale images are scaled by their type's full range, as
  scikit-image's ``img_as_ubyte``: 65535 is white in a 16-bit image, 2**32 - 1 in an
  unsigned 32-bit one and 2**31 - 1 in a signed one (whose negative values are black).
* **Damaged files.** A PNG whose chunks fail their checksums is left to Pillow, whose
  error is reported in one line: the native decoder prints nothing of its own.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import os
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import get_worker_info

from anomaly.errors import UserError
from anomaly.outputs import MANIFEST

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS_VARIABLE = "ANOMALY_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
#: How files become arrays; part of the identity of cached images and features, so that a change
#: here recomputes them.
DECODING = (
    "8-bit RGB; EXIF orientation applied; integer greyscale scaled by its type's range, float by 255 "
    "or 65535; any alpha (RGBA, LA, palette) composited on black"
)


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (an image's identity; a weights file's checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: The most threads that read files at once (:func:`read_in_threads`).
MAX_READ_THREADS = 4

Key = TypeVar("Key")
Item = TypeVar("Item")


def read_threads() -> int:
    """Threads that read files at once (a batch's images, a list's digests): this process's cores,
    shared among the loader's worker processes (in a worker), at most :data:`MAX_READ_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    worker = get_worker_info()
    return max(1, min(MAX_READ_THREADS, cores // (worker.num_workers if worker is not None else 1)))


def read_in_threads(read: Callable[[Key], Item], keys: Sequence[Key]) -> list[Item]:
    """``[read(key) for key in keys]``, the keys shared among :func:`read_threads` threads (in order;
    the first failure in order is raised). Decoding, resizing and hashing run in OpenCV, Pillow and
    hashlib, which let other threads run meanwhile: a batch of large PNG files is read about twice
    as fast on two cores, and the loader's first batch of each pass arrives that much sooner
    (docs/benchmarks.md). The threads end with the call, so none is left when a loader forks its
    workers."""
    threads = min(len(keys), read_threads())
    if threads < 2:
        return [read(key) for key in keys]
    with ThreadPoolExecutor(threads, thread_name_prefix="read-images") as pool:
        return list(pool.map(read, keys))


def file_digests(paths: Sequence[str | Path]) -> list[str]:
    """The SHA-256 of each file (:func:`sha256_file`), read on threads (:func:`read_in_threads`)."""
    return read_in_threads(sha256_file, paths)


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may have: ``ANOMALY_MAX_IMAGE_PIXELS`` or 100 million."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_PIXELS_VARIABLE}={text} must be a positive number of pixels, e.g. 100000000")
    return value


def check_pixels(path: str | Path, width: int, height: int) -> None:
    """:class:`UserError` when a ``width`` x ``height`` image is over the pixel limit."""
    limit = max_image_pixels()
    if width * height > limit:
        raise UserError(
            f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}: "
            f"shrink it, or raise the limit with {MAX_PIXELS_VARIABLE}"
        )


# ----------------------------------------------------------------- folders
def require_folder(path: str | Path, what: str, fix: str) -> Path:
    """``path`` if it is a folder; else :class:`UserError` ``<what> '<path>' does not exist: <fix>``
    (or ``is a file, not a folder``)."""
    path = Path(path)
    if path.is_dir():
        return path
    problem = "is a file, not a folder" if path.exists() else "does not exist"
    raise UserError(f"{what} '{path}' {problem}: {fix}")


class SkippedFiles(Counter):
    """Why files in an image folder were not taken: reason -> count, and the first path of each."""

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, Path] = {}

    def add(self, reason: str, path: Path) -> None:
        self[reason] += 1
        self.examples.setdefault(reason, path)

    def describe(self, root: str | Path = "") -> str:
        """``<count> <reason> (e.g. <first path, below root>)``, joined."""
        counts = sorted(self.items())
        return ", ".join(f"{count} {reason}{self._example(reason, root)}" for reason, count in counts)

    def _example(self, reason: str, root: str | Path) -> str:
        if reason not in self.examples:
            return ""
        path = self.examples[reason]
        with contextlib.suppress(ValueError):
            path = path.relative_to(root) if str(root) else path
        return f" (e.g. {path})"


def skip_reason(path: Path) -> str | None:
    """Why ``path`` is not an image to read, or ``None`` when it is one."""
    if path.name.startswith("."):
        return "hidden"
    try:
        path.stat()
    except OSError as error:
        if not path.is_symlink():
            return f"unreadable ({error.strerror})"
        return "symbolic link loop" if error.errno == errno.ELOOP else "broken symbolic link"
    if path.is_dir():
        return "folder"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"unsupported type ({path.suffix.lower() or 'no extension'})"
    return None


def is_image_file(path: Path) -> bool:
    return skip_reason(path) is None


def scan_images(paths) -> tuple[list[Path], SkippedFiles]:
    """(the image files among ``paths``, sorted; why the others were skipped, hidden files and
    folders aside)."""
    images, skipped = [], SkippedFiles()
    for path in paths:
        reason = skip_reason(path)
        if reason is None:
            images.append(path)
        elif reason not in ("hidden", "folder"):
            skipped.add(reason, path)
    return sorted(images), skipped


def warn_skipped(where: str | Path, skipped: SkippedFiles) -> None:
    """One warning line naming how many files of ``where`` were skipped, and why."""
    if skipped:
        total = sum(skipped.values())
        warnings.warn(
            f"{where}: skipped {total} file(s) that are not readable images: {skipped.describe(where)} "
            f"(images are {', '.join(IMAGE_EXTENSIONS)})",
            stacklevel=3,
        )


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; a warning counts the files skipped."""
    if not folder.is_dir():
        return []
    images, skipped = scan_images(folder.iterdir())
    warn_skipped(folder, skipped)
    return images


def _inside(path: Path, folders: set[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` is a command's output folder (it holds the list of files it wrote)."""
    return (folder / MANIFEST).exists()


def walk_images(folder: Path, leave_out: Iterable[str | Path] = ()) -> tuple[list[Path], SkippedFiles]:
    """(the image files below ``folder``, at any depth, sorted; why the others were skipped).

    Symbolic links to folders are followed, except one back to a folder above it (a loop,
    reported). Hidden files and folders are left out without a word, and so are the
    folders ``leave_out`` and every command's output folder (:func:`is_output_folder`, e.g.
    ``anomaly predict --maps``); an unreadable folder is reported.
    """
    leave = {os.path.realpath(p) for p in leave_out}
    images, skipped = [], SkippedFiles()
    stack = [] if is_output_folder(folder) else [(folder, frozenset({os.path.realpath(folder)}))]
    while stack:
        directory, above = stack.pop()
        try:
            entries = sorted(directory.iterdir())
        except OSError as error:
            skipped.add(f"unreadable folder ({error.strerror})", directory)
            continue
        for path in entries:
            reason = skip_reason(path)
            if reason is None:
                images.append(path)
            elif reason == "folder":
                real = os.path.realpath(path)
                if real in above:
                    skipped.add("symbolic link loop", path)
                elif real not in leave and not is_output_folder(path):
                    stack.append((path, above | {real}))
            elif reason != "hidden":
                skipped.add(reason, path)
    return sorted(images), skipped


def refuse_name_pairs(spec: str | Path, files: Sequence[Path], fix: str) -> None:
    """:class:`UserError` where two of ``files`` differ only in their extension (``X.jpg`` beside
    ``X.png``): most likely an image and its mask, which would otherwise be fitted on, tested or
    calibrated on as an image of its own. ``fix``: what to do, ending the message."""
    by_stem: dict[Path, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.with_suffix(""), []).append(path)
    pairs = [sorted(paths) for paths in by_stem.values() if len(paths) > 1]
    if pairs:
        example = ", ".join(p.name for p in pairs[0])
        raise UserError(
            f"'{spec}' holds {len(pairs)} sets of images that differ only in their extension "
            f"(e.g. {example}): {fix}"
        )


def collect_images(
    spec: str | Path,
    exclude: Sequence[str] = (),
    leave_out: Iterable[str | Path] = (),
    option: str = "--input",
    warn: bool = True,
) -> list[Path]:
    """The image files named by ``spec``, sorted: a folder (at any depth, :func:`walk_images`), a glob,
    or one file. The one way every command (``fit``'s folders, ``predict --input``) lists images.

    A single file is taken whatever its extension, so that an unreadable one is reported
    rather than skipped. Files whose name matches a pattern of ``exclude`` (e.g. ``*.png``
    for masks beside JPEG images), files in the folders ``leave_out`` below ``spec`` and
    files in a command's output folder are left out. A warning counts whatever else was
    skipped, and why. :class:`UserError` for an empty ``spec``, one that names nothing,
    and a glob that matches folders only (``**`` searches inside them).
    """
    text = str(spec)
    if not text.strip():
        raise UserError(f"{option} is empty (an unset variable?): give a folder, a glob or an image file")
    path = Path(text).expanduser()
    folders: list[Path] = []
    if path.is_dir():
        images, skipped = walk_images(path, leave_out)
    elif path.is_file():
        images, skipped = [path], SkippedFiles()
    elif glob.has_magic(text):
        matches = [Path(p) for p in glob.iglob(str(path), recursive=True)]
        folders = [p for p in matches if p.is_dir()]
        images, skipped = scan_images(p for p in matches if not p.is_dir())
        leave = {os.path.realpath(p) for p in leave_out}
        outputs = {folder for folder in {p.parent for p in images} if is_output_folder(folder)}
        images = [p for p in images if p.parent not in outputs and not (leave and _inside(p, leave))]
    else:
        raise UserError(
            f"{option} not found: {spec} (give a folder, a glob such as 'dir/*.png', or an image file)"
        )
    images = [p for p in images if not any(fnmatch.fnmatch(p.name, pattern) for pattern in exclude)]
    if folders and not images:
        raise UserError(
            f"{option} '{spec}' matches only folders (e.g. {sorted(folders)[0]}): a glob takes files; "
            f"give the folder itself, or use ** to search inside them, e.g. '{Path(text).parent}/**/*.png'"
        )
    if warn:
        warn_skipped(spec, skipped)
    return images


# ---------------------------------------------------------------- decoding
TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 339, 2


def _signed(image: Image.Image) -> bool:
    """Whether 32-bit integer pixels are signed: Pillow holds them as signed ``I``, but an
    unsigned TIFF (the default sample format) stores them unsigned."""
    tags = getattr(image, "tag_v2", None)
    return tags is None or int(np.atleast_1d(tags.get(TIFF_SAMPLE_FORMAT, 1))[0]) == TIFF_SIGNED


def _grey_levels(image: Image.Image, signed: bool) -> tuple[np.ndarray, float] | None:
    """(values, full-scale value) of a greyscale image deeper than 8 bits; None for other modes.

    Float images keep their rule: 0..255, or 0..65535 when they exceed 255.
    """
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float64), 65535.0
    if image.mode == "I":
        raw = np.asarray(image, dtype=np.int32)
        if signed:
            return raw.astype(np.float64), float(2**31 - 1)
        return raw.view(np.uint32).astype(np.float64), float(2**32 - 1)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return array, 65535.0 if array.max() > 255 else 255.0
    return None


def _upright_8bit(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it (its EXIF orientation applied), greyscale deeper than 8 bits
    rescaled to 8 bits (see :func:`_grey_levels`)."""
    signed = _signed(image)
    image = ImageOps.exif_transpose(image)
    levels = _grey_levels(image, signed)
    if levels is None:
        return image
    array, top = levels
    return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def _on_black(image: Image.Image) -> Image.Image:
    """The documented alpha rule: any image with transparency is composited onto opaque black."""
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if not has_alpha:
        return image
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, image)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_GREY, PNG_RGB = 0, 2  # IHDR colour types without alpha or palette


#: Ancillary chunks about which libpng prints warnings of its own (an ICC profile it dislikes).
PNG_NOISY_CHUNKS = {b"iCCP"}


def _png_chunks_intact(data: bytes) -> bool:
    """Whether every chunk after the signature is whole, passes its CRC and is not a noisy one."""
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, end = data[at + 4 : at + 8], at + 12 + length
        if end > len(data) or kind in PNG_NOISY_CHUNKS:
            return False
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[at + 4 : end - 4]) != crc:
            return False
        if kind == b"IEND":
            return end == len(data)
        at = end
    return False


def _plain_png(path: str | Path) -> tuple[bytes, tuple[int, int]] | None:
    """(the file's bytes, (width, height)) of an intact 8-bit greyscale or RGB PNG, else None.

    The IHDR chunk holds width and height at bytes 16..24, bit depth at byte 24 and
    colour type at byte 25. A truncated or damaged file (a chunk failing its CRC) goes
    to Pillow, whose error is reported in one line; OpenCV's libpng would also print
    its own ``libpng error`` line.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(26)
            plain = (
                len(head) == 26
                and head[:8] == PNG_SIGNATURE
                and head[12:16] == b"IHDR"
                and head[24] == 8
                and head[25] in (PNG_GREY, PNG_RGB)
            )
            if not plain:
                return None
            size = struct.unpack(">II", head[16:24])
            check_pixels(path, *size)  # before the whole file is read
            data = head + handle.read()
    except OSError:
        return None
    return (data, size) if data.endswith(PNG_END) and _png_chunks_intact(data) else None


#: OpenCV's flag for decoding straight to RGB (OpenCV 4.11 on); before it, BGR is converted after.
IMREAD_RGB: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """OpenCV's decoding of a plain PNG as RGB, EXIF orientation applied (as for Pillow's)."""
    buffer = np.frombuffer(data, np.uint8)
    if IMREAD_RGB is not None:
        return cv2.imdecode(buffer, IMREAD_RGB)
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _open_checked(path: str | Path) -> Image.Image:
    """Pillow's lazy open (the header only), refused over the pixel limit before any decoding.

    Pillow's own bomb check (a multi-line warning, an error at twice its limit) is
    replaced by ours: its limit follows ours, and its warning is silenced.
    """
    limit = max_image_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise UserError(f"image {path} is over the limit of {limit:,} pixels ({error})") from None
    try:
        check_pixels(path, *image.size)
    except UserError:
        image.close()
        raise
    return image


def load_rgb(path: str | Path) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array; greyscale, palette and alpha images become RGB."""
    plain = _plain_png(path)
    if plain is not None:
        image = _decode_plain_png(plain[0])
        if image is not None:
            return image
    try:
        with _open_checked(path) as image, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _on_black(_upright_8bit(image))
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot read image {path}: {error}") from error


def load_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as an (H, W) bool array (any non-zero pixel is anomalous)."""
    try:
        with _open_checked(path) as image:
            return np.asarray(_upright_8bit(image).convert("L")) > 0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot read mask {path}: {error}") from error
