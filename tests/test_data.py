"""Tests for rl_mtd.data: sources, cache, errors, seeded splits and the on-device loader."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rl_mtd import data as data_mod
from rl_mtd.data import (
    CLASSES,
    MEAN,
    STD,
    Cifar,
    DeviceLoader,
    Split,
    load_cifar10,
    make_splits,
    normalize,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.io import CACHE_ENV, DATA_ENV, cache_dir

# --------------------------------------------------------------------------------------------
# Tiny generated datasets
# --------------------------------------------------------------------------------------------

TINY = {"train": {"airplane": 3, "cat": 2, "truck": 2}, "test": {"airplane": 1, "cat": 2}}


def _pixels(split: str, cls: str, i: int) -> np.ndarray:
    """Deterministic random pixels for one tiny-dataset image."""
    seed = (_SPLIT_IDS[split] * 100 + CLASSES.index(cls)) * 100 + i
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


_SPLIT_IDS = {"train": 1, "test": 2}


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so pixels compare exactly
    return buf.getvalue()


def _tiny_files(layout: dict = TINY) -> dict[str, bytes]:
    """Relative path -> PNG bytes for a tiny ImageFolder dataset."""
    return {
        f"{split}/{cls}/{i:04d}.png": _png_bytes(_pixels(split, cls, i))
        for split, classes in layout.items()
        for cls, count in classes.items()
        for i in range(count)
    }


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blob)
    return root


def _write_tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for rel, blob in files.items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, blob in files.items():
            zf.writestr(rel, blob)
    return path


def _check_tiny(data: Cifar) -> None:
    """The tiny dataset came back in label order, with exact pixels."""
    assert data.classes == ("airplane", "cat", "truck")
    assert data.train.x.shape == (7, 3, 32, 32) and data.test.x.shape == (3, 3, 32, 32)
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert data.test.y.tolist() == [0, 1, 1]
    cat1 = torch.from_numpy(_pixels("train", "cat", 1)).permute(2, 0, 1)
    assert torch.equal(data.train.x[4], cat1)


# --------------------------------------------------------------------------------------------
# The real archive (decoded once per session)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def real(real_archive: Path, real_cache: Path) -> tuple[Cifar, float]:
    """The real archive, decoded once for the whole session, and how long that took."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(real_cache))
        start = time.perf_counter()
        data = load_cifar10(real_archive)
        return data, time.perf_counter() - start


def _first_cat(source: Path) -> torch.Tensor:
    """The image whose name sorts first under train/cat/ of an archive or ImageFolder directory:
    label 3's first image."""
    cats: dict[str, bytes] = {}
    if source.is_dir():
        for file in source.glob("**/train/cat/**/*"):
            if file.is_file():
                cats[file.as_posix()] = file.read_bytes()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            for name in zf.namelist():
                if "train/cat/" in name and not name.endswith("/"):
                    cats[name] = zf.read(name)
    else:
        with tarfile.open(source, "r|*") as tf:
            for member in tf:
                handle = tf.extractfile(member) if "train/cat/" in member.name else None
                if handle is not None:
                    cats[member.name] = handle.read()
    assert cats, f"no train/cat/ images in {source}"
    first = min(cats, key=lambda name: name.rsplit("train/cat/", 1)[1])
    with Image.open(io.BytesIO(cats[first])) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def test_real_archive_counts_and_labels(real: tuple[Cifar, float], real_archive: Path) -> None:
    data, _ = real
    if real_archive.is_file():  # an archive's key is its own sha256, whatever its path
        assert data.key == hashlib.sha256(real_archive.read_bytes()).hexdigest()[:16]
    # Sorted ImageFolder class names give torchvision's labels.
    assert data.classes == CLASSES
    for split, n, per_class in ((data.train, 50_000, 5000), (data.test, 10_000, 1000)):
        assert split.x.shape == (n, 3, 32, 32) and split.x.dtype == torch.uint8
        assert split.y.shape == (n,) and split.y.dtype == torch.int64
        assert torch.bincount(split.y, minlength=10).tolist() == [per_class] * 10


def test_real_archive_known_member(real: tuple[Cifar, float], real_archive: Path) -> None:
    """The first cat by file name is image 3 * 5000: images sort by label, then by file name."""
    data, _ = real
    index = 3 * 5000
    assert int(data.train.y[index]) == 3
    assert torch.equal(data.train.x[index], _first_cat(real_archive))


def test_normalize_centres_real_training_images(real: tuple[Cifar, float]) -> None:
    """MEAN and STD are the training set's statistics: normalised, each channel is ~N(0, 1)."""
    x = normalize(real[0].train.x[::5]).double()  # every 5th image keeps this fast
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    # The JPEG copy differs slightly from the binary release the constants come from.
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=0.02)
    assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=0.02)


def test_real_archive_second_load_from_cache(
    real: tuple[Cifar, float],
    real_archive: Path,
    real_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data, first_seconds = real
    monkeypatch.setenv(CACHE_ENV, str(real_cache))
    assert (real_cache / "data" / f"cifar10-{data.key}.pt").is_file()
    caplog.set_level(logging.INFO, logger="rl_mtd.data")
    start = time.perf_counter()
    again = load_cifar10(str(real_archive))
    seconds = time.perf_counter() - start
    assert "from cache" in caplog.text
    assert seconds < 5 and seconds < first_seconds
    assert again.key == data.key and again.classes == data.classes
    for a, b in ((again.train, data.train), (again.test, data.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_real_archive_splits(real: tuple[Cifar, float]) -> None:
    splits = make_splits(real[0], proxy_size=5000, seed=0, test_size=2000)
    assert (len(splits.train), len(splits.proxy), len(splits.test)) == (45_000, 5000, 2000)


# --------------------------------------------------------------------------------------------
# Other sources
# --------------------------------------------------------------------------------------------


def test_tiny_dir_zip_and_tar_load_the_same(tmp_path: Path) -> None:
    files = _tiny_files()
    from_dir = load_cifar10(_write_dir(tmp_path / "tiny", files))
    from_zip = load_cifar10(_write_zip(tmp_path / "tiny.zip", files))
    # One wrapping top-level folder, as "tar czf x.tar.gz folder/" makes.
    from_tar = load_cifar10(_write_tar(tmp_path / "tiny.tar.gz", files, prefix="cifar/"))
    for data in (from_dir, from_zip, from_tar):
        _check_tiny(data)
    assert from_zip.key == data_mod._archive_key(tmp_path / "tiny.zip")
    for data in (from_zip, from_tar):
        assert torch.equal(data.train.x, from_dir.train.x)
        assert torch.equal(data.test.x, from_dir.test.x)
    assert "ImageFolder directory" in from_dir.source and "archive" in from_zip.source


def test_imagefolder_labels_follow_cifar10_order(tmp_path: Path) -> None:
    """Sorted class folder names give CLASSES (torchvision's labels), so both sources agree."""
    layout = {split: dict.fromkeys(reversed(CLASSES), 1) for split in ("train", "test")}
    data = load_cifar10(_write_dir(tmp_path / "all", _tiny_files(layout)))
    assert data.classes == CLASSES and data.train.y.tolist() == list(range(10))
    cat = torch.from_numpy(_pixels("train", "cat", 0)).permute(2, 0, 1)
    assert torch.equal(data.train.x[CLASSES.index("cat")], cat)


def test_env_var_names_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(_write_dir(tmp_path / "tiny", _tiny_files())))
    _check_tiny(load_cifar10())


def test_folder_cache_is_written_and_corrupt_cache_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _write_dir(tmp_path / "tiny", _tiny_files())
    first = load_cifar10(root)
    cache_file = cache_dir() / "data" / f"cifar10-{first.key}.pt"
    assert cache_file.is_file()
    cache_file.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="rl_mtd.data"):
        rebuilt = load_cifar10(root)
    assert "ignoring unreadable cache file" in caplog.text
    _check_tiny(rebuilt)
    assert torch.load(cache_file, weights_only=True)["version"] == data_mod._CACHE_VERSION


def test_folder_key_changes_when_a_file_changes(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tiny", _tiny_files())
    before = load_cifar10(root).key
    (root / "test/cat/0002.png").write_bytes(_png_bytes(_pixels("test", "cat", 2)))
    assert load_cifar10(root).key != before


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b = load_cifar10("synthetic"), load_cifar10("synthetic")
    assert (len(a.train), len(a.test)) == (2000, 500)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.key == b.key and a.classes == CLASSES
    assert torch.bincount(a.train.y, minlength=10).tolist() == [200] * 10
    assert not torch.equal(a.train.x[:500], a.test.x)
    small = load_cifar10("synthetic:100,30")
    assert (len(small.train), len(small.test)) == (100, 30) and small.key != a.key
    # Signal check: even a nearest-class-mean classifier beats chance (10%) by far.
    train, test = a.train.x.float().flatten(1), a.test.x.float().flatten(1)
    centroids = torch.stack([train[a.train.y == c].mean(0) for c in range(10)])
    pred = torch.cdist(test, centroids).argmin(1)
    assert (pred == a.test.y).float().mean() > 0.5


def test_torchvision_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool, bool]] = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    (tmp_path / "tv" / "cifar-10-batches-py").mkdir(parents=True)
    for path in (tmp_path / "tv", tmp_path / "tv" / "cifar-10-batches-py"):
        data = load_cifar10(path)
        assert data.train.x.shape == (6, 3, 32, 32) and data.test.y.tolist() == [0, 1, 2, 3]
        assert int(data.train.x[0, 2, 5, 5]) == 7 and data.classes == CLASSES
    assert calls[0] == (str(tmp_path / "tv"), True, False)
    # "cifar10" and None download into the cache (here: the fake, so no network).
    load_cifar10("cifar10")
    load_cifar10(None, download=True)
    assert calls[-1] == (str(cache_dir() / "torchvision"), False, True)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(RlMtdError, match="does not exist") as info:
        load_cifar10(missing)
    assert str(missing) in str(info.value) and "--data" in str(info.value)


def test_archive_without_train(tmp_path: Path) -> None:
    files = _tiny_files({"test": {"airplane": 2, "cat": 2}})
    archive = _write_tar(tmp_path / "only-test.tar.gz", files)
    with pytest.raises(RlMtdError, match=r"no images under train/") as info:
        load_cifar10(archive)
    assert str(archive) in str(info.value)


def test_directory_without_test(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "only-train", _tiny_files({"train": {"cat": 1, "dog": 1}}))
    with pytest.raises(RlMtdError, match=r"no test/ folder"):
        load_cifar10(root)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tiny", _tiny_files())
    (root / "train/cat/bad.jpg").write_bytes(b"\xff\xd8 this is not a JPEG at all")
    with pytest.raises(RlMtdError, match="cannot decode image") as info:
        load_cifar10(root)
    assert "bad.jpg" in str(info.value)


def test_corrupt_image_in_archive_names_the_member(tmp_path: Path) -> None:
    files = {**_tiny_files(), "train/truck/9999.jpg": b"garbage"}
    with pytest.raises(RlMtdError, match=r"cannot decode image 'train/truck/9999.jpg'"):
        load_cifar10(_write_zip(tmp_path / "bad.zip", files))


def test_wrong_image_size(tmp_path: Path) -> None:
    root = _write_dir(tmp_path / "tiny", _tiny_files())
    Image.new("RGB", (40, 30)).save(root / "test/cat/big.png")
    with pytest.raises(RlMtdError, match=r"big.png is 40x30, expected 32x32"):
        load_cifar10(root)


def test_empty_class_set(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "empty" / split / "cat").mkdir(parents=True)
    with pytest.raises(RlMtdError, match=r"no images under train/<class>/"):
        load_cifar10(tmp_path / "empty")


def test_unknown_archive_type_and_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "data.rar").write_bytes(b"whatever")
    with pytest.raises(RlMtdError, match="unknown archive type"):
        load_cifar10(tmp_path / "data.rar")
    (tmp_path / "stuff" / "misc").mkdir(parents=True)
    with pytest.raises(RlMtdError, match="neither cifar-10-batches-py/ nor train/ and test/"):
        load_cifar10(tmp_path / "stuff")


def test_truncated_archive(tmp_path: Path) -> None:
    archive = _write_tar(tmp_path / "full.tar.gz", _tiny_files())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(RlMtdError, match="corrupt or truncated"):
        load_cifar10(cut)


def test_bad_synthetic_spec() -> None:
    for spec in ("synthetic:10", "synthetic:a,b", "synthetic:0,5", "synthetic:1,2,3"):
        with pytest.raises(RlMtdError, match="synthetic:NTRAIN,NTEST"):
            load_cifar10(spec)


def test_download_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(RlMtdError, match="could not be downloaded") as info:
        load_cifar10()
    assert "--data PATH" in str(info.value) and DATA_ENV in str(info.value)
    with pytest.raises(RlMtdError, match="downloading is off"):
        load_cifar10(download=False)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _indexed(n_train: int = 100, n_test: int = 40) -> Cifar:
    """A dataset whose labels are the image indices, so splits reveal which images they took."""

    def split(n: int) -> Split:
        return Split(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n))

    return Cifar(split(n_train), split(n_test), "indexed", "indexed")


def test_splits_disjoint_and_seeded() -> None:
    data = _indexed()
    a = make_splits(data, proxy_size=20, seed=0)
    b = make_splits(data, proxy_size=20, seed=0)
    c = make_splits(data, proxy_size=20, seed=1)
    proxy, train = set(a.proxy.y.tolist()), set(a.train.y.tolist())
    assert len(proxy) == 20 and len(train) == 80
    assert not proxy & train and proxy | train == set(range(100))
    assert torch.equal(a.proxy.y, b.proxy.y) and torch.equal(a.train.y, b.train.y)
    assert set(c.proxy.y.tolist()) != proxy
    assert torch.equal(a.test.y, data.test.y)  # no test_size: the whole test set


def test_split_sizes_and_errors() -> None:
    data = _indexed()
    s = make_splits(data, proxy_size=10, seed=3, train_size=30, test_size=15)
    assert (len(s.train), len(s.proxy), len(s.test)) == (30, 10, 15)
    assert not set(s.train.y.tolist()) & set(s.proxy.y.tolist())
    assert len(set(s.test.y.tolist())) == 15
    again = make_splits(data, proxy_size=10, seed=3, train_size=30, test_size=15)
    assert torch.equal(again.test.y, s.test.y)
    empty = make_splits(data, proxy_size=0)
    assert (
        len(empty.proxy) == 0 and empty.proxy.x.shape == (0, 3, 32, 32) and len(empty.train) == 100
    )
    for kwargs in (
        {"proxy_size": 100},
        {"proxy_size": -1},
        {"train_size": 0},
        {"proxy_size": 50, "train_size": 51},
        {"test_size": 41},
    ):
        with pytest.raises(RlMtdError):
            make_splits(data, **kwargs)
    moved = s.to("cpu")
    assert moved.train.x.device.type == "cpu" and len(moved.test) == 15


def test_split_validates() -> None:
    with pytest.raises(RlMtdError, match="uint8"):
        Split(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RlMtdError, match="int64"):
        Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# normalize and DeviceLoader
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth() -> Cifar:
    return load_cifar10("synthetic:200,50")


def test_normalize() -> None:
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    expected = (torch.tensor([0, 128, 255]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 0, 0], expected)
    batch = normalize(x.unsqueeze(0).repeat(4, 1, 1, 1))
    assert batch.shape == (4, 3, 2, 2) and torch.equal(batch[2], out)
    with pytest.raises(RlMtdError, match="uint8"):
        normalize(out)


def test_loader_shapes_counts_and_plain_values(synth: Cifar) -> None:
    split = synth.train
    loader = DeviceLoader(split, 64)
    assert len(loader) == 4  # 200 = 3 * 64 + 8
    batches = list(loader)
    assert [len(y) for _, y in batches] == [64, 64, 64, 8]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
        assert yb.dtype == torch.int64 and xb.device == split.x.device
    # No shuffle, no augment: exactly the normalised images, in order.
    assert torch.equal(torch.cat([xb for xb, _ in batches]), normalize(split.x))
    assert torch.equal(torch.cat([yb for _, yb in batches]), split.y)
    dropped = DeviceLoader(split, 64, drop_last=True)
    assert len(dropped) == 3 and [len(y) for _, y in dropped] == [64, 64, 64]
    assert (
        len(DeviceLoader(split, 1000)) == 1 and len(DeviceLoader(split, 1000, drop_last=True)) == 0
    )
    with pytest.raises(RlMtdError, match="batch_size"):
        DeviceLoader(split, 0)


def test_loader_shuffle_is_seeded_and_varies_per_epoch(synth: Cifar) -> None:
    def epochs(seed: int, n: int = 2) -> list[list[torch.Tensor]]:
        loader = DeviceLoader(synth.train, 50, shuffle=True, augment=True, seed=seed)
        return [[torch.cat([xb.flatten(), yb.float()]) for xb, yb in loader] for _ in range(n)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(p, q) for ea, eb in zip(a, b) for p, q in zip(ea, eb))
    assert not torch.equal(a[0][0], a[1][0])  # epoch 2 differs from epoch 1
    assert not torch.equal(a[0][0], c[0][0])  # another seed differs
    loader = DeviceLoader(synth.train, 50, shuffle=True, seed=0)
    labels = torch.cat([yb for _, yb in loader])
    assert sorted(labels.tolist()) == sorted(synth.train.y.tolist())  # a permutation


def test_loader_augment_is_a_crop_and_flip(synth: Cifar) -> None:
    split = Split(synth.train.x[:16], synth.train.y[:16])
    plain = next(iter(DeviceLoader(split, 16)))[0]
    aug, yb = next(iter(DeviceLoader(split, 16, augment=True, seed=5)))
    assert aug.shape == plain.shape and aug.dtype == torch.float32
    assert torch.equal(yb, split.y)  # augmentation never reorders
    assert not torch.equal(aug, plain)
    padded = torch.nn.functional.pad(split.x, (4, 4, 4, 4))  # zero padding, uint8
    for i in range(len(split)):
        candidates = [
            normalize(crop.flip(-1) if flip else crop)
            for dy in range(9)
            for dx in range(9)
            for crop in [padded[i, :, dy : dy + 32, dx : dx + 32]]
            for flip in (False, True)
        ]
        assert any(torch.equal(aug[i], cand) for cand in candidates), f"image {i}"


def test_loader_channels_last(synth: Cifar) -> None:
    xb, _ = next(iter(DeviceLoader(synth.test, 8, augment=True, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    plain, _ = next(iter(DeviceLoader(synth.test, 8, channels_last=True)))
    assert torch.equal(plain, normalize(synth.test.x[:8]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_loader_on_cuda(synth: Cifar) -> None:
    split = synth.train.to("cuda")
    a = [xb for xb, _ in DeviceLoader(split, 64, shuffle=True, augment=True, seed=2)]
    b = [xb for xb, _ in DeviceLoader(split, 64, shuffle=True, augment=True, seed=2)]
    assert a[0].device.type == "cuda" and all(torch.equal(p, q) for p, q in zip(a, b))
