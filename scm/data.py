"""Datasets and the resumable batch stream of scm training.

Every dataset yields ``(image, label)``: image a float32 tensor (C, H, W) scaled to [-1, 1] (so that
data of unit range has std about sigma_d = 0.5, A1), label an int64 scalar tensor, -1 when the dataset
has no labels. Each dataset also has ``get_batch(indices) -> (x (B, C, H, W), y (B,))`` (one gather
instead of B calls of __getitem__), ``.num_classes`` (0 without labels) and ``.class_names``.

- DigitsDataset: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, shipped inside the
  sklearn package: nothing is downloaded), values 0..16 -> [-1, 1], with a fixed stratified split
  (holdout = 297 images, the same on every machine and run).
- ImageFolderDataset: PNG/JPEG files of any size, center-cropped to a square and resized; labels from
  sub-folders. Every file is decoded once up front: unreadable ones are skipped with ONE warning listing
  them, so an epoch never meets a corrupt file.
- NpzDataset: arrays "x"/"images" (N, H, W[, C]) and optional "y"/"labels" from an .npz file.
- build_dataset(data_cfg, split): the dataset a DataConfig describes.
- BatchStream: endless shuffled global batches, each rank taking its slice (DDP); the epoch permutation
  and the horizontal flips are pure functions of (seed, epoch, position), so ``state_dict()`` (three
  ints) resumes the stream exactly.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "BatchStream", "DigitsDataset", "ImageFolderDataset", "NpzDataset", "build_dataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGITS_HOLDOUT = 297  # images of the digits' holdout split (the other 1500 are the training split)
DIGITS_SPLIT_SEED = 20240917  # fixes the digits split forever; changing it changes every FID-digits number
_MAX_LISTED = 50  # corrupt files named in the warning (all of them are in .skipped)


def _check_int(name: str, value, minimum: int, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_channels(channels, op: str) -> int:
    channels = _check_int("channels", channels, 1, op)
    if channels not in (1, 3):
        raise ValueError(f"{op}: channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return channels


def _derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (stable across runs and machines, unlike hash())."""
    digest = hashlib.sha256(":".join(str(int(p)) if not isinstance(p, str) else p for p in parts).encode())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def _resize_square(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Center-crop (N, C, H, W) float images to a square and resize to `resolution`: area averaging when
    shrinking (an integer factor k averages k x k blocks), bilinear when enlarging."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s != resolution:
        if s > resolution:
            x = F.interpolate(x, size=(resolution, resolution), mode="area")
        else:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x


def _convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, channels, H, W): grayscale is repeated to RGB; RGB becomes luma (ITU-R 601-2,
    the weights of Pillow's "L" conversion); an alpha channel (C = 2 or 4) is dropped."""
    c = x.shape[1]
    if c in (2, 4):
        x, c = x[:, :c - 1], c - 1
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert images with {c} channels to {channels}")


class _ImageDataset(Dataset):
    """Images stored in memory as a (N, C, H, W) tensor: uint8 (0..255) or float32 already in [-1, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def _set_labels(self, labels: torch.Tensor | None, class_names: list[str], n: int) -> None:
        """Labels (n,) int64 with their class names, or None: no labels (-1 everywhere, 0 classes)."""
        if labels is None:
            self.labels, self.class_names, self.num_classes = torch.full((n,), -1, dtype=torch.int64), [], 0
        else:
            self.labels, self.class_names, self.num_classes = labels, list(class_names), len(class_names)

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32) / 127.5 - 1.0
        return x.to(torch.float32)

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self._to_float(self.images[idx]), self.labels[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        return (self._to_float(x) if x.dtype == torch.uint8 else x.clone()), self.labels[i].clone()


def _digits_split_indices(targets: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split: each class gives round(holdout * n_k / N) images (largest remainders make the
    total exact), chosen by a seeded permutation of that class. Returns sorted (train, holdout) indices."""
    classes, counts = np.unique(targets, return_counts=True)
    exact = holdout * counts / counts.sum()
    take = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - take), kind="stable")[: holdout - int(take.sum())]:
        take[k] += 1
    g = torch.Generator().manual_seed(seed)
    held = []
    for c, n in zip(classes, take):
        members = np.flatnonzero(targets == c)
        perm = torch.randperm(len(members), generator=g).numpy()
        held.append(members[perm[:n]])
    held = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(targets)), held)
    return train, held


class DigitsDataset(_ImageDataset):
    """scikit-learn's handwritten digits (UCI optical digits test set): 1797 grayscale 8x8 images with
    values 0..16 and 10 classes, shipped inside the sklearn package (nothing is downloaded).

    split: "train" (1500 images), "holdout" (297, the FID-digits reference and the classifier's test set)
    or "all". The split is stratified by class and fixed by DIGITS_SPLIT_SEED: identical on every run.
    Pixels v in 0..16 become v / 8 - 1 in [-1, 1]; resolution != 8 resizes (bilinear up, area down);
    channels=3 repeats the gray channel; use_labels=False gives labels -1.
    """

    SPLITS = ("train", "holdout", "all")

    def __init__(self, split: str = "train", resolution: int = 8, *, channels: int = 1, use_labels: bool = True):
        op = "DigitsDataset"
        if split not in self.SPLITS:
            raise ValueError(f"{op}: split must be one of {self.SPLITS}, got {split!r}")
        resolution = _check_int("resolution", resolution, 1, op)
        channels = _check_channels(channels, op)
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - sklearn is a dependency
            raise ImportError(f"{op} needs scikit-learn (pip install scikit-learn): {e}") from e
        digits = load_digits()
        targets = np.asarray(digits.target, dtype=np.int64)
        train, held = _digits_split_indices(targets, DIGITS_HOLDOUT, DIGITS_SPLIT_SEED)
        idx = {"train": train, "holdout": held, "all": np.arange(len(targets))}[split]
        x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)[idx]).unsqueeze(1) / 8.0 - 1.0
        if resolution != 8:
            x = _resize_square(x, resolution).clamp_(-1.0, 1.0)
        self.images = _convert_channels(x, channels).contiguous()
        self.split = split
        self.indices = torch.from_numpy(idx)  # positions in load_digits()
        self._set_labels(torch.from_numpy(targets[idx]) if use_labels else None, [str(k) for k in range(10)], len(idx))

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


def _load_image_file(path: Path, resolution: int, channels: int) -> np.ndarray:
    """Decode one image file fully (a truncated file raises here, not later) and return the center-cropped,
    resized (Lanczos) uint8 array (resolution, resolution, channels)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != resolution:
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    a = np.asarray(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


class ImageFolderDataset(_ImageDataset):
    """PNG/JPEG images under `root` (extensions IMAGE_EXTENSIONS, case-insensitive; hidden files ignored).

    Labels: every sub-folder of root is a class (sorted names -> 0..K-1; its files are searched
    recursively); files directly in root get label -1. use_labels=False gives -1 everywhere.
    Each image is decoded up front (EXIF orientation applied, converted to L or RGB), center-cropped to
    a square, resized to `resolution` with Lanczos and kept in memory as uint8 (N * C * R * R bytes).
    Files that fail to decode (truncated, not an image, empty) are skipped with ONE warning listing them;
    their paths are in .skipped. No readable image at all -> ValueError.
    """

    def __init__(self, root, resolution: int, channels: int = 3, use_labels: bool = True):
        op = "ImageFolderDataset"
        resolution = _check_int("resolution", resolution, 1, op)
        channels = _check_channels(channels, op)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{op}: root must be an existing directory, got {str(root)!r}")

        def images_in(folder: Path, recursive: bool) -> list[Path]:
            walk = folder.rglob("*") if recursive else folder.iterdir()
            return sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        entries = [(p, -1) for p in images_in(self.root, recursive=False)]
        for k, d in enumerate(class_dirs):
            entries += [(p, k) for p in images_in(d, recursive=True)]
        if not entries:
            raise ValueError(f"{op}: no {'/'.join(IMAGE_EXTENSIONS)} files under {str(self.root)!r}")

        arrays, labels, self.files, self.skipped = [], [], [], []
        for path, label in entries:
            try:
                arrays.append(_load_image_file(path, resolution, channels))
            except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
                self.skipped.append((str(path), f"{type(e).__name__}: {e}"))
                continue
            labels.append(label)
            self.files.append(str(path))
        if self.skipped:
            listed = "; ".join(f"{p} ({why})" for p, why in self.skipped[:_MAX_LISTED])
            extra = len(self.skipped) - _MAX_LISTED
            more = f"; ... and {extra} more (see .skipped)" if extra > 0 else ""
            warnings.warn(f"{op}: skipped {len(self.skipped)} unreadable image file(s) under {str(self.root)!r}: "
                          f"{listed}{more}", RuntimeWarning, stacklevel=2)
        if not arrays:
            raise ValueError(f"{op}: none of the {len(entries)} image files under {str(self.root)!r} could be read")
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self._set_labels(torch.tensor(labels, dtype=torch.int64) if use_labels and class_dirs else None,
                         [d.name for d in class_dirs], len(labels))

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
                f"classes={self.num_classes}, skipped={len(self.skipped)})")


class NpzDataset(_ImageDataset):
    """Images from an .npz file (loaded with allow_pickle=False).

    Arrays: "x" or "images" of shape (N, H, W) or (N, H, W, C) with C in 1..4 (channels last; an alpha
    channel is dropped), and optionally "y" or "labels" (N,) integers >= 0.
    Values: uint8 arrays are 0..255; float arrays are taken as [0, 1] when value_range is None and their
    minimum is >= 0, else as [-1, 1]; pass value_range=(lo, hi) to say it. Values outside the range ->
    ValueError. Non-square images are center-cropped, other sizes resized (bilinear up, area down);
    channels are converted (gray <-> RGB). Kept in memory as uint8 (uint8 input at its resolution) or
    float32.
    """

    def __init__(self, path, resolution: int, channels: int, *, use_labels: bool = True,
                 value_range: tuple[float, float] | None = None):
        op = "NpzDataset"
        resolution = _check_int("resolution", resolution, 1, op)
        channels = _check_channels(channels, op)
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{op}: path must be an existing .npz file, got {str(path)!r}")
        with np.load(self.path, allow_pickle=False) as z:
            xkey = next((k for k in ("x", "images") if k in z.files), None)
            if xkey is None:
                raise ValueError(f"{op}: {str(path)!r} has no array 'x' or 'images' (arrays: {z.files})")
            x = np.asarray(z[xkey])
            ykey = next((k for k in ("y", "labels") if k in z.files), None)
            y = np.asarray(z[ykey]) if ykey is not None else None
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4) or x.shape[0] == 0:
            raise ValueError(f"{op}: array {xkey!r} must have shape (N, H, W) or (N, H, W, C) with C in 1..4 and "
                             f"N >= 1, got {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        if x.dtype == np.uint8:
            lo, hi = 0.0, 255.0
        elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
            t = t.to(torch.float32)
            if value_range is not None:
                lo, hi = map(float, value_range)
                if not hi > lo:
                    raise ValueError(f"{op}: value_range must be (lo, hi) with hi > lo, got {value_range!r}")
            else:
                lo, hi = (0.0, 1.0) if float(t.min()) >= 0 else (-1.0, 1.0)
            if not (float(t.min()) >= lo and float(t.max()) <= hi):
                raise ValueError(f"{op}: values of {xkey!r} must lie in [{lo}, {hi}] (value_range), got "
                                 f"[{float(t.min())}, {float(t.max())}]")
        else:
            raise TypeError(f"{op}: array {xkey!r} must be uint8 or float, got dtype {x.dtype}")
        keep_uint8 = x.dtype == np.uint8 and x.shape[1] == x.shape[2] == resolution and x.shape[-1] == channels
        if keep_uint8:
            self.images = t.contiguous()
        else:
            chunks = []
            for s in range(0, t.shape[0], 1024):
                c = (t[s:s + 1024].to(torch.float32) - lo) * (2.0 / (hi - lo)) - 1.0
                c = _resize_square(_convert_channels(c, channels), resolution)
                chunks.append(c.clamp_(-1.0, 1.0))
            self.images = torch.cat(chunks).contiguous()
        n = self.images.shape[0]
        if y is not None and use_labels:
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
                raise ValueError(f"{op}: labels {ykey!r} must be non-negative integers of shape ({n},), "
                                 f"got dtype {y.dtype} shape {y.shape}")
            self._set_labels(torch.from_numpy(y.astype(np.int64)), [str(k) for k in range(int(y.max()) + 1)], n)
        else:
            self._set_labels(None, [], n)

    def __repr__(self) -> str:
        return f"NpzDataset({str(self.path)!r}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


def build_dataset(data_cfg, split: str = "train") -> Dataset:
    """The dataset described by a DataConfig (or any object / mapping with source, path, resolution,
    channels, use_labels).

    source "digits": DigitsDataset(split). "folder" / "npz": these have no holdout split, so split
    "train" and "all" give every image and "holdout" is a ValueError (FID references of CIFAR-10 and
    ImageNet are computed on the training images).
    """
    op = "build_dataset"

    def get(name, default=None):
        if isinstance(data_cfg, Mapping):
            return data_cfg.get(name, default)
        return getattr(data_cfg, name, default)

    source = get("source", "digits")
    path, resolution = get("path"), get("resolution", 8)
    channels, use_labels = get("channels", 1), bool(get("use_labels", True))
    if source == "digits":
        return DigitsDataset(split, resolution, channels=channels, use_labels=use_labels)
    if source not in ("folder", "npz"):
        raise ValueError(f"{op}: data source must be 'digits', 'folder' or 'npz', got {source!r}")
    if split not in ("train", "all"):
        raise ValueError(f"{op}: source {source!r} has no {split!r} split; use split='train' or 'all' "
                         f"(both give every image)")
    if not path:
        what = "directory" if source == "folder" else ".npz file"
        raise ValueError(f"{op}: source {source!r} needs data.path (a {what}), got {path!r}")
    path = os.path.expanduser(str(path))
    if source == "folder":
        return ImageFolderDataset(path, resolution, channels=channels, use_labels=use_labels)
    return NpzDataset(path, resolution, channels, use_labels=use_labels)


class BatchStream:
    """Endless shuffled batches of `dataset` for one rank of `world_size`, resumable exactly.

    The stream is a sequence of global batches of `global_batch` images taken in order from the
    concatenation of epoch permutations: epoch e is ``randperm(N)`` drawn from a torch.Generator seeded
    by (seed, e), and a global batch that reaches the end of an epoch continues into the next (no image
    is dropped, and N < global_batch works). Rank r takes slice [r*b:(r+1)*b] of every global batch,
    b = global_batch // world_size, so the ranks' slices concatenated are the 1-rank global batch.
    With hflip, the image at position p of epoch e is mirrored when bit p of a Bernoulli(1/2) vector
    seeded by (seed, e) is set: a function of (seed, epoch, position) only.
    The state is (epoch, pos, seed): pos is the position in epoch `epoch` of the next global batch.
    """

    def __init__(self, dataset, global_batch: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 hflip: bool = False, device="cpu"):
        op = "BatchStream"
        self.global_batch = _check_int("global_batch", global_batch, 1, op)
        self.world_size = _check_int("world_size", world_size, 1, op)
        self.rank = _check_int("rank", rank, 0, op)
        if self.rank >= self.world_size:
            raise ValueError(f"{op}: rank must be < world_size = {self.world_size}, got {self.rank}")
        if self.global_batch % self.world_size:
            raise ValueError(f"{op}: global_batch ({self.global_batch}) must be divisible by world_size "
                             f"({self.world_size})")
        self.seed = _check_int("seed", seed, 0, op)
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError(f"{op}: the dataset is empty")
        self.dataset = dataset
        self.batch = self.global_batch // self.world_size
        self.hflip = bool(hflip)
        self.device = torch.device(device)
        self.epoch = 0
        self.pos = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation (N,) int64, flip (N,) bool) of one epoch, memoized for the current epochs."""
        if epoch not in self._cache:
            g_perm = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, "perm"))
            g_flip = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, "flip"))
            perm = torch.randperm(self.n, generator=g_perm)
            flip = torch.rand(self.n, generator=g_flip) < 0.5
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = (perm, flip)
        return self._cache[epoch]

    def _global_slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset indices and flip flags of global positions [start, stop) counted from (self.epoch,
        self.pos); crosses epoch boundaries as needed."""
        idx, flips = [], []
        epoch, pos = self.epoch, self.pos + start
        epoch += pos // self.n
        pos %= self.n
        remaining = stop - start
        while remaining > 0:
            perm, flip = self._epoch_order(epoch)
            k = min(remaining, self.n - pos)
            idx.append(perm[pos:pos + k])
            flips.append(flip[pos:pos + k])
            remaining -= k
            epoch, pos = epoch + 1, 0
        return torch.cat(idx), torch.cat(flips)

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.dataset, "get_batch"):
            x, y = self.dataset.get_batch(idx)
        else:
            items = [self.dataset[int(i)] for i in idx]
            x = torch.stack([torch.as_tensor(it[0]) for it in items])
            y = torch.stack([torch.as_tensor(it[1], dtype=torch.int64) for it in items])
        return x.to(torch.float32), y.to(torch.int64).reshape(-1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next batch: x (b, C, H, W) float32 and y (b,) int64 on `device`."""
        lo = self.rank * self.batch
        idx, flip = self._global_slice(lo, lo + self.batch)
        x, y = self._fetch(idx)
        if self.hflip and bool(flip.any()):
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        advanced = self.pos + self.global_batch
        self.epoch += advanced // self.n
        self.pos = advanced % self.n
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    __next__ = next

    def __iter__(self):
        return self

    @property
    def nimg(self) -> int:
        """Global images consumed so far."""
        return self.epoch * self.n + self.pos

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "pos": int(self.pos), "seed": int(self.seed)}

    def load_state_dict(self, d: Mapping) -> None:
        """Continue from a state_dict(): the following batches equal those of the uninterrupted stream
        (same dataset, global batch, world size)."""
        op = "BatchStream.load_state_dict"
        if not isinstance(d, Mapping) or not {"epoch", "pos", "seed"} <= set(d):
            raise ValueError(f"{op}: expected a dict with keys 'epoch', 'pos', 'seed', got {d!r}")
        epoch, pos, seed = (_check_int(k, d[k], 0, op) for k in ("epoch", "pos", "seed"))
        if pos >= self.n:
            raise ValueError(f"{op}: pos {pos} is beyond the dataset's {self.n} images (was the dataset changed?)")
        self.epoch, self.pos = epoch, pos
        if seed != self.seed:
            self.seed = seed
            self._cache.clear()

    def __repr__(self) -> str:
        return (f"BatchStream(n={self.n}, global_batch={self.global_batch}, rank={self.rank}/{self.world_size}, "
                f"hflip={self.hflip}, epoch={self.epoch}, pos={self.pos}, seed={self.seed})")

