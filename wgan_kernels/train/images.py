"""Image datasets for the GAN trainer, read from local files only (nothing is downloaded).

``load_images(spec, resolution)`` reads ``folder:PATH`` (PNG/JPEG tree), ``cifar10:PATH`` (the
CIFAR-10 python batches, via a restricted unpickler) or ``tensor:PATH`` (``.npz`` / ``.pt``) into an
:class:`ImageData` of float32 images in [-1, 1], N x C x R x R. ``save_grid`` writes a PNG grid of
samples laid out like torchvision's ``make_grid``. Every bad input raises ``ValueError`` inside
``load_images``, before any training starts.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PREFIXES = ("folder", "cifar10", "tensor")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
RESAMPLE = Image.LANCZOS  # resize filter for folder images (antialiased when shrinking)
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # decoded as floats, not via 8-bit
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_DEFAULT_BUDGET = 2 << 30  # 2 GiB
_RANGE_SLACK = 1e-3


# ---------------------------------------------------------------------------------------------
# the dataset object


class ImageData:
    """N images of shape (C, R, R) in [-1, 1], held in memory or decoded from files per batch."""

    def __init__(self, name: str, data: torch.Tensor | None = None, *, files: list[Path] | None = None,
                 rel_paths: list[str] | None = None, sizes: list[int] | None = None,
                 resolution: int | None = None, channels: int | None = None):
        self.name = name
        self._data = data
        self._files = files
        self._rel_paths = rel_paths
        self._sizes = sizes
        self._resolution = resolution
        self._channels = channels
        self._digest: str | None = None
        if data is not None:
            self.shape = tuple(int(s) for s in data.shape[1:])
            self._n = int(data.shape[0])
        else:
            assert files is not None and resolution is not None and channels is not None
            self.shape = (channels, resolution, resolution)
            self._n = len(files)

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "streamed"
        return f"ImageData({self.name!r}, n={self._n}, shape={self.shape}, {where})"

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError("ImageData: index with a 1-D integer tensor")
        if self._data is not None:
            return self._data[idx]
        out = torch.empty((idx.numel(),) + self.shape, dtype=torch.float32)
        for row, i in enumerate(idx.tolist()):
            if not -self._n <= i < self._n:
                raise IndexError(f"ImageData: index {i} out of range for {self._n} images")
            out[row] = _decode_image(self.name, self._files[i], self._resolution, self._channels)
        return out

    def tensor(self) -> torch.Tensor:
        """The whole N x C x R x R tensor; only for data held in memory."""
        if self._data is None:
            raise RuntimeError(f"dataset: {self.name} is streamed from files (over the memory budget); "
                               "index it with a tensor of indices instead")
        return self._data

    def digest(self) -> str:
        """Hex sha256 identifying the data: the tensor's bytes in memory; for streamed folders the
        sorted relative paths, file sizes, resolution and channel count."""
        if self._digest is None:
            h = hashlib.sha256()
            if self._data is not None:
                h.update(repr(tuple(self._data.shape)).encode())
                h.update(memoryview(self._data.numpy()).cast("B"))
            else:
                for rel, size in zip(self._rel_paths, self._sizes):
                    h.update(f"{rel}\t{size}\n".encode())
                h.update(f"resolution={self._resolution} channels={self._channels}".encode())
            self._digest = h.hexdigest()
        return self._digest


# ---------------------------------------------------------------------------------------------
# entry point


def load_images(spec: str, resolution: int | None = None, *, memory_budget: int | None = None) -> ImageData:
    """Load ``folder:PATH``, ``cifar10:PATH`` or ``tensor:PATH`` as float32 N x C x R x R in [-1, 1].

    ``resolution`` (int >= 8) is required for folders; for CIFAR-10 and tensors it resizes when it
    differs from the stored size. Folders are held in memory when ``N*C*R*R*4`` bytes fit
    ``memory_budget`` (default: min(2 GiB, a quarter of MemAvailable)), else decoded per batch.
    CIFAR-10 and tensor files are always held in memory.
    """
    if not isinstance(spec, str):
        raise ValueError(f"dataset: expected a string such as 'folder:PATH', got {spec!r}")
    kind, sep, raw_path = spec.partition(":")
    if not sep or kind not in PREFIXES:
        raise ValueError(f"dataset: unknown kind in {spec!r}; expected one of "
                         + ", ".join(f"{p}:PATH" for p in PREFIXES))
    if resolution is not None:
        resolution = _check_resolution(resolution)
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral)
                                      or memory_budget < 0):
        raise ValueError(f"memory_budget: expected an int >= 0 (bytes), got {memory_budget!r}")
    if not raw_path.strip():
        raise ValueError(f"dataset: empty path in {spec!r}")
    path = Path(os.path.expanduser(raw_path))
    if not path.exists():
        raise ValueError(f"dataset: {spec}: no such file or directory")
    if kind == "folder":
        if resolution is None:
            raise ValueError(f"resolution: required for {spec} (folder images are resized and centre-cropped to it)")
        budget = _default_budget() if memory_budget is None else int(memory_budget)
        return _load_folder(spec, path, resolution, budget)
    if kind == "cifar10":
        return _finish(spec, _load_cifar10(spec, path), resolution)
    return _finish(spec, _load_tensor_file(spec, path), resolution)


def _check_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or resolution < 8:
        raise ValueError(f"resolution: expected an int >= 8, got {resolution!r}")
    return int(resolution)


def _default_budget() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(_DEFAULT_BUDGET, int(line.split()[1]) * 1024 // 4)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_BUDGET


def _finish(spec: str, x: torch.Tensor, resolution: int | None) -> ImageData:
    """Resize (bilinear, antialiased) if asked, clamp to [-1, 1], wrap."""
    if x.shape[0] < 2:
        raise ValueError(f"dataset: {spec}: needs at least 2 images, found {x.shape[0]}")
    if resolution is not None and resolution != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                            antialias=True, align_corners=False)
    return ImageData(spec, x.clamp_(-1.0, 1.0).contiguous())


# ---------------------------------------------------------------------------------------------
# folder:PATH


def _list_images(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _open_error(spec: str, path: Path, err: BaseException) -> ValueError:
    return ValueError(f"dataset: {spec}: cannot read image {path}: {type(err).__name__}: {err}")


def _load_folder(spec: str, root: Path, resolution: int, budget: int) -> ImageData:
    if not root.is_dir():
        raise ValueError(f"dataset: {spec}: not a directory")
    files = _list_images(root)
    if not files:
        raise ValueError(f"dataset: {spec}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                         "case-insensitive, recursively)")
    if len(files) < 2:
        raise ValueError(f"dataset: {spec}: needs at least 2 images, found 1 ({files[0]})")
    modes = []
    for f in files:  # headers only: Image.open is lazy
        try:
            with Image.open(f) as im:
                modes.append(im.mode)
                if im.width < 1 or im.height < 1:
                    raise OSError("empty image")
        except _IMAGE_ERRORS as e:
            raise _open_error(spec, f, e) from e
    channels = 1 if all(m in GRAY_MODES for m in modes) else 3
    n_bytes = len(files) * channels * resolution * resolution * 4
    if n_bytes <= budget:
        data = torch.empty((len(files), channels, resolution, resolution), dtype=torch.float32)
        for i, f in enumerate(files):
            data[i] = _decode_image(spec, f, resolution, channels)
        return ImageData(spec, data)
    rel = [f.relative_to(root).as_posix() for f in files]
    sizes = [f.stat().st_size for f in files]
    return ImageData(spec, files=files, rel_paths=rel, sizes=sizes, resolution=resolution, channels=channels)


def _resize_crop(im: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (LANCZOS), then crop the centre square."""
    w, h = im.size
    if w <= h:
        new_w, new_h = resolution, max(resolution, round(h * resolution / w))
    else:
        new_w, new_h = max(resolution, round(w * resolution / h)), resolution
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def _decode_image(spec: str, path: Path, resolution: int, channels: int) -> torch.Tensor:
    """One file -> float32 (channels, resolution, resolution) in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _HIGH_BIT_MODES:  # 16-bit / float grey: keep the precision, scale to [0, 1]
                scale = 1.0 if im.mode == "F" else 65535.0
                plane = Image.fromarray(np.asarray(im, dtype=np.float32) / np.float32(scale))
                arr = np.asarray(_resize_crop(plane, resolution), dtype=np.float32)[None]
                arr = np.repeat(arr, channels, axis=0)
            else:
                rgb = _resize_crop(im.convert("L" if channels == 1 else "RGB"), resolution)
                arr = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)
                arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    except _IMAGE_ERRORS as e:
        raise _open_error(spec, path, e) from e
    return torch.from_numpy(np.ascontiguousarray(arr)).mul_(2.0).sub_(1.0).clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# cifar10:PATH


def _latin1_encode(text, encoding="latin1"):
    """Stand-in for codecs.encode in numpy's protocol-2 pickles: latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("codecs.encode is allowed only as (str, 'latin1')")
    return text.encode("latin-1")


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, whatever module it lives in
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(ValueError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs; refuses everything else."""

    def __init__(self, file, spec: str, path: Path):
        super().__init__(file, encoding="bytes")
        self._spec, self._path = spec, path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"dataset: {self._spec} ({self._path}) refers to {module}.{name}; a CIFAR-10 batch "
                "holds only a dict of numpy arrays, lists and bytes") from None


def _cifar_batches(spec: str, root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"dataset: {spec}: expected a folder holding CIFAR-10 python batches")
    pattern = re.compile(r"data_batch_(\d+)")
    for folder in (root, root / "cifar-10-batches-py"):
        if folder.is_dir():
            found = [(int(m.group(1)), folder / fn) for fn in os.listdir(folder)
                     if (m := pattern.fullmatch(fn)) and (folder / fn).is_file()]
            if found:
                return [p for _, p in sorted(found)]
    raise ValueError(f"dataset: {spec}: no data_batch_* files in {root} or {root / 'cifar-10-batches-py'}")


def _read_cifar_batch(spec: str, path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, spec, path).load()
    except _RefusedGlobal:
        raise
    except Exception as e:  # pickle can fail with many exception types on a damaged file
        raise ValueError(f"dataset: {spec}: {path} is not a CIFAR-10 python batch "
                         f"({type(e).__name__}: {e})") from e
    data = obj.get(b"data", obj.get("data")) if isinstance(obj, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and data.shape[0] >= 1):
        found = (f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
                 if isinstance(obj, dict) else type(obj).__name__)
        raise ValueError(f"dataset: {spec}: {path} is not a CIFAR-10 python batch (expected a dict whose "
                         f"b'data' is a uint8 array of shape (n, 3072); found {found.strip()})")
    return data


def _load_cifar10(spec: str, root: Path) -> torch.Tensor:
    arrays = [_read_cifar_batch(spec, p) for p in _cifar_batches(spec, root)]
    data = np.concatenate(arrays).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# tensor:PATH


def _pick_array(spec: str, mapping: dict, what: str):
    if "images" in mapping:
        return mapping["images"]
    if len(mapping) == 1:
        return next(iter(mapping.values()))
    raise ValueError(f"dataset: {spec}: {what} must hold exactly one array or one named 'images'; "
                     f"found keys {sorted(map(str, mapping))}")


def _read_tensor_file(spec: str, path: Path) -> torch.Tensor:
    ext = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"dataset: {spec}: not a file")
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as e:
            raise ValueError(f"dataset: {spec}: cannot read .npz ({type(e).__name__}: {e})") from e
        arr = _pick_array(spec, arrays, "the .npz")
        if arr.dtype != np.uint8 and arr.dtype.kind != "f":
            raise ValueError(f"dataset: {spec}: unsupported dtype {arr.dtype}; expected uint8 (0..255) "
                             "or floating in [-1, 1]")
        if arr.dtype.kind == "f":  # any width or byte order -> native float32
            arr = arr.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr))
    if ext == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"dataset: {spec}: cannot read .pt with weights_only=True "
                             f"({type(e).__name__}: {e})") from e
        if isinstance(obj, dict):
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            obj = tensors["images"] if "images" in tensors else _pick_array(spec, tensors or obj, "the .pt dict")
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"dataset: {spec}: expected a tensor or a dict of tensors, found {type(obj).__name__}")
        return obj.detach()
    raise ValueError(f"dataset: {spec}: unsupported extension {ext or '(none)'!r}; expected .npz or .pt")


def _load_tensor_file(spec: str, path: Path) -> torch.Tensor:
    x = _read_tensor_file(spec, path)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise ValueError(f"dataset: {spec}: expected shape N x C x H x W with C in (1, 3) and H == W, "
                         f"found {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"dataset: {spec}: needs at least 2 images, found {x.shape[0]}")
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    if not x.is_floating_point():
        raise ValueError(f"dataset: {spec}: unsupported dtype {x.dtype}; expected uint8 (0..255) or floating in [-1, 1]")
    x = x.float()
    lo, hi = x.min().item(), x.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"dataset: {spec}: values span [{lo:.4g}, {hi:.4g}]; the trainer expects images "
                         "in [-1, 1] (floating) or uint8 0..255")
    return x.contiguous()


# ---------------------------------------------------------------------------------------------
# sample grids


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> None:
    """Write images in [-1, 1] (N x C x H x W, C in 1 or 3) as a PNG grid (``grid``), atomically."""
    path = _png_path(path)
    _write_png_atomic(Image.fromarray(grid(images, nrow, padding)), path)


def write_png(pixels: np.ndarray, path) -> None:
    """Write a ``grid`` picture (H x W x 3 uint8) as a PNG, atomically."""
    _write_png_atomic(Image.fromarray(pixels), _png_path(path))


def _png_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file name, got {path!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path: folder {path.parent} does not exist")
    return path


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """The H x W x 3 uint8 picture of images in [-1, 1] laid out as torchvision's ``make_grid`` +
    ``save_image`` do: ``min(nrow, N)`` per row, black ``padding`` around every cell and the
    outside, grey repeated to RGB, pixel = uint8(clamp((x + 1) / 2, 0, 1) * 255 + 0.5)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3) \
            or images.shape[0] < 1 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a floating tensor N x C x H x W with N >= 1, C in (1, 3); got {shape}")
    if isinstance(nrow, bool) or not isinstance(nrow, numbers.Integral) or nrow < 1:
        raise ValueError(f"nrow: expected an int >= 1, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding: expected an int >= 0, got {padding!r}")
    return _grid_pixels(images, int(nrow), int(padding))


def _grid_pixels(images: torch.Tensor, nrow: int, padding: int) -> np.ndarray:
    x = images.detach().float().cpu().nan_to_num(0.0).add(1.0).div_(2.0).clamp_(0.0, 1.0)  # [-1, 1] -> [0, 1]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    xmaps = min(nrow, n)
    ymaps = math.ceil(n / xmaps)
    grid = torch.zeros(3, ymaps * (h + padding) + padding, xmaps * (w + padding) + padding)  # pad = black
    for k in range(n):
        top, left = (k // xmaps) * (h + padding) + padding, (k % xmaps) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = x[k]
    pixels = grid.mul(255.0).add(0.5).clamp(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())


def _write_png_atomic(img: Image.Image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
