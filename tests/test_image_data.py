"""Image datasets (wgan_kernels.train.images) on real file formats written into tmp_path."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from wgan_kernels.train.images import ImageData, load_images, save_grid

R = 16


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _gray(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")


def _reference(path, resolution, mode):
    """Independent expectation: shorter side -> resolution (LANCZOS), centre square, [-1, 1]."""
    im = Image.open(path).convert(mode)
    w, h = im.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    im = im.resize((nw, nh), Image.LANCZOS)
    x0, y0 = (nw - resolution) // 2, (nh - resolution) // 2
    a = np.asarray(im.crop((x0, y0, x0 + resolution, y0 + resolution)), dtype=np.float32) / 255.0 * 2 - 1
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.fixture
def mixed_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    _rgb(rng, 40, 50).save(root / "a.png")  # landscape
    im = _rgb(rng, 40, 33).convert("RGBA")
    im.putalpha(Image.fromarray(rng.integers(0, 256, (40, 33), dtype=np.uint8)))
    im.save(root / "d.PNG")  # RGBA, upper-case extension
    _gray(rng, 45, 20).save(root / "e.JPEG", quality=90)  # grey JPEG, portrait
    _rgb(rng, 20, 30).save(root / "sub" / "b.jpg", quality=90)
    _gray(rng, 25, 25).save(root / "sub" / "deeper" / "c.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"garbage")  # hidden: ignored
    (root / ".cache" / "x.png").write_bytes(b"garbage")  # hidden folder: ignored
    order = ["a.png", "d.PNG", "e.JPEG", "sub/b.jpg", "sub/deeper/c.png"]
    return root, [root / p for p in order]


@pytest.fixture
def gray_folder(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "gray"
    root.mkdir()
    base = rng.integers(0, 256, (30, 24), dtype=np.uint8)
    Image.fromarray(base, "L").save(root / "g0.png")
    Image.fromarray(base.astype(np.uint16) * 257).save(root / "g1.png")  # 16-bit grey, same picture
    _gray(rng, 18, 26).convert("LA").save(root / "g2.png")
    _gray(rng, 20, 20).save(root / "g3.jpg")
    return root


def _write_cifar_batch(path, data, label):
    batch = {b"batch_label": label, b"labels": [int(i % 10) for i in range(len(data))],
             b"data": data, b"filenames": [b"img_%d.png" % i for i in range(len(data))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture
def cifar(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    b1 = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    b2 = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    _write_cifar_batch(d / "data_batch_1", b1, b"training batch 1 of 5")
    _write_cifar_batch(d / "data_batch_2", b2, b"training batch 2 of 5")
    _write_cifar_batch(d / "test_batch", rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"testing batch 1 of 1")
    return tmp_path / "cifar", np.concatenate([b1, b2])


# ---------------------------------------------------------------------------------------------
# values and shapes


def test_folder_values_and_centre_crop(mixed_folder):
    root, files = mixed_folder
    data = load_images(f"folder:{root}", R)
    assert isinstance(data, ImageData) and data.in_memory and data.name == f"folder:{root}"
    x = data.tensor()
    assert x.shape == (5, 3, R, R) and data.shape == (3, R, R) and len(data) == 5
    assert x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu"
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    for i, f in enumerate(files):  # sorted relative paths; RGBA and grey converted to RGB
        torch.testing.assert_close(x[i], _reference(f, R, "RGB"), atol=1e-6, rtol=0)
    idx = torch.tensor([4, 0, 2], dtype=torch.int64)
    torch.testing.assert_close(data[idx], x[idx])


def test_folder_grayscale_only_is_one_channel(gray_folder):
    data = load_images(f"folder:{gray_folder}", 12)
    x = data.tensor()
    assert x.shape == (4, 1, 12, 12) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0], _reference(gray_folder / "g0.png", 12, "L"), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[2], _reference(gray_folder / "g2.png", 12, "L"), atol=1e-6, rtol=0)
    # the 16-bit copy is scaled from 0..65535, not clipped at 255 (it is resized in float, the 8-bit
    # one in uint8 with clipping between the two resize passes: a few levels apart at most)
    diff = (x[1] - x[0]).abs()
    assert diff.max() < 0.05 and diff.mean() < 0.005


def test_folder_needs_resolution(mixed_folder):
    with pytest.raises(ValueError, match=r"^resolution: required"):
        load_images(f"folder:{mixed_folder[0]}")


def test_cifar10_layout_and_order(cifar):
    root, raw = cifar
    data = load_images(f"cifar10:{root}")
    x = data.tensor()
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and data.in_memory
    for i, c, y, col in [(0, 0, 0, 0), (3, 1, 5, 17), (6, 2, 31, 2), (9, 0, 12, 31)]:  # batch 2 follows batch 1
        assert x[i, c, y, col].item() == pytest.approx(raw[i, c * 1024 + y * 32 + col] / 255 * 2 - 1, abs=1e-6)
    torch.testing.assert_close(x, torch.from_numpy(raw).float().reshape(10, 3, 32, 32) / 255 * 2 - 1)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING / BINSTRING), as cPickle did for the
    real CIFAR-10 files, instead of Python 3's ``_codecs.encode`` reduce."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_cifar10_python2_style_batches_directly_in_folder(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump({b"batch_label": b"b", b"data": raw, b"labels": [0, 1, 2]})
    # numpy 1.x (and the real CIFAR-10 files) name the module numpy.core.multiarray
    blob = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
    (tmp_path / "data_batch_1").write_bytes(blob)  # batches directly in PATH, no subfolder
    x = load_images(f"cifar10:{tmp_path}").tensor()
    torch.testing.assert_close(x, torch.from_numpy(raw).float().reshape(3, 3, 32, 32) / 255 * 2 - 1)


def test_cifar10_resolution_64(cifar):
    x = load_images(f"cifar10:{cifar[0]}", 64).tensor()
    assert x.shape == (10, 3, 64, 64) and x.min() >= -1 and x.max() <= 1 and x.is_contiguous()


def test_tensor_files(tmp_path):
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", u8)
    x = load_images(f"tensor:{tmp_path / 'u8.npz'}").tensor()
    torch.testing.assert_close(x, torch.from_numpy(u8).float() / 255 * 2 - 1)

    f = torch.rand(4, 1, 12, 12) * 2 - 1
    torch.save(f, tmp_path / "f.pt")
    got = load_images(f"tensor:{tmp_path / 'f.pt'}")
    assert torch.equal(got.tensor(), f) and got.shape == (1, 12, 12)

    torch.save({"images": f.double(), "labels": torch.arange(4)}, tmp_path / "d.pt")
    small = load_images(f"tensor:{tmp_path / 'd.pt'}", 8).tensor()
    assert small.shape == (4, 1, 8, 8) and small.dtype == torch.float32
    ref = torch.nn.functional.interpolate(f, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(small, ref.clamp(-1, 1))

    np.savez(tmp_path / "named.npz", images=u8, labels=np.arange(5))
    assert load_images(f"tensor:{tmp_path / 'named.npz'}", 32).tensor().shape == (5, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# streaming and digests


def test_streaming_matches_memory(mixed_folder):
    root, _ = mixed_folder
    mem = load_images(f"folder:{root}", R)
    streamed = load_images(f"folder:{root}", R, memory_budget=100)
    assert mem.in_memory and not streamed.in_memory
    assert len(streamed) == 5 and streamed.shape == (3, R, R)
    idx = torch.tensor([3, 1, 1, 4, 0], dtype=torch.int64)
    out = streamed[idx]
    assert out.shape == (5, 3, R, R) and out.dtype == torch.float32
    assert torch.equal(out, mem[idx])
    with pytest.raises(RuntimeError, match="streamed"):
        streamed.tensor()


def test_digest_stable_and_sensitive(mixed_folder, tmp_path):
    root, files = mixed_folder
    spec = f"folder:{root}"
    s1, s2 = load_images(spec, R, memory_budget=0), load_images(spec, R, memory_budget=0)
    m1, m2 = load_images(spec, R), load_images(spec, R)
    assert s1.digest() == s2.digest() and m1.digest() == m2.digest()
    assert len(s1.digest()) == 64 and int(s1.digest(), 16) >= 0
    assert load_images(spec, 12, memory_budget=0).digest() != s1.digest()
    _rgb(np.random.default_rng(9), 44, 50).save(files[0])  # a different picture, different size
    assert load_images(spec, R, memory_budget=0).digest() != s1.digest()
    assert load_images(spec, R).digest() != m1.digest()


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_bad_paths_and_prefixes(tmp_path):
    with pytest.raises(ValueError, match=r"^dataset: .*no such file"):
        load_images(f"folder:{tmp_path / 'missing'}", R)
    with pytest.raises(ValueError, match=r"^dataset: unknown kind in 'imagenet:/x'.*folder:PATH.*cifar10:PATH.*tensor:PATH"):
        load_images("imagenet:/x", R)
    with pytest.raises(ValueError, match=r"^dataset: unknown kind"):
        load_images(str(tmp_path), R)
    with pytest.raises(ValueError, match=r"^dataset: empty path in 'folder:'"):
        load_images("folder:", R)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"^dataset: folder:.*empty: no images found"):
        load_images(f"folder:{empty}", R)
    (empty / "readme.md").write_text("hi")
    (empty / "data.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"^dataset: .*no images found"):
        load_images(f"folder:{empty}", R)


@pytest.mark.parametrize("bad", [0, 7, "32", True, 32.0, None])
def test_bad_resolution(mixed_folder, bad):
    with pytest.raises(ValueError, match=r"^resolution: "):
        load_images(f"folder:{mixed_folder[0]}", bad)


def test_corrupt_image(mixed_folder):
    root, _ = mixed_folder
    (root / "sub" / "broken.png").write_bytes(np.random.default_rng(5).bytes(300))
    with pytest.raises(ValueError, match=r"^dataset: folder:.*cannot read image .*broken\.png"):
        load_images(f"folder:{root}", R)
    with pytest.raises(ValueError, match=r"^dataset: folder:.*cannot read image .*broken\.png"):
        load_images(f"folder:{root}", R, memory_budget=0)  # headers are checked even when streaming


def test_truncated_image_streaming(mixed_folder):
    root, files = mixed_folder
    blob = files[0].read_bytes()
    files[0].write_bytes(blob[: len(blob) // 2])  # header intact, pixel data cut
    with pytest.raises(ValueError, match=r"^dataset: .*cannot read image .*a\.png"):
        load_images(f"folder:{root}", R)  # in memory: decoded up front
    streamed = load_images(f"folder:{root}", R, memory_budget=0)
    assert streamed[torch.tensor([1, 2])].shape == (2, 3, R, R)
    with pytest.raises(ValueError, match=r"^dataset: .*cannot read image .*a\.png"):
        streamed[torch.tensor([1, 0])]


def test_cifar_without_batches(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"^dataset: cifar10:.*no data_batch_\* files"):
        load_images(f"cifar10:{tmp_path}")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_cifar_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"^dataset: cifar10:.*data_batch_1.*refers to (os|posix|nt)\.system; "):
        load_images(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar_bad_contents(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _write_cifar_batch(d / "data_batch_1", np.zeros((4, 3000), dtype=np.uint8) + 7, b"bad")
    with pytest.raises(ValueError, match=r"^dataset: cifar10:.*data_batch_1 is not a CIFAR-10 .*\(n, 3072\).*\(4, 3000\)"):
        load_images(f"cifar10:{tmp_path}")
    (d / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"^dataset: cifar10:.*data_batch_1 is not a CIFAR-10 python batch"):
        load_images(f"cifar10:{tmp_path}")


def test_bad_tensor_files(tmp_path):
    rng = np.random.default_rng(6)

    def save(name, arr):
        p = tmp_path / name
        if name.endswith(".pt"):
            torch.save(arr, p)
        else:
            np.savez(p, *arr) if isinstance(arr, tuple) else np.savez(p, arr)
        return f"tensor:{p}"

    cases = [
        (save("3d.pt", torch.rand(4, 16, 16)), r"shape .* found \(4, 16, 16\)"),
        (save("c2.npz", rng.integers(0, 256, (4, 2, 8, 8), dtype=np.uint8)), r"found \(4, 2, 8, 8\)"),
        (save("rect.pt", torch.rand(4, 3, 8, 10)), r"H == W, found \(4, 3, 8, 10\)"),
        (save("one.pt", torch.rand(1, 3, 8, 8)), r"at least 2 images"),
        (save("range.pt", torch.rand(4, 3, 8, 8) * 3), r"values span \[.*\]; the trainer expects images in \[-1, 1\]"),
        (save("i32.pt", torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.int32)), r"unsupported dtype torch.int32"),
        (save("i32.npz", rng.integers(0, 255, (4, 3, 8, 8), dtype=np.int32)), r"unsupported dtype int32"),
        (save("two.npz", (rng.random((4, 3, 8, 8)), rng.random((4, 3, 8, 8)))),
         r"exactly one array or one named 'images'; found keys \['arr_0', 'arr_1'\]"),
    ]
    (tmp_path / "x.npy").write_bytes(b"whatever")
    cases.append((f"tensor:{tmp_path / 'x.npy'}", r"unsupported extension '\.npy'"))
    for spec, pattern in cases:
        with pytest.raises(ValueError, match=r"^dataset: tensor:") as err:
            load_images(spec)
        assert spec in str(err.value)
        assert err.match(pattern), (spec, str(err.value))


# ---------------------------------------------------------------------------------------------
# save_grid


def test_save_grid_layout_and_pixels(tmp_path):
    x = torch.from_numpy(np.random.default_rng(7).uniform(-1.3, 1.3, (5, 1, 4, 4)).astype(np.float32))
    path = tmp_path / "grid.png"
    save_grid(x, path, nrow=2, padding=2)
    assert os.listdir(tmp_path) == ["grid.png"]  # no temp file left behind
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (2 * 6 + 2, 3 * 6 + 2)  # width 14, height 20
    got = np.asarray(img)
    expect = np.zeros((20, 14, 3), dtype=np.uint8)
    v = np.floor(np.clip((x.numpy()[:, 0] + np.float32(1)) / np.float32(2), 0, 1) * np.float32(255) + np.float32(0.5))
    for k in range(5):
        top, left = (k // 2) * 6 + 2, (k % 2) * 6 + 2
        expect[top:top + 4, left:left + 4, :] = v[k][..., None].astype(np.uint8)
    np.testing.assert_array_equal(got, expect)
    assert got[:2].max() == 0 and got[14:, 8:].max() == 0  # border and the empty sixth cell are black


def test_save_grid_rgb_overwrite_and_bad_args(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(3, 3, 2, 3).contiguous()
    path = tmp_path / "g.png"
    path.write_bytes(b"old")
    save_grid(x, path, nrow=8, padding=0)
    got = np.asarray(Image.open(path))
    assert got.shape == (2, 9, 3) and (got.reshape(-1, 3) == np.array([0, 128, 255], np.uint8)).all()
    with pytest.raises(ValueError, match="^nrow: "):
        save_grid(x, path, nrow=0)
    with pytest.raises(ValueError, match="^padding: "):
        save_grid(x, path, padding=-1)
    with pytest.raises(ValueError, match="^images: "):
        save_grid(x[0], path)
    with pytest.raises(ValueError, match="^images: "):
        save_grid(torch.zeros(2, 2, 4, 4), path)
    with pytest.raises(ValueError, match="^path: "):
        save_grid(x, tmp_path / "g.jpg")
    with pytest.raises(ValueError, match="^path: "):
        save_grid(x, tmp_path / "nowhere" / "g.png")
    assert sorted(os.listdir(tmp_path)) == ["g.png"]


@pytest.mark.parametrize("n,c,nrow", [(64, 1, 8), (5, 3, 2), (10, 3, 4), (3, 1, 8)])
def test_save_grid_writes_torchvisions_pixels(tmp_path, n, c, nrow):
    """The same PNG pixels as torchvision's save_image(normalize=True, value_range=(-1, 1)) (the
    grid is written with PIL so that the library does not pin a torchvision build)."""
    tv = pytest.importorskip("torchvision")
    x = torch.from_numpy(np.random.default_rng(n).uniform(-1.2, 1.2, (n, c, 7, 9)).astype(np.float32))
    save_grid(x, tmp_path / "ours.png", nrow=nrow)
    tv.utils.save_image(x, tmp_path / "tv.png", nrow=nrow, normalize=True, value_range=(-1, 1))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ours.png")), np.asarray(Image.open(tmp_path / "tv.png")))
