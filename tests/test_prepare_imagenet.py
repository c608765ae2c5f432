"""Tests for tvm_jax.data.prepare_imagenet (ImageNet folder -> VAE-latent ArrayRecord shards).

Everything is built here: a tiny class folder (images of several sizes and PIL modes, a truncated
JPEG, a text file, an empty class) and a tiny random diffusers-format VAE (written with numpy
safetensors; factor-2 downsampling, so --size 16 gives 8x8x4 latents). The suite's conftest gives
the CPU backend 4 devices, so every batch is split over a 4-device mesh.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tvm_jax.data import prepare_imagenet as prep
from tvm_jax.data import records
from tvm_jax.vae import load_vae
from weight_fixtures import TINY_VAE_CONFIG, write_vae_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
LATENT_SHAPE = (8, 8, 4)
VAE_CONFIG = TINY_VAE_CONFIG
CLASSES = ["n01_cat", "n02_dog", "n03_fox", "n04_empty"]
# (relative path, label) of every candidate file, in the tool's order; None marks the bad ones.
GOOD = ["n01_cat/a.jpg", "n01_cat/b.png", "n01_cat/c.JPEG", "n01_cat/d.png",
        "n02_dog/e.png", "n02_dog/f.gif", "n02_dog/g.jpg", "n02_dog/sub/h.png",
        "n03_fox/i.png", "n03_fox/k.png"]
BAD = ["n02_dog/broken.jpg", "n03_fox/readme.txt"]
ORDER = ["n01_cat/a.jpg", "n01_cat/b.png", "n01_cat/c.JPEG", "n01_cat/d.png",
         "n02_dog/broken.jpg", "n02_dog/e.png", "n02_dog/f.gif", "n02_dog/g.jpg", "n02_dog/sub/h.png",
         "n03_fox/i.png", "n03_fox/k.png", "n03_fox/readme.txt"]


def _label(rel: str) -> int:
    return CLASSES.index(rel.split("/")[0])


def _smooth(rng, h, w, c):
    """A smooth-ish random image (so resampling filters matter), uint8."""
    small = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), c)).astype(np.uint8)
    img = Image.fromarray(small if c > 1 else small[..., 0]).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img)
    noise = rng.integers(-20, 21, arr.shape)
    return np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8)


def make_image_folder(root):
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(os.path.join(root, c), exist_ok=True)
    os.makedirs(os.path.join(root, "n02_dog", "sub"))
    j = lambda rel: os.path.join(root, rel)  # noqa: E731
    Image.fromarray(_smooth(rng, 30, 40, 3)).save(j("n01_cat/a.jpg"), quality=95)
    Image.fromarray(_smooth(rng, 23, 17, 3)).save(j("n01_cat/b.png"))
    Image.fromarray(_smooth(rng, 50, 50, 1)[..., 0], "L").save(j("n01_cat/c.JPEG"), format="JPEG")
    Image.fromarray((_smooth(rng, 18, 22, 1)[..., 0].astype(np.uint16) * 257)).save(j("n01_cat/d.png"))  # 16 bit
    Image.fromarray(_smooth(rng, 20, 16, 4), "RGBA").save(j("n02_dog/e.png"))
    Image.fromarray(_smooth(rng, 70, 33, 3)).convert("P").save(j("n02_dog/f.gif"))
    Image.fromarray(_smooth(rng, 48, 64, 3)).convert("CMYK").save(j("n02_dog/g.jpg"))
    Image.fromarray(_smooth(rng, 24, 24, 3)).save(j("n02_dog/sub/h.png"))
    Image.fromarray(_smooth(rng, 30, 30, 2), "LA").save(j("n03_fox/i.png"))
    pal = Image.fromarray(_smooth(rng, 20, 20, 3)).convert("P")
    pal.info["transparency"] = 0
    pal.save(j("n03_fox/k.png"), transparency=0)
    # A truncated JPEG and a text file: both must be skipped and reported.
    Image.fromarray(_smooth(rng, 40, 40, 3)).save(j("n02_dog/broken.jpg"), quality=90)
    data = open(j("n02_dog/broken.jpg"), "rb").read()
    open(j("n02_dog/broken.jpg"), "wb").write(data[: len(data) // 2])
    open(j("n03_fox/readme.txt"), "w").write("not an image\n")
    open(j("n01_cat/.DS_Store"), "wb").write(b"\0\1")  # hidden: ignored
    open(j("LICENSE"), "w").write("loose file in SRC: ignored\n")
    return root


def read_shards(out):
    from array_record.python.array_record_module import ArrayRecordReader

    result = []
    for p in records.shard_paths(str(out)):
        r = ArrayRecordReader(p)
        result.append((os.path.basename(p), r.read_all()))
        r.close()
    return result


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read() for p in records.shard_paths(str(out))}


def args(src, out, vae, *extra):
    return ["--src", str(src), "--out", str(out), "--size", str(SIZE), "--vae", str(vae), "--num_workers", "0",
            *extra]


def reference_center_crop(pil_image, image_size):
    """guided-diffusion's ``center_crop_arr``, re-typed from its description, for comparison."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagenet") / "train"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return str(write_vae_folder(tmp_path_factory.mktemp("vae") / "tiny"))


@pytest.fixture(scope="module")
def fp32_out(tmp_path_factory, src, vae_dir):
    """One complete in-process CLI run with fp32 records (batch 3 -> 4 over the 4 devices)."""
    out = tmp_path_factory.mktemp("out") / "latents"
    assert prep.main(args(src, out, vae_dir, "--dtype", "float32", "--shard_size", "5", "--batch_size", "3")) == 0
    return out


# ----------------------------------------------------------------------------- preprocessing


def test_center_crop_matches_reference():
    rng = np.random.default_rng(1)
    for (h, w), size in [((30, 40), 16), ((70, 33), 16), ((23, 17), 16), ((131, 67), 32), ((64, 200), 16),
                         ((9, 12), 16), ((512, 700), 64)]:
        img = Image.fromarray(_smooth(rng, h, w, 3))
        ours = prep.center_crop(img, size)
        ref = reference_center_crop(img, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref, err_msg=f"{h}x{w} -> {size}")


def test_center_crop_known_images():
    # 16 high, 32 wide, short side == size: no resampling, the middle 16 columns are kept.
    arr = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None] * 7, (16, 32, 3)).copy()
    np.testing.assert_array_equal(prep.center_crop(Image.fromarray(arr), 16), arr[:, 8:24])
    # 64x64 of constant 4x4 blocks: two exact BOX halvings leave one pixel per block.
    blocks = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    big = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    np.testing.assert_array_equal(prep.center_crop(Image.fromarray(big), 16), blocks)
    # A 16x48 portrait: crop rows 16..31.
    tall = np.random.default_rng(3).integers(0, 256, (48, 16, 3)).astype(np.uint8)
    np.testing.assert_array_equal(prep.center_crop(Image.fromarray(tall), 16), tall[16:32])


def test_to_rgb_modes():
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    gray = rgb[..., 0]
    out = np.asarray(prep.to_rgb(Image.fromarray(gray, "L")))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (5, 6, 1)).astype(np.uint8)], axis=-1)
    np.testing.assert_array_equal(np.asarray(prep.to_rgb(Image.fromarray(rgba, "RGBA"))), rgb)  # alpha dropped
    g16 = (gray.astype(np.uint16) * 257)
    np.testing.assert_array_equal(np.asarray(prep.to_rgb(Image.fromarray(g16)))[..., 0], gray)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert prep.to_rgb(cmyk).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(prep.to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    with pytest.raises(ValueError, match="mode F"):
        prep.to_rgb(Image.fromarray(np.zeros((2, 2), np.float32), "F"))


def test_load_image_reports_bad_files(src):
    image, reason = prep.load_image(os.path.join(src, "n02_dog/broken.jpg"), SIZE)
    assert image is None and "truncated" in reason
    image, reason = prep.load_image(os.path.join(src, "n03_fox/readme.txt"), SIZE)
    assert image is None and "UnidentifiedImageError" in reason
    image, reason = prep.load_image(os.path.join(src, "n02_dog/f.gif"), SIZE)
    assert reason is None and image.shape == (SIZE, SIZE, 3)


def test_list_dataset(src):
    classes, files = prep.list_dataset(src)
    assert classes == CLASSES
    assert [f.path for f in files] == ORDER
    assert [f.label for f in files] == [_label(p) for p in ORDER]
    assert all(f.size == os.path.getsize(os.path.join(src, f.path)) for f in files)


def test_dangling_symlink_is_listed_then_skipped(tmp_path):
    (tmp_path / "c0").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "c0" / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "c0" / "b.png")
    classes, files = prep.list_dataset(str(tmp_path))
    assert classes == ["c0"] and [(f.path, f.size) for f in files][1] == ("c0/b.png", -1)
    image, reason = prep.load_image(str(tmp_path / "c0" / "b.png"), SIZE)
    assert image is None and "FileNotFoundError" in reason


# ----------------------------------------------------------------------------- the CLI output


def test_output_records_and_metadata(fp32_out, src, vae_dir):
    out = fp32_out
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".array_record")] == [
        "latents-00000-of-00003.array_record", "latents-00001-of-00003.array_record",
        "latents-00002-of-00003.array_record"]
    assert not [n for n in names if n.endswith(".tmp")]
    with open(os.path.join(out, "classes.json")) as f:
        assert json.load(f) == {c: i for i, c in enumerate(CLASSES)}
    recs = [records.decode_record(r) for _, rs in read_shards(out) for r in rs]
    assert len(recs) == len(GOOD) == 10
    assert [r["label"] for r in recs] == [_label(p) for p in GOOD]
    assert all(r["mean"].shape == r["std"].shape == LATENT_SHAPE for r in recs)

    meta = records.read_metadata(str(out))
    assert meta["shape"] == list(LATENT_SHAPE) and meta["num_records"] == 10 and meta["num_classes"] == 4
    assert meta["resolution"] == SIZE and meta["dtype"] == "float32" and meta["num_files"] == 12
    assert meta["class_counts"] == [4, 4, 2, 0]
    assert sorted(s["path"] for s in meta["skipped"]) == sorted(BAD)
    assert all(s["reason"] for s in meta["skipped"])
    assert meta["vae"]["path"] == os.path.realpath(vae_dir) and len(meta["vae"]["sha256"]) == 64
    assert "analytic" in meta["raw_stats_method"] and meta["created"]
    # Raw statistics = the analytic moments of mean + std * eps over every record and pixel.
    m = np.stack([r["mean"] for r in recs]).reshape(-1, 4).astype(np.float64)
    s = np.stack([r["std"] for r in recs]).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(meta["raw_mean"], m.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(meta["raw_std"], np.sqrt((m ** 2 + s ** 2).mean(0) - m.mean(0) ** 2), rtol=1e-10)
    assert np.all(s > 0) and np.std(s) > 1e-3  # the std really is stored, not a constant
    # ... and they match sampling: z = mean + std * eps over many draws.
    eps = np.random.default_rng(0).standard_normal((200,) + m.shape)
    z = (m + s * eps).reshape(-1, 4)
    np.testing.assert_allclose(meta["raw_mean"], z.mean(0), atol=0.02 * np.max(meta["raw_std"]))
    np.testing.assert_allclose(meta["raw_std"], z.std(0), rtol=0.02)


def test_records_equal_direct_encoding(fp32_out, src, vae_dir):
    vae = load_vae(vae_dir)
    recs = [records.decode_record(r) for _, rs in read_shards(fp32_out) for r in rs]
    for rel, rec in zip(GOOD, recs):
        with Image.open(os.path.join(src, rel)) as im:
            im.load()
            rgb = im.convert("RGB") if not im.mode.startswith("I") else Image.fromarray(
                ((np.asarray(im).astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
        crop = reference_center_crop(rgb, SIZE)
        x = crop.astype(np.float32)[None] / 127.5 - 1.0
        mean, std = vae.encode(jnp.asarray(x))
        np.testing.assert_allclose(rec["mean"], np.asarray(mean)[0], rtol=1e-5, atol=1e-5, err_msg=rel)
        np.testing.assert_allclose(rec["std"], np.asarray(std)[0], rtol=1e-5, atol=1e-6, err_msg=rel)


def test_progress_files_cover_the_inputs(fp32_out):
    with open(os.path.join(fp32_out, "manifest.json")) as f:
        manifest = json.load(f)
    assert [s["files"] for s in manifest["shards"]] == [[0, 5], [5, 10], [10, 12]]
    assert manifest["shards"][1]["first_file"] == "n02_dog/e.png"
    with open(os.path.join(fp32_out, "files.jsonl")) as f:
        assert [json.loads(line)[2] for line in f] == ORDER
    info = json.load(open(os.path.join(fp32_out, "progress", "latents-00000-of-00003.json")))
    assert info["num_records"] == 4 and [s["path"] for s in info["skipped"]] == ["n02_dog/broken.jpg"]


def test_subprocess_cli_with_workers(tmp_path, fp32_out, src, vae_dir):
    out = tmp_path / "sub"
    cmd = [sys.executable, "-m", "tvm_jax.data.prepare_imagenet", *args(src, out, vae_dir), "--num_workers", "2",
           "--shard_size", "5", "--batch_size", "4", "--dtype", "float16"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "10 records in 3 shards, 2 files skipped" in res.stdout
    log = res.stderr
    assert "skipping" in log and "broken.jpg" in log and "readme.txt" in log
    assert "skipped files: 2" in log and "channel 3: mean" in log
    assert "classes have no images: n04_empty" in log and "per class min 0, max 4" in log
    half = [records.decode_record(r) for _, rs in read_shards(out) for r in rs]
    full = [records.decode_record(r) for _, rs in read_shards(fp32_out) for r in rs]
    assert [r["label"] for r in half] == [r["label"] for r in full]
    for a, b in zip(half, full):  # fp16 records of the same encodings
        np.testing.assert_allclose(a["mean"], b["mean"].astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(a["std"], b["std"].astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-6)


def test_limit(tmp_path, src, vae_dir):
    out = tmp_path / "lim"
    summary = prep.prepare(str(src), str(out), SIZE, str(vae_dir), limit=5, batch_size=4, shard_size=2)
    assert summary["complete"] and summary["num_records"] == 4
    assert [s["path"] for s in summary["skipped"]] == ["n02_dog/broken.jpg"]
    meta = records.read_metadata(str(out))
    assert meta["num_classes"] == 4 and meta["class_counts"] == [4, 0, 0, 0] and meta["num_files"] == 5
    assert len(records.shard_paths(str(out))) == 3


# ----------------------------------------------------------------------------- resuming


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, src, vae_dir, caplog):
    common = ("--shard_size", "4", "--batch_size", "4")
    ref = tmp_path / "ref"
    assert prep.main(args(src, ref, vae_dir, *common)) == 0
    expected = shard_bytes(ref)
    assert len(expected) == 3

    out = tmp_path / "resumed"
    assert prep.main(args(src, out, vae_dir, *common, "--max_shards", "1")) == 0
    assert sorted(shard_bytes(out)) == ["latents-00000-of-00003.array_record"]
    assert not os.path.exists(os.path.join(out, "dataset.json"))  # only once everything is there
    first = os.path.join(out, "latents-00000-of-00003.array_record")
    st = os.stat(first)

    # Crash states: a half-written shard left as .tmp, and a shard renamed into place whose
    # progress file was never written (killed between the two renames).
    assert prep.main(args(src, out, vae_dir, *common, "--max_shards", "1")) == 0
    os.remove(os.path.join(out, "progress", "latents-00001-of-00003.json"))
    with open(os.path.join(out, "latents-00002-of-00003.array_record.tmp"), "wb") as f:
        f.write(b"partial garbage")
    with open(os.path.join(out, "progress", "latents-00002-of-00003.json.tmp"), "w") as f:
        f.write("{\"num_rec")
    caplog.clear()
    summary = prep.prepare(str(src), str(out), SIZE, str(vae_dir), batch_size=4, shard_size=4)
    assert summary["complete"] and summary["shards_reused"] == 1 and summary["shards_written"] == 2
    text = caplog.text
    assert "re-encoding latents-00001-of-00003.array_record: its progress file is missing" in text
    assert "discarding the partial file" in text and "latents-00002-of-00003.array_record.tmp" in text
    assert shard_bytes(out) == expected  # same bytes, same order, no duplicates
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    after = os.stat(first)
    assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # verified and kept, not redone
    meta_ref, meta = records.read_metadata(str(ref)), records.read_metadata(str(out))
    for k in ("num_records", "raw_mean", "raw_std", "class_counts", "skipped", "shards", "shape"):
        assert meta[k] == meta_ref[k], k

    # A complete shard damaged later (truncated) is detected and re-encoded.
    path = os.path.join(out, "latents-00001-of-00003.array_record")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    caplog.clear()
    summary = prep.prepare(str(src), str(out), SIZE, str(vae_dir), batch_size=4, shard_size=4)
    assert summary["shards_written"] == 1 and "re-encoding latents-00001-of-00003.array_record" in caplog.text
    assert shard_bytes(out) == expected
    # A complete directory: nothing to do, everything verified.
    summary = prep.prepare(str(src), str(out), SIZE, str(vae_dir), batch_size=4, shard_size=4)
    assert summary["complete"] and summary["shards_written"] == 0 and summary["shards_reused"] == 3


# ----------------------------------------------------------------------------- refusals


def test_refuses_changed_settings_and_inputs(tmp_path, src, vae_dir, capsys):
    out = tmp_path / "out"
    assert prep.main(args(src, out, vae_dir, "--shard_size", "4", "--max_shards", "1")) == 0
    before = shard_bytes(out)
    capsys.readouterr()

    assert prep.main(args(src, out, vae_dir, "--shard_size", "4", "--dtype", "float32")) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "dtype: 'float16' there, 'float32' now" in err and "--overwrite" in err
    with pytest.raises(prep.PrepareError, match="size: 16 there, 32 now"):
        prep.prepare(str(src), str(out), 32, str(vae_dir), shard_size=4)
    with pytest.raises(prep.PrepareError, match="input file list changed"):
        prep.prepare(str(src), str(out), SIZE, str(vae_dir), shard_size=4, limit=3)
    other_vae = str(write_vae_folder(tmp_path / "other_vae", seed=1))
    with pytest.raises(prep.PrepareError, match="vae_sha256"):
        prep.prepare(str(src), str(out), SIZE, other_vae, shard_size=4)
    assert shard_bytes(out) == before  # nothing was touched

    # A changed source folder (one more image) is refused and named.
    src2 = tmp_path / "src2"
    make_image_folder(str(src2))
    out2 = tmp_path / "out2"
    prep.prepare(str(src2), str(out2), SIZE, str(vae_dir), shard_size=4, max_shards=1)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(src2 / "n01_cat" / "aa.png")
    with pytest.raises(prep.PrepareError, match=r"file #1: was \[0, \d+, \"n01_cat/b.png\"\], now \[0, \d+, "
                                                r"\"n01_cat/aa.png\"\]"):
        prep.prepare(str(src2), str(out2), SIZE, str(vae_dir), shard_size=4)

    # --overwrite discards this tool's files only; SRC and foreign files stay.
    src_files = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs)
    (out / "notes.txt").write_text("mine")
    summary = prep.prepare(str(src), str(out), SIZE, str(vae_dir), shard_size=4, dtype="float32", overwrite=True)
    assert summary["complete"] and records.read_metadata(str(out))["dtype"] == "float32"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs) == src_files


def test_refuses_bad_paths(tmp_path, src, vae_dir, capsys):
    assert prep.main(args(tmp_path / "nope", tmp_path / "o", vae_dir)) == 2
    assert "--src" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
    assert prep.main(args(src, tmp_path / "o", tmp_path / "no_vae")) == 2
    assert "VAE folder not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    empty_vae = tmp_path / "empty_vae"
    empty_vae.mkdir()
    (empty_vae / "config.json").write_text(json.dumps(VAE_CONFIG))
    with pytest.raises(prep.PrepareError, match="has no diffusion_pytorch_model.safetensors"):
        prep.prepare(str(src), str(tmp_path / "o"), SIZE, str(empty_vae))
    with pytest.raises(prep.PrepareError, match="overlap"):
        prep.prepare(str(src), os.path.join(src, "latents"), SIZE, str(vae_dir))
    with pytest.raises(prep.PrepareError, match="not a multiple of the VAE's downsampling factor 2"):
        prep.prepare(str(src), str(tmp_path / "o"), 15, str(vae_dir))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(flat / "x.png")
    with pytest.raises(prep.PrepareError, match="no class sub-folders"):
        prep.prepare(str(flat), str(tmp_path / "o"), SIZE, str(vae_dir))
    # An --out that already holds other data but no manifest.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-00000.array_record").write_bytes(b"x")
    with pytest.raises(prep.PrepareError, match="already holds data"):
        prep.prepare(str(src), str(foreign), SIZE, str(vae_dir))
    assert (foreign / "train-00000.array_record").read_bytes() == b"x"


# ----------------------------------------------------------------------------- the trainer reads it


def test_trainer_pipeline_reads_output(fp32_out):
    from tvm_jax.config import base_config
    from tvm_jax.data import pipeline

    meta = records.read_metadata(str(fp32_out))
    config = base_config()
    config.data.source = "latents"
    config.data.path = str(fp32_out)
    config.data.shape = LATENT_SHAPE
    config.data.num_classes = meta["num_classes"]
    config.data.raw_mean = tuple(meta["raw_mean"])
    config.data.raw_std = tuple(meta["raw_std"])
    config.data.worker_count = 0
    info = pipeline.dataset_info(config)
    assert info.shape == LATENT_SHAPE and info.num_classes == 4 and info.num_records == 10
    loader = pipeline.make_loader(config, global_batch_size=5, seed=0)
    xs, labels = [], []
    for _, batch in zip(range(40), loader):  # 20 epochs of the 10 records
        assert batch["x"].shape == (5, *LATENT_SHAPE) and batch["x"].dtype == np.float32
        xs.append(batch["x"])
        labels.append(batch["label"])
    x = np.concatenate(xs).reshape(-1, 4)
    labels = np.concatenate(labels)
    assert np.all(np.isfinite(x))
    assert np.bincount(labels, minlength=4).tolist() == [80, 80, 40, 0]
    # Normalised with the dataset's own raw statistics: zero mean, unit std per channel.
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.05)
