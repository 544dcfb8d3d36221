"""Tests of scm.metrics: the Frechet distance on closed-form Gaussian cases, the digits classifier
(holdout accuracy, deterministic training, disk cache keyed by the recipe), FID-digits, Inception
features through a scripted stand-in with NVlabs' calling convention, compute_fid's input kinds,
class_accuracy and PNG grids that round-trip pixel values."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from scm import metrics as M
from scm.data import DigitsDataset

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny ops are fastest on one intra-op thread when the CPU is shared (2 threads spin-wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------
def _exact_samples(mean, cov, n, seed):
    """n samples whose sample mean and unbiased sample covariance are exactly `mean` and `cov`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whitened: sample cov = I
    return z @ torch.linalg.cholesky(cov).T + mean


def _frechet_2x2(m1, c1, m2, c2):
    """Closed form for 2x2 covariances: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2x2 PSD M, with
    M = C1^1/2 C2 C1^1/2, tr M = tr(C1 C2), det M = det C1 det C2."""
    tr_sqrt = math.sqrt(float(torch.trace(c1 @ c2)) + 2 * math.sqrt(float(torch.det(c1) * torch.det(c2))))
    return float((m1 - m2).square().sum() + c1.trace() + c2.trace()) - 2 * tr_sqrt


def test_fid_closed_form_diagonal():
    # commuting covariances: FD = |m1 - m2|^2 + sum (sqrt a_i - sqrt b_i)^2
    a = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)
    b = torch.tensor([9.0, 1.0, 0.25, 0.5], dtype=torch.float64)
    m1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    m2 = torch.tensor([1.0, 1.0, 0.0, -0.5], dtype=torch.float64)
    exact = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    fa, fb = _exact_samples(m1, torch.diag(a), 200, 0), _exact_samples(m2, torch.diag(b), 300, 1)
    assert M.fid_from_features(fa, fb) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert M.fid_from_features(fb, fa) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert M.fid_from_features(fa.float().numpy(), fb.float().numpy()) == pytest.approx(exact, rel=1e-5)


def test_fid_closed_form_non_commuting():
    c1 = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    c2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    m1, m2 = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert not torch.allclose(c1 @ c2, c2 @ c1)
    exact = _frechet_2x2(m1, c1, m2, c2)
    got = M.fid_from_features(_exact_samples(m1, c1, 100, 2), _exact_samples(m2, c2, 57, 3))
    assert got == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_fid_self_is_zero_and_matches_scipy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    assert abs(M.fid_from_features(x, x)) < 1e-8
    # rank-deficient covariance (fewer samples than features) still gives ~0 against itself
    y = torch.randn(10, 32, generator=g, dtype=torch.float64)
    assert abs(M.fid_from_features(y, y)) < 1e-6
    linalg = pytest.importorskip("scipy.linalg")
    z = torch.randn(300, 16, generator=g, dtype=torch.float64) * 2 + 0.3
    ma, mb = x.mean(0).numpy(), z.mean(0).numpy()
    ca, cb = np.cov(x.numpy(), rowvar=False), np.cov(z.numpy(), rowvar=False)
    ref = float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real))
    assert M.fid_from_features(x, z) == pytest.approx(ref, rel=1e-8)


def test_fid_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        M.fid_from_features(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same feature size"):
        M.fid_from_features(torch.zeros(4, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        M.fid_from_features(torch.full((4, 3), float("nan")), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="f_b"):
        M.fid_from_features(torch.zeros(4, 3), [[0.0] * 3] * 4)


# ---------------------------------------------------------------------------------------------
# Digits classifier and FID-digits
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("scm_cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return M.digits_classifier(cache_dir)


@pytest.fixture(scope="module")
def holdout():
    return DigitsDataset("holdout")


def test_digits_classifier_trains_and_caches(classifier, cache_dir, holdout, monkeypatch):
    assert not classifier.loaded_from_cache and not classifier.training
    assert classifier.holdout_accuracy > 0.95, classifier.holdout_accuracy
    assert M.class_accuracy(holdout.images, holdout.labels, classifier) == classifier.holdout_accuracy
    assert classifier.cache_path.parent == cache_dir and classifier.recipe_hash in classifier.cache_path.name
    assert [p.name for p in cache_dir.iterdir()] == [classifier.cache_path.name]  # no temp files left

    def no_training(recipe):
        raise AssertionError("retrained although a cache file exists")

    monkeypatch.setattr(M, "_train_digits_classifier", no_training)
    again = M.digits_classifier(cache_dir)
    assert again.loaded_from_cache and again.holdout_accuracy == classifier.holdout_accuracy
    with torch.no_grad():
        assert torch.equal(again(holdout.images), classifier(holdout.images))
        assert torch.equal(again.features(holdout.images), classifier.features(holdout.images))
    # $SCM_CACHE is the default location
    monkeypatch.setenv("SCM_CACHE", str(cache_dir))
    assert M.default_cache_dir() == cache_dir and M.digits_classifier().loaded_from_cache
    monkeypatch.delenv("SCM_CACHE")
    assert str(M.default_cache_dir()).endswith(".cache/scm")


def test_digits_classifier_corrupt_cache_is_replaced(tmp_path, monkeypatch):
    h = M._recipe_hash(M._DIGITS_RECIPE)
    path = tmp_path / f"digits_classifier-{h}.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    calls = []

    def fake_train(recipe):  # an untrained network is enough to exercise the fallback quickly
        calls.append(recipe)
        return M.DigitsClassifier().eval()

    monkeypatch.setattr(M, "_train_digits_classifier", fake_train)
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        m = M.digits_classifier(tmp_path)
    assert len(calls) == 1 and not m.loaded_from_cache
    assert M.digits_classifier(tmp_path).loaded_from_cache and len(calls) == 1


def test_digits_training_is_deterministic():
    recipe = dict(M._DIGITS_RECIPE, epochs=1)
    threads = torch.get_num_threads()
    a, b = M._train_digits_classifier(recipe), M._train_digits_classifier(recipe)
    assert torch.get_num_threads() == threads
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert M._recipe_hash(recipe) != M._recipe_hash(M._DIGITS_RECIPE)


def test_digits_features_and_fid(classifier, holdout):
    fe = M.DigitsFeatures(classifier)
    f = fe(holdout.images)
    assert f.shape == (297, 128) and f.dtype == torch.float64
    train = DigitsDataset("train")
    fid_real = M.compute_fid(train, holdout, fe)
    fid_noise = M.compute_fid(torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, holdout, fe)
    assert M.compute_fid(holdout.images, holdout.images, fe) < 1e-6
    assert 0 < fid_real < fid_noise / 20, (fid_real, fid_noise)
    # inputs at other resolutions / RGB go through the same transform as DigitsDataset's
    d16 = DigitsDataset("holdout", 16, channels=3)
    assert M.compute_fid(d16, DigitsDataset("holdout", 16), fe) < 1e-6


def test_compute_fid_input_kinds(holdout):
    x = holdout.images
    fe = lambda im: im.flatten(1)[:, :6].double() * 3  # noqa: E731 - a toy extractor
    ref = M.fid_from_features(fe(x[:150]), fe(x[150:]))
    assert M.compute_fid(x[:150], x[150:], fe, batch_size=7) == pytest.approx(ref, rel=1e-12)
    batches = [(x[i:i + 40], holdout.labels[i:i + 40]) for i in range(150, 297, 40)]
    assert M.compute_fid(x[:150], iter(batches), fe) == pytest.approx(ref, rel=1e-12)
    assert M.compute_fid(fe(x[:150]), x[150:], fe) == pytest.approx(ref, rel=1e-12)  # precomputed features
    listed = [(x[i], holdout.labels[i]) for i in range(150)]
    assert M.compute_fid(listed, x[150:], fe, batch_size=64) == pytest.approx(ref, rel=1e-12)
    assert M.compute_fid(list(x[:150].split(50)), x[150:], fe) == pytest.approx(ref, rel=1e-12)  # list of batches
    with pytest.raises(TypeError, match="extractor"):
        M.compute_fid(x, x, None)
    with pytest.raises(ValueError, match="gen"):
        M.compute_fid(x[0], x, fe)


def test_class_accuracy():
    labels = torch.tensor([0, 1, 2, 3, 1])
    preds = torch.tensor([0, 1, 0, 3, 2])  # 3 of 5 right
    images = F.one_hot(preds, 4).float().view(5, 1, 1, 4)
    clf = lambda x: x.flatten(1)  # noqa: E731 - logits = the one-hot pattern
    assert M.class_accuracy(images, labels, clf, batch_size=2) == pytest.approx(0.6)
    with pytest.raises(ValueError, match=">= 0"):
        M.class_accuracy(images, torch.full((5,), -1), clf)
    with pytest.raises(ValueError, match="one entry per image"):
        M.class_accuracy(images, labels[:3], clf)


# ---------------------------------------------------------------------------------------------
# Inception features through a scripted stand-in of NVlabs' inception-2015-12-05.pt
# ---------------------------------------------------------------------------------------------
class _InceptionStandIn(nn.Module):
    """Same call convention as NVlabs' TorchScript Inception: img (N, 3, H, W) in 0..255 (uint8 or
    float), resized to 299x299 inside, net(img, return_features=True) -> (N, 2048)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(3 * 16, 2048, generator=g) * 0.1)
        self.logits = nn.Parameter(torch.randn(2048, 1008, generator=g) * 0.01)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.shape[1] == 3
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        feats = torch.relu(F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj)
        if return_features:
            return feats
        return feats @ self.logits


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    net = _InceptionStandIn().eval()
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but the real file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(path))
    return path, net


def test_inception_torchscript_nvlabs_and_clean(standin):
    path, net = standin
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 12, 10, generator=g) * 2 - 1  # gray, non-square: repeated to RGB
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    fe = M.InceptionFeatures(path, batch_size=2)
    assert fe.kind == "torchscript"
    f = fe(x)
    assert f.shape == (5, 2048) and f.dtype == torch.float64
    with torch.no_grad():  # the TorchScript graph may fuse differently: equal up to float32 rounding
        assert torch.allclose(f, net(u8, return_features=True).double(), rtol=1e-5, atol=1e-6)
    clean = M.InceptionFeatures(path, mode="clean")
    fc = clean(x)
    with torch.no_grad():
        ref = net(M._clean_resize_299(u8), return_features=True).double()
    assert torch.allclose(fc, ref, rtol=1e-5, atol=1e-6) and not torch.allclose(fc, f, rtol=1e-3)
    assert M._clean_resize_299(u8).shape == (5, 3, 299, 299)
    assert M.compute_fid(x, x, fe) == pytest.approx(0.0, abs=1e-6)


def test_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*inception-2015-12-05.pt"):
        M.InceptionFeatures(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="mode"):
        M.InceptionFeatures(tmp_path / "missing.pt", mode="tf")
    if importlib.util.find_spec("torch_fidelity") is None:
        sd = tmp_path / "state_dict.pth"
        torch.save({"w": torch.zeros(2)}, sd)
        with pytest.raises(ValueError, match="not a TorchScript archive.*torch_fidelity"):
            M.InceptionFeatures(sd)


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_round_trips_pixels(tmp_path, channels):
    g = torch.Generator().manual_seed(channels)
    levels = torch.randint(0, 256, (7, channels, 5, 4), generator=g)
    images = levels.float() / 127.5 - 1  # exactly representable pixel values
    up, pad, nrow = 2, 1, 3
    path = M.save_grid(images, tmp_path / "sub" / "grid.png", nrow=nrow, upscale=up, padding=pad)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == ("L" if channels == 1 else "RGB")
        arr = torch.from_numpy(np.asarray(im).copy())
    arr = arr.view(*arr.shape[:2], -1).permute(2, 0, 1)
    h, w = 5 * up, 4 * up
    assert arr.shape == (channels, 3 * (h + pad) + pad, 3 * (w + pad) + pad)
    for i in range(7):
        r, k = divmod(i, nrow)
        cell = arr[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w]
        for dy in range(up):
            for dx in range(up):
                assert torch.equal(cell[:, dy::up, dx::up].long(), levels[i])
    # defaults: square-ish grid, no padding, values clamped to [-1, 1]
    p2 = M.save_grid(torch.full((6, channels, 2, 2), 3.0), tmp_path / "g2.png")
    with Image.open(p2) as im:
        assert im.size == (3 * 2, 2 * 2) and np.asarray(im).min() == 255


def test_save_grid_errors(tmp_path):
    with pytest.raises(ValueError, match="images"):
        M.save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="upscale"):
        M.save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "x.png", upscale=0)
