"""Evaluation of generated images: Frechet distance on pluggable features, class accuracy, sample grids.

FID (Heusel et al. 2017): with feature means mu_a, mu_b and covariances C_a, C_b (unbiased, N - 1, as
numpy.cov), the Frechet distance of the two Gaussians is

    FD = |mu_a - mu_b|^2 + tr C_a + tr C_b - 2 tr (C_a^{1/2} C_b C_a^{1/2})^{1/2},

computed here in float64 with symmetric eigendecompositions only (C_a^{1/2} from eigh of C_a, and the
trace of the square root of the PSD matrix C_a^{1/2} C_b C_a^{1/2} as the sum of the square roots of
its eigenvalues, negative round-off clamped to 0) -- no scipy.

Feature extractors (callables: images (N, C, H, W) in [-1, 1] -> (N, F) float64):
- DigitsFeatures: the 128-d penultimate layer of DigitsClassifier, a small CNN trained deterministically
  on the digits' training split only and cached on disk ("FID-digits", reference = the holdout split).
- InceptionFeatures: the 2048-d pool features of the Inception-v3 of TensorFlow's 2015-12-05 graph from
  a LOCAL weights file (nothing is downloaded; see its docstring for the accepted files).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scm.checkpoint import save_atomic
from scm.data import DIGITS_HOLDOUT, DIGITS_SPLIT_SEED, DigitsDataset, _resize_square

__all__ = [
    "DigitsClassifier", "DigitsFeatures", "InceptionFeatures", "class_accuracy", "compute_fid",
    "default_cache_dir", "digits_classifier", "fid_from_features", "save_grid",
]


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def _as_features(f, name: str) -> torch.Tensor:
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(f)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"fid_from_features: {name} must be a tensor or numpy array (N, F), got {type(f).__name__}")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"fid_from_features: {name} must have shape (N, F) with N >= 2, got {tuple(f.shape)}")
    f = f.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"fid_from_features: {name} contains NaN or Inf")
    return f


def _mean_cov(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = f.mean(0)
    d = f - mu
    return mu, (d.T @ d) / (f.shape[0] - 1)


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (eigenvalues below 0 from round-off clamped to 0)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid_from_features(f_a, f_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F), in float64."""
    a, b = _as_features(f_a, "f_a"), _as_features(f_b, "f_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid_from_features: f_a and f_b must have the same feature size, got {a.shape[1]} "
                         f"and {b.shape[1]}")
    mu_a, c_a = _mean_cov(a)
    mu_b, c_b = _mean_cov(b)
    s = _psd_sqrt(c_a)
    m = s @ c_b @ s
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + c_a.trace() + c_b.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)


# ---------------------------------------------------------------------------------------------
# The digits classifier (FID-digits features and class accuracy)
# ---------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN for 1x8x8 digits in [-1, 1]: conv 32 -> conv 64 -> pool -> conv 128 -> pool ->
    linear 128 (the features) -> linear 10 (logits).

    Inputs of other shapes are mapped to 1x8x8 first (prepare): RGB -> mean of the channels, other sizes
    -> center crop + resize (area down, bilinear up), the transform of DigitsDataset.
    """

    feature_dim = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),      # 4x4
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),     # 2x2
            nn.Flatten(), nn.Linear(128 * 4, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"DigitsClassifier: images must be (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        return _resize_square(x, 8) if x.shape[-2:] != (8, 8) else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 128) penultimate activations."""
        return self.trunk(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, 10) logits."""
        return self.head(self.features(x))


# The whole training recipe; its hash names the cache file, so any change here retrains.
_DIGITS_RECIPE = dict(
    version=2, arch="cnn32-64-128-f128", split_seed=DIGITS_SPLIT_SEED, holdout=DIGITS_HOLDOUT, threads=1,
    seed=0, epochs=20, batch_size=50, optimizer="adam", lr=2e-3, weight_decay=1e-4, lr_schedule="cosine",
    shift_pixels=1, noise_std=0.1,
)


def default_cache_dir() -> Path:
    """$SCM_CACHE, else ~/.cache/scm."""
    return Path(os.environ.get("SCM_CACHE") or Path.home() / ".cache" / "scm").expanduser()


def _recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _augment(x: torch.Tensor, shift: int, noise_std: float, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to `shift` pixels (background -1 fills in) and Gaussian pixel noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, 1, h, w + 2 * shift)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, 1, h, w)
    x = x.gather(3, cols)
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=g)
    return x


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def _train_digits_classifier(recipe: dict) -> DigitsClassifier:
    """Train per `recipe` on DigitsDataset("train") on the CPU with recipe["threads"] intra-op threads
    (restored afterwards): one thread makes the result independent of the machine's thread count, and is
    also the fastest for this tiny network on a busy CPU. Fixed seeds for initialization, shuffling and
    augmentation; the global RNG is left untouched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        return _train_digits_classifier_impl(recipe)
    finally:
        torch.set_num_threads(threads)


def _train_digits_classifier_impl(recipe: dict) -> DigitsClassifier:
    data = DigitsDataset("train")
    x, y = data.images, data.labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = DigitsClassifier()
    g = torch.Generator().manual_seed(recipe["seed"] + 1)
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(x) / recipe["batch_size"])
    total = recipe["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), recipe["batch_size"]):
            idx = perm[i:i + recipe["batch_size"]]
            xb = _augment(x[idx], recipe["shift_pixels"], recipe["noise_std"], g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _finish(model: DigitsClassifier, path: Path, h: str, acc: float, loaded: bool) -> DigitsClassifier:
    model.eval().requires_grad_(False)
    model.cache_path, model.recipe_hash, model.holdout_accuracy, model.loaded_from_cache = path, h, acc, loaded
    return model


def digits_classifier(cache_dir=None) -> DigitsClassifier:
    """The digits classifier of the FID-digits metric, in eval mode on the CPU, gradients off.

    Trained (a few seconds on a CPU) on DigitsDataset("train") only, then cached as
    ``<cache_dir>/digits_classifier-<recipe hash>.pt`` (cache_dir: this argument, else $SCM_CACHE, else
    ~/.cache/scm); later calls load it with torch.load(weights_only=True). An unreadable cache file is
    replaced (with a warning). Attributes: holdout_accuracy (on the 297 holdout digits), recipe_hash,
    cache_path, loaded_from_cache.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    h = _recipe_hash(_DIGITS_RECIPE)
    path = directory / f"digits_classifier-{h}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("recipe_hash") != h:
                raise ValueError(f"recipe hash {blob.get('recipe_hash')!r} != {h!r}")
            model = DigitsClassifier()
            model.load_state_dict(blob["state_dict"])
            return _finish(model, path, h, float(blob["holdout_accuracy"]), True)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is retrained
            warnings.warn(f"digits_classifier: ignoring unreadable cache file {str(path)!r} ({type(e).__name__}: "
                          f"{e}); retraining", RuntimeWarning, stacklevel=2)
    model = _train_digits_classifier(_DIGITS_RECIPE)
    held = DigitsDataset("holdout")
    acc = _accuracy(model, held.images, held.labels)
    blob = {"format": "scm-digits-classifier-1", "recipe": json.dumps(_DIGITS_RECIPE, sort_keys=True),
            "recipe_hash": h, "holdout_accuracy": acc, "state_dict": model.state_dict()}
    save_atomic(blob, path)
    return _finish(model, path, h, acc, False)


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


class DigitsFeatures:
    """Feature extractor of FID-digits: images (N, C, H, W) in [-1, 1] -> (N, 128) float64 features of
    the digits classifier (digits_classifier(cache_dir) when none is given)."""

    def __init__(self, classifier: DigitsClassifier | None = None, *, cache_dir=None, device="cpu",
                 batch_size: int = 1000):
        self.device = torch.device(device)
        classifier = classifier if classifier is not None else digits_classifier(cache_dir)
        self.classifier = classifier.to(self.device).eval()
        self.batch_size = batch_size
        self.dim = DigitsClassifier.feature_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.classifier.features(b.to(self.device)).double().cpu() for b in _batches(images, self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Inception features from local weights
# ---------------------------------------------------------------------------------------------
_NVLABS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 0..255 (round to nearest), as saved images would be."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _clean_resize_299(x_uint8: torch.Tensor) -> torch.Tensor:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic to 299x299, clipped to
    [0, 255]. (N, 3, H, W) uint8 -> (N, 3, 299, 299) float32."""
    from PIL import Image

    a = x_uint8.cpu().numpy().astype(np.float32)
    out = np.empty((a.shape[0], a.shape[1], 299, 299), dtype=np.float32)
    for n in range(a.shape[0]):
        for c in range(a.shape[1]):
            im = Image.fromarray(a[n, c], mode="F").resize((299, 299), resample=Image.Resampling.BICUBIC)
            out[n, c] = np.asarray(im)
    return torch.from_numpy(out.clip(0, 255))


class InceptionFeatures:
    """2048-d pool features of Inception-v3 (TensorFlow's inception-2015-12-05 graph) from a LOCAL file;
    images (N, C, H, W) in [-1, 1] -> (N, 2048) float64. Nothing is downloaded.

    Accepted `weights_path`:
    1. A TorchScript archive called like NVlabs' inception-2015-12-05.pt (StyleGAN2-ADA / EDM / EDM2,
       also the file clean-fid uses; download it yourself from the URL below):
       ``net(x, return_features=True) -> (N, 2048)`` with x (N, 3, H, W) in the 0..255 range; the
       network resizes to 299x299 itself. mode="nvlabs" (default, EDM's fid.py): x is the uint8 images
       at their own resolution. mode="clean" (clean-fid's "clean" mode): the uint8 images resized to
       299x299 per channel with PIL bicubic on float values, passed as float32 0..255.
    2. When the package torch_fidelity is importable, its weights file
       (weights-inception-2015-12-05-6726825d.pth, a state dict of its FeatureExtractorInceptionV3; first
       checked with torch.load(weights_only=True)): the uint8 images go to
       ``FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], path)``, which resizes to 299 itself.
    Images are quantized to uint8 first (round to nearest) and gray images repeated to RGB.
    """

    dim = 2048

    def __init__(self, weights_path, *, device="cpu", mode: str = "nvlabs", batch_size: int = 100):
        op = "InceptionFeatures"
        if mode not in ("nvlabs", "clean"):
            raise ValueError(f"{op}: mode must be 'nvlabs' or 'clean', got {mode!r}")
        if weights_path is None:
            raise ValueError(f"{op}: weights_path is required (a local inception-2015-12-05.pt; download it from "
                             f"{_NVLABS_URL})")
        self.path = Path(weights_path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{op}: Inception weights file {str(self.path)!r} does not exist. Nothing is downloaded: fetch "
                f"NVlabs' TorchScript {_NVLABS_URL} (or torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                f"with torch_fidelity installed) and pass its path.")
        self.device = torch.device(device)
        self.mode = mode
        self.batch_size = batch_size
        try:
            with warnings.catch_warnings():  # the NVlabs file is TorchScript: no other way to read it
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            self.kind = "torchscript"
        except Exception as e_jit:  # noqa: BLE001 - not a TorchScript archive: try torch-fidelity's format
            self.net = self._load_torch_fidelity(e_jit)
            self.kind = "torch_fidelity"

    def _load_torch_fidelity(self, e_jit: Exception) -> nn.Module:
        op = "InceptionFeatures"
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ValueError(f"{op}: {str(self.path)!r} is not a TorchScript archive ({type(e_jit).__name__}: "
                             f"{str(e_jit).splitlines()[0] if str(e_jit) else ''}); a torch-fidelity weights file "
                             f"needs the package torch_fidelity, which is not installed") from e_jit
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{op}: {str(self.path)!r} is neither a TorchScript archive nor a weights-only "
                             f"state dict ({type(e).__name__}: {e})") from e
        if not isinstance(sd, dict):
            raise ValueError(f"{op}: {str(self.path)!r} holds a {type(sd).__name__}, not a state dict")
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(self.path))
        return net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures: images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
        out = []
        for b in _batches(images, self.batch_size):
            x = _to_uint8(b)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if self.kind == "torch_fidelity":
                f = self.net(x.to(self.device))
                f = f[0] if isinstance(f, (tuple, list)) else f
            else:
                if self.mode == "clean":
                    x = _clean_resize_299(x)
                f = self.net(x.to(self.device), return_features=True)
            out.append(f.reshape(x.shape[0], -1).double().cpu())
        feats = torch.cat(out) if out else torch.empty(0, self.dim, dtype=torch.float64)
        if feats.shape[1] != self.dim:
            raise ValueError(f"InceptionFeatures: {str(self.path)!r} gave {feats.shape[1]}-d features, "
                             f"expected {self.dim}")
        return feats


# ---------------------------------------------------------------------------------------------
# FID, accuracy, grids
# ---------------------------------------------------------------------------------------------
def _first_image(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _iter_images(src, batch_size: int, name: str) -> Iterable[torch.Tensor]:
    if isinstance(src, torch.Tensor):
        if src.ndim != 4:
            raise ValueError(f"compute_fid: {name} must be images (N, C, H, W) or features (N, F), got shape "
                             f"{tuple(src.shape)}")
        yield from _batches(src, batch_size)
    elif (hasattr(src, "__getitem__") and hasattr(src, "__len__") and len(src) > 0
          and (hasattr(src, "get_batch") or torch.as_tensor(_first_image(src[0])).ndim == 3)):
        # a dataset (or list) of single (image, label) items or images
        n = len(src)
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            if hasattr(src, "get_batch"):
                yield src.get_batch(idx)[0]
            else:
                yield torch.stack([torch.as_tensor(_first_image(src[int(j)])) for j in idx])
    elif isinstance(src, Iterable):  # batches (B, C, H, W) or (images, labels) tuples
        for b in src:
            yield _first_image(b)
    else:
        raise TypeError(f"compute_fid: {name} must be a tensor, a dataset or an iterable of batches, got "
                        f"{type(src).__name__}")


def _features_of(src, extractor: Callable, batch_size: int, name: str) -> torch.Tensor:
    if isinstance(src, (torch.Tensor, np.ndarray)) and src.ndim == 2:
        return torch.as_tensor(src, dtype=torch.float64)  # precomputed features
    feats = [torch.as_tensor(extractor(b)).double() for b in _iter_images(src, batch_size, name)]
    if not feats:
        raise ValueError(f"compute_fid: {name} is empty")
    return torch.cat(feats)


def compute_fid(gen, real, extractor: Callable, batch_size: int = 500) -> float:
    """FID between `gen` and `real` on the features of `extractor` (images -> (N, F)).

    gen / real: images (N, C, H, W) in [-1, 1], a dataset of (image, label) items, an iterable of image
    batches (or (images, labels) tuples), or precomputed features (N, F) (2-D tensor / array, passed
    through: compute the reference's once and reuse them). Extraction runs in batches of batch_size.
    """
    if not callable(extractor):
        raise TypeError(f"compute_fid: extractor must be callable (images -> features), got {type(extractor).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"compute_fid: batch_size must be a positive int, got {batch_size!r}")
    return fid_from_features(_features_of(gen, extractor, batch_size, "gen"),
                             _features_of(real, extractor, batch_size, "real"))


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels, classifier: Callable, batch_size: int = 1000) -> float:
    """Fraction of `images` (N, C, H, W) in [-1, 1] that `classifier` (images -> logits (N, K)) assigns to
    their `labels` (N,) (e.g. the class each sample was generated for)."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1).cpu()
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"class_accuracy: images must be a tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"class_accuracy: labels must have one entry per image ({images.shape[0]}), "
                         f"got {labels.shape[0]}")
    if labels.numel() == 0:
        raise ValueError("class_accuracy: no images")
    if bool((labels < 0).any()):
        raise ValueError("class_accuracy: labels must be class indices >= 0 (got -1: unlabelled samples)")
    param = next(iter(classifier.parameters()), None) if isinstance(classifier, nn.Module) else None
    device = param.device if param is not None else images.device
    preds = torch.cat([classifier(b.to(device)).argmax(1).cpu() for b in _batches(images, batch_size)])
    return float((preds == labels).double().mean())


def save_grid(images: torch.Tensor, path, nrow: int | None = None, upscale: int = 1, *, padding: int = 0) -> Path:
    """Write images (N, C, H, W) (C = 1 or 3) in [-1, 1] as one PNG grid: nrow images per row (default
    ceil(sqrt(N))), pixels (x + 1) * 127.5 rounded to uint8, each pixel repeated upscale x upscale times
    (nearest), `padding` black pixels between and around cells. Creates parent folders; returns the path."""
    from PIL import Image

    op = "save_grid"
    ok = isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[0] > 0
    if not ok:
        raise ValueError(f"{op}: images must be a tensor (N, 1 or 3, H, W) with N >= 1, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    n, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    for name, v, lo in (("nrow", nrow, 1), ("upscale", upscale, 1), ("padding", padding, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{op}: {name} must be an int >= {lo}, got {v!r}")
    x = _to_uint8(images.detach().cpu())
    if upscale > 1:
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
        h, w = h * upscale, w * upscale
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB").save(path, format="PNG")
    return path
