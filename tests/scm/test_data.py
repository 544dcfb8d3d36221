"""Tests of scm.data: the digits split (fixed, stratified, disjoint), image folders (labels from
sub-folders, center crop + resize, corrupt files skipped with one warning), .npz arrays, build_dataset,
and BatchStream (epochs are permutations, resume continues identically, the ranks' slices concatenated
equal the 1-rank global batch including the flips)."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from scm.data import BatchStream, DigitsDataset, ImageFolderDataset, NpzDataset, build_dataset

pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def digits():
    return {s: DigitsDataset(s) for s in ("train", "holdout", "all")}


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------
def test_digits_split_fixed_stratified_disjoint(digits):
    from sklearn.datasets import load_digits

    tr, ho, al = digits["train"], digits["holdout"], digits["all"]
    assert (len(tr), len(ho), len(al)) == (1500, 297, 1797)
    a, b = set(tr.indices.tolist()), set(ho.indices.tolist())
    assert not a & b and a | b == set(range(1797))
    # stratified: every class within 1 image of its proportional share 297 * n_k / 1797
    counts_all = torch.bincount(al.labels, minlength=10).double()
    counts_ho = torch.bincount(ho.labels, minlength=10).double()
    assert ((counts_ho - 297 * counts_all / 1797).abs() < 1).all()
    # the same split on every construction
    again = DigitsDataset("holdout")
    assert torch.equal(again.indices, ho.indices) and torch.equal(again.images, ho.images)
    # values v in 0..16 -> v / 8 - 1, labels = targets
    raw = load_digits()
    i = int(ho.indices[5])
    assert torch.equal(ho.images[5, 0], torch.from_numpy(raw.images[i]).float() / 8 - 1)
    assert int(ho.labels[5]) == int(raw.target[i])
    assert ho.images.dtype == torch.float32 and ho.images.shape[1:] == (1, 8, 8)
    assert float(al.images.min()) == -1.0 and float(al.images.max()) == 1.0
    x, y = tr[3]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64 and y.ndim == 0
    x.zero_()  # items are copies: the dataset is unchanged
    assert not torch.equal(tr[3][0], x)
    assert tr.num_classes == 10 and tr.class_names == [str(k) for k in range(10)]


def test_digits_resolution_channels_labels():
    d = DigitsDataset("holdout", 16, channels=3, use_labels=False)
    assert d.images.shape == (297, 3, 16, 16)
    assert float(d.images.min()) >= -1 and float(d.images.max()) <= 1
    assert torch.equal(d.images[:, 0], d.images[:, 2])
    assert (d.labels == -1).all() and d.num_classes == 0
    # downsampling an 8x8 digit to 4x4 averages 2x2 blocks (antialiased bilinear at factor 2)
    d4 = DigitsDataset("holdout", 4)
    d8 = DigitsDataset("holdout")
    assert torch.allclose(d4.images, torch.nn.functional.avg_pool2d(d8.images, 2), atol=1e-6)
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="channels"):
        DigitsDataset("train", channels=2)
    with pytest.raises(TypeError, match="resolution"):
        DigitsDataset("train", 8.0)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_folder(root):
    rng = np.random.default_rng(0)
    # class "b_dog" sorts after "a_cat"
    _png(root / "b_dog" / "d0.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _png(root / "b_dog" / "sub" / "d1.PNG", rng.integers(0, 256, (9, 9), dtype=np.uint8))  # gray, nested
    _png(root / "a_cat" / "c0.jpg", rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))
    # non-square: 8 tall x 16 wide, white in the centered 8x8, black on the sides -> all white after crop
    arr = np.zeros((8, 16, 3), dtype=np.uint8)
    arr[:, 4:12] = 255
    _png(root / "a_cat" / "c1.png", arr)
    # corrupt files: a truncated PNG, a text file named .jpg, an empty file
    good = root / "b_dog" / "d0.png"
    (root / "a_cat" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "b_dog" / "notes.jpg").write_text("this is not a JPEG\n")
    (root / "b_dog" / "empty.png").write_bytes(b"")
    (root / "b_dog" / "readme.txt").write_text("ignored: not an image extension")
    (root / ".hidden").mkdir()
    _png(root / ".hidden" / "h.png", arr)  # hidden folders are ignored


def test_image_folder_labels_crop_and_corrupt_files(tmp_path):
    _make_folder(tmp_path)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tmp_path, 4, channels=3)
    ours = [w for w in rec if "ImageFolderDataset" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    msg = str(ours[0].message)
    for bad in ("truncated.png", "notes.jpg", "empty.png"):
        assert bad in msg
    assert "3 unreadable" in msg and len(ds.skipped) == 3
    assert len(ds) == 4 and ds.num_classes == 2 and ds.class_names == ["a_cat", "b_dog"]
    names = [p.split("/")[-1] for p in ds.files]
    assert names == ["c0.jpg", "c1.png", "d0.png", "d1.PNG"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 4, 4) and ds.images.dtype == torch.uint8
    x, y = ds[1]
    assert x.dtype == torch.float32 and int(y) == 0
    assert torch.allclose(x, torch.ones_like(x), atol=1 / 127.5)  # center crop kept the white middle
    x3, _ = ds[3]
    assert torch.equal(x3[0], x3[1]) and torch.equal(x3[1], x3[2])  # gray file -> RGB
    # a whole epoch through the stream never meets a corrupt file
    s = BatchStream(ds, 3, seed=1)
    for _ in range(4):
        xb, yb = s.next()
        assert xb.shape == (3, 3, 4, 4) and float(xb.abs().max()) <= 1
    # gray, no labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = ImageFolderDataset(tmp_path, 8, channels=1, use_labels=False)
    assert g.images.shape == (4, 1, 8, 8) and (g.labels == -1).all() and g.num_classes == 0


def test_image_folder_flat_and_errors(tmp_path):
    _png(tmp_path / "flat" / "a.png", np.full((5, 5, 3), 255, dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path / "flat", 5)
    assert len(ds) == 1 and int(ds.labels[0]) == -1 and ds.num_classes == 0
    assert torch.equal(ds[0][0], torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="root"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        ImageFolderDataset(tmp_path / "none", 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="could be read"):
        ImageFolderDataset(tmp_path / "bad", 8)


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------
def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    y = np.arange(6) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = NpzDataset(tmp_path / "a.npz", 4, 3)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.labels.tolist() == y.tolist()
    assert torch.equal(ds[2][0], torch.from_numpy(x[2]).permute(2, 0, 1).float() / 127.5 - 1)
    # float [0, 1] gray (N, H, W) under the key "images", resized 4 -> 2 and repeated to RGB, no labels
    f = rng.random((5, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=f)
    ds = NpzDataset(tmp_path / "b.npz", 2, 3)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(f)[:, None] * 2 - 1, 2).expand(-1, 3, -1, -1)
    assert torch.allclose(ds.get_batch(torch.arange(5))[0], ref, atol=1e-6)
    assert (ds.labels == -1).all()
    # RGB -> gray luma
    ds = NpzDataset(tmp_path / "a.npz", 4, 1, use_labels=False)
    w = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    rgb = torch.from_numpy(x[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(ds[0][0][0], (rgb * w).sum(0), atol=1e-5)
    np.savez(tmp_path / "c.npz", z=x)
    with pytest.raises(ValueError, match="'x' or 'images'"):
        NpzDataset(tmp_path / "c.npz", 4, 3)
    np.savez(tmp_path / "d.npz", x=f * 3)
    with pytest.raises(ValueError, match="value_range"):
        NpzDataset(tmp_path / "d.npz", 4, 1)
    assert len(NpzDataset(tmp_path / "d.npz", 4, 1, value_range=(0, 3))) == 5


def test_build_dataset(tmp_path):
    d = build_dataset(types.SimpleNamespace(source="digits", path=None, resolution=8, channels=1, use_labels=True),
                      split="holdout")
    assert isinstance(d, DigitsDataset) and len(d) == 297
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 8, 8), np.uint8))
    n = build_dataset(dict(source="npz", path=str(tmp_path / "a.npz"), resolution=8, channels=1, use_labels=True))
    assert isinstance(n, NpzDataset) and len(n) == 3
    _png(tmp_path / "f" / "k" / "a.png", np.zeros((8, 8, 3), np.uint8))
    f = build_dataset(dict(source="folder", path=str(tmp_path / "f"), resolution=8, channels=3, use_labels=True))
    assert isinstance(f, ImageFolderDataset) and f.num_classes == 1
    with pytest.raises(ValueError, match="source"):
        build_dataset(dict(source="cifar", resolution=8))
    with pytest.raises(ValueError, match="holdout"):
        build_dataset(dict(source="npz", path=str(tmp_path / "a.npz"), resolution=8, channels=1), split="holdout")
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(dict(source="folder", path=None, resolution=8, channels=3))


# ---------------------------------------------------------------------------------------------
# BatchStream
# ---------------------------------------------------------------------------------------------
class _IndexImages:
    """Dataset without get_batch whose image i is an asymmetric 1x2x3 pattern holding i (flips visible)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]).view(1, 2, 3) * 0.01 + i
        return x, torch.tensor(i % 4)


def _ids(x):
    """Dataset indices of a batch of _IndexImages (the row minimum is i whether flipped or not)."""
    return x[:, 0, 0, :].min(-1).values.round().long()


def test_stream_epochs_are_permutations_and_deterministic():
    ds = _IndexImages(10)
    s = BatchStream(ds, 4, seed=3)
    ids = torch.cat([_ids(s.next()[0]) for _ in range(5)])  # 20 = 2 epochs
    assert sorted(ids[:10].tolist()) == list(range(10)) and sorted(ids[10:].tolist()) == list(range(10))
    assert not torch.equal(ids[:10], ids[10:])
    assert s.state_dict() == {"epoch": 2, "pos": 0, "seed": 3} and s.nimg == 20
    t = BatchStream(ds, 4, seed=3)
    ids2 = torch.cat([_ids(t.next()[0]) for _ in range(5)])
    assert torch.equal(ids, ids2)
    u = BatchStream(ds, 4, seed=4)
    assert not torch.equal(ids, torch.cat([_ids(u.next()[0]) for _ in range(5)]))
    # a global batch larger than the dataset wraps into the next epochs
    big = BatchStream(ds, 25, seed=0)
    x, y = big.next()
    assert x.shape == (25, 1, 2, 3) and big.state_dict()["epoch"] == 2 and big.state_dict()["pos"] == 5


def test_stream_resume_continues_identically(digits):
    ds = digits["train"]
    ref = BatchStream(ds, 96, seed=7, hflip=True)
    batches = [ref.next() for _ in range(20)]  # 1920 images: crosses an epoch boundary mid-batch
    s = BatchStream(ds, 96, seed=7, hflip=True)
    for _ in range(8):
        s.next()
    state = s.state_dict()
    assert set(state) == {"epoch", "pos", "seed"} and all(type(v) is int for v in state.values())
    r = BatchStream(ds, 96, seed=123, hflip=True)  # the seed comes from the state
    r.load_state_dict(state)
    for k in range(8, 20):
        x, y = r.next()
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    with pytest.raises(ValueError, match="pos"):
        r.load_state_dict({"epoch": 0, "pos": 5000, "seed": 7})
    with pytest.raises(ValueError, match="keys"):
        r.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("world_size", [2, 3])
def test_stream_rank_slices_equal_global_batch(world_size):
    ds = _IndexImages(13)
    gb = 6
    one = BatchStream(ds, gb, seed=5, hflip=True)
    ranks = [BatchStream(ds, gb, seed=5, rank=r, world_size=world_size, hflip=True) for r in range(world_size)]
    flipped = 0
    for _ in range(9):  # crosses epoch boundaries
        x, y = one.next()
        parts = [s.next() for s in ranks]
        assert all(p[0].shape[0] == gb // world_size for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        flipped += int((x[:, 0, 0, 0] > x[:, 0, 0, 2]).sum())
    assert all(s.state_dict() == one.state_dict() for s in ranks)
    assert 0 < flipped < 9 * gb  # some images flipped, not all


def test_stream_hflip_mirrors_images(digits):
    ds = digits["train"]
    plain = BatchStream(ds, 300, seed=2)
    flip = BatchStream(ds, 300, seed=2, hflip=True)
    x0, y0 = plain.next()
    x1, y1 = flip.next()
    assert torch.equal(y0, y1)
    same = (x0 == x1).flatten(1).all(1)
    mirrored = (x0.flip(-1) == x1).flatten(1).all(1)
    assert bool((same | mirrored).all())
    frac = float((mirrored & ~same).double().mean())
    assert 0.3 < frac < 0.7, frac


def test_stream_errors():
    ds = _IndexImages(4)
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(ds, 5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchStream(ds, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(TypeError, match="global_batch"):
        BatchStream(ds, 4.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        BatchStream(_IndexImages(0), 4, seed=0)
