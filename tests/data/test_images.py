"""Image folders: discovery, captions, conversion, crops, bad files, the check report."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm_cli.data.check import check_dataset, format_report
from ldm_cli.data.images import (
    DataConfig,
    ImageFolderDataset,
    holdout_count,
    load_image_rgb,
    pil_to_tensor,
    _to_rgb,
    resolve_data_root,
    tensor_to_pil,
)
from ldm_cli.errors import ConfigError, DataError

CONFIGS = Path(__file__).resolve().parents[2] / "ldm_cli" / "configs" / "data"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def rgb_array(path: Path) -> np.ndarray:
    return np.asarray(load_image_rgb(path)).astype(int)


# ----------------------------------------------------------------------------- conversion

def test_grayscale_8_and_16_bit_become_rgb(tmp_path):
    Image.new("L", (4, 3), 77).save(tmp_path / "l.png")
    gray16 = np.full((3, 4), 40000, dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for name, value in [("l.png", 77), ("g16.png", round(40000 / 257))]:
        image = load_image_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (4, 3)
        assert (np.asarray(image) == value).all(), name


def test_int32_and_float_modes(tmp_path):
    Image.fromarray(np.full((2, 2), 65535, dtype=np.int32), "I").save(tmp_path / "i.tif")
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert (rgb_array(tmp_path / "i.tif") == 255).all()
    assert (np.abs(rgb_array(tmp_path / "f.tif") - 128) <= 1).all()


def test_palette_with_transparency_composites_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] + [255, 0, 0] * 255)  # index 0 blue, 1.. red
    palette.paste(1, (0, 0, 2, 4))
    palette.info["transparency"] = 0  # blue index is transparent
    palette.save(tmp_path / "p.png", transparency=0)
    pixels = rgb_array(tmp_path / "p.png")
    assert (pixels[:, :2] == [255, 0, 0]).all()  # opaque red stays
    assert (pixels[:, 2:] == [255, 255, 255]).all()  # transparent -> white, not blue
    Image.new("RGB", (2, 2), (10, 20, 30)).save(tmp_path / "trns.png", transparency=(10, 20, 30))
    assert (rgb_array(tmp_path / "trns.png") == 255).all()  # RGB with a transparent colour key


def test_half_transparent_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # colour (200, 0, 0) at alpha 128
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = 128 / 255
    expected = [200 * alpha + 255 * (1 - alpha), 255 * (1 - alpha), 255 * (1 - alpha)]
    assert np.abs(rgb_array(tmp_path / "rgba.png") - expected).max() <= 1


def test_gray_alpha_and_palette_alpha(tmp_path):
    gray_alpha = np.dstack([np.full((2, 2), 0, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)])
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")  # black: transparent | opaque
    pixels = rgb_array(tmp_path / "la.png")
    assert (pixels[:, 0] == 255).all() and (pixels[:, 1] == 0).all()
    palette_alpha = Image.new("PA", (2, 2), (0, 0))  # palette index 0, alpha 0
    palette_alpha.putpalette([10, 20, 30] * 256)
    assert (np.asarray(_to_rgb(palette_alpha)) == 255).all()
    palette_alpha.putalpha(255)
    assert (np.asarray(_to_rgb(palette_alpha)) == [10, 20, 30]).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)  # red
    pixels = rgb_array(tmp_path / "cmyk.jpg")
    assert np.abs(pixels - [255, 0, 0]).max() <= 3


def test_exif_orientation_rotates(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = [255, 0, 0]  # left half red
    stored[:, 20:] = [0, 0, 255]  # right half blue
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image_rgb(tmp_path / "rot.jpg")
    assert upright.size == (20, 40)  # width and height swapped
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # stored left (red) is now on top
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_tensor_round_trip_and_range():
    image = noise_image(5, 3)
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 3, 5) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert pil_to_tensor(Image.new("RGB", (1, 1), (0, 255, 0))).flatten().tolist() == [-1.0, 1.0, -1.0]
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), np.asarray(image))
    assert (np.asarray(tensor_to_pil(torch.full((1, 3, 2, 2), 5.0))) == 255).all()  # clipped
    assert (np.asarray(tensor_to_pil(torch.full((3, 2, 2), -5.0))) == 0).all()


# ----------------------------------------------------------------------------- discovery, captions

def test_recursive_discovery_of_every_format(tmp_path):
    names = ["a.png", "b.JPG", "sub/c.jpeg", "sub/deep/d.webp", "e.bmp", "f.tif", "sub/g.TIFF"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(8, 8).save(tmp_path / name, format=Image.registered_extensions()[Path(name).suffix.lower()])
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    noise_image(8, 8).save(tmp_path / ".hidden" / "x.png")
    noise_image(8, 8).save(tmp_path / "._resource.png")
    dataset = ImageFolderDataset(tmp_path, resolution=8, split="all")
    relative = [path.relative_to(tmp_path).as_posix() for path in dataset.paths]
    assert relative == sorted(names)
    for item in dataset:
        assert item["image"].shape == (3, 8, 8)
    assert dataset.bad_files == []


def test_captions_from_sidecars_jsonl_and_csv(tmp_path):
    for name in ["a.png", "b.png", "sub/c.png", "csvdir/d.png", "none.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(8, 8).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("  a sidecar caption\n")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "loses to the sidecar"}) + "\n"
        + json.dumps({"file_name": "b.png", "text": "b from jsonl"}) + "\n\n"
        + json.dumps({"file_name": "gone.png", "text": "no such image"}) + "\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "c, relative"}) + "\n")
    (tmp_path / "csvdir" / "metadata.csv").write_text('file_name,text\nd.png,"d, from csv"\n')
    dataset = ImageFolderDataset(tmp_path, resolution=8, split="all")
    captions = {path.relative_to(tmp_path).as_posix(): caption for path, caption in zip(dataset.paths, dataset.captions)}
    assert captions == {"a.png": "a sidecar caption", "b.png": "b from jsonl", "sub/c.png": "c, relative",
                        "csvdir/d.png": "d, from csv", "none.png": ""}
    item = dataset[dataset.paths.index(tmp_path / "b.png")]
    assert item["caption"] == "b from jsonl" and item["path"] == str(tmp_path / "b.png")


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "/etc/passwd"])
def test_caption_entry_escaping_the_root_is_rejected(tmp_path, file_name):
    root = tmp_path / "data"
    root.mkdir()
    noise_image(8, 8).save(root / "a.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    with pytest.raises(DataError, match="metadata.jsonl:1.*points outside"):
        ImageFolderDataset(root, resolution=8)


def test_malformed_metadata_is_a_data_error(tmp_path):
    noise_image(8, 8).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl:2"):
        ImageFolderDataset(tmp_path, resolution=8)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found in .*looked for .png, .jpg"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="no images found"):
        check_dataset(tmp_path)


# ----------------------------------------------------------------------------- bad files

def make_folder_with_bad_files(root: Path) -> list[str]:
    good = []
    for index in range(5):
        path = root / f"good{index}.png"
        noise_image(12, 12, seed=index).save(path)
        good.append(str(path))
    noise_image(64, 64).save(root / "whole.jpg", quality=90)
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    (root / "bad_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "bad_empty.png").write_bytes(b"")
    (root / "bad_garbage.png").write_bytes(b"this is not a png at all" * 10)
    return good


def test_bad_files_are_skipped_counted_and_reported_once(tmp_path, capsys):
    good = make_folder_with_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=8, split="all")
    assert len(dataset) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = [dataset[i]["path"] for i in range(len(dataset))]
        second = [dataset[i]["path"] for i in range(len(dataset))]
    assert sorted(dataset.bad_files) == sorted(str(tmp_path / n) for n in
                                                ["bad_truncated.jpg", "bad_empty.png", "bad_garbage.png"])
    assert not [w for w in caught if "unreadable" in str(w.message)]  # ldm's own lines, not Python warnings
    skipped = capsys.readouterr().err.splitlines()
    assert len(skipped) == 3 and all(line.startswith("warning: skipping unreadable image: ") for line in skipped)
    assert any("bad_empty.png" in line for line in skipped)
    assert set(first) == set(good) and first == second  # every good item, deterministic substitutes
    # a bad item is replaced by the next good one in order
    assert first[0] == str(tmp_path / "good0.png") and dataset[0]["index"] == 3


def test_truncated_file_is_not_loaded_silently(tmp_path):
    noise_image(64, 64).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    (tmp_path / "x.png").write_bytes(data[:-40])
    with pytest.raises(DataError, match="x.png.*truncated"):
        load_image_rgb(tmp_path / "x.png")


def test_dataloader_runs_over_bad_files(tmp_path):
    make_folder_with_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=8, split="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=4))
    assert [batch["image"].shape for batch in batches] == [(4, 3, 8, 8), (4, 3, 8, 8)]
    assert len(batches[0]["caption"]) == 4


def test_all_bad_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="none of the 1 images"):
            dataset[0]


# ----------------------------------------------------------------------------- crops, splits

def test_resize_and_center_crop_match_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision.transforms")
    image = noise_image(60, 30, seed=3)  # 60x30 -> 32x16 exactly, even spare width
    image.save(tmp_path / "a.png")
    dataset = ImageFolderDataset(tmp_path, resolution=16, crop="center", split="all")
    reference = torchvision.Compose([
        torchvision.Resize(16, interpolation=torchvision.InterpolationMode.BICUBIC, antialias=True),
        torchvision.CenterCrop(16),
    ])(image)
    assert torch.equal(dataset[0]["image"], pil_to_tensor(reference))


def test_random_crop_and_flip_depend_only_on_seed_epoch_index(tmp_path):
    for index in range(4):
        noise_image(40, 24, seed=index).save(tmp_path / f"{index}.png")
    def epoch_items(seed, epoch):
        dataset = ImageFolderDataset(tmp_path, resolution=16, crop="random", random_flip=True,
                                     split="all", seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["image"] for i in range(len(dataset))]
    torch.manual_seed(0)
    np.random.seed(0)
    first = epoch_items(seed=1, epoch=0)
    torch.manual_seed(123)  # global RNG state must not matter
    np.random.seed(123)
    again = epoch_items(seed=1, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    later = [epoch_items(seed=1, epoch=e) for e in range(1, 6)]
    assert any(not torch.equal(a, b) for epoch in later for a, b in zip(first, epoch))
    other_seed = epoch_items(seed=2, epoch=0)
    assert any(not torch.equal(a, b) for a, b in zip(first, other_seed))


def test_random_flip_flips_about_half(tmp_path):
    image = noise_image(16, 16)
    image.save(tmp_path / "a.png")
    dataset = ImageFolderDataset(tmp_path, resolution=16, random_flip=True, split="all")
    plain = pil_to_tensor(image)
    flips = 0
    for epoch in range(40):
        dataset.set_epoch(epoch)
        item = dataset[0]["image"]
        flipped = torch.equal(item, plain.flip(-1))
        assert flipped or torch.equal(item, plain)
        flips += flipped
    assert 8 <= flips <= 32


def test_holdout_split_is_deterministic_disjoint_and_seed_free(tmp_path):
    for index in range(30):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{index:02d}.png")
    train = ImageFolderDataset(tmp_path, resolution=4, split="train", holdout_fraction=0.1, seed=0)
    holdout = ImageFolderDataset(tmp_path, resolution=4, split="holdout", holdout_fraction=0.1, seed=5)
    assert len(holdout) == 3 and len(train) == 27
    assert not set(train.paths) & set(holdout.paths)
    again = ImageFolderDataset(tmp_path, resolution=4, split="holdout", holdout_fraction=0.1, seed=9)
    assert again.paths == holdout.paths
    assert [holdout_count(n, 0.05) for n in (0, 1, 2, 10, 100)] == [0, 0, 1, 1, 5]
    assert holdout_count(3, 0.9) == 2 and holdout_count(10, 0.0) == 0


# ----------------------------------------------------------------------------- config

def test_yaml_files_fit_the_config_dataclass():
    for name in ("default", "shapes"):
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert text.startswith("#")
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONFIGS / f"{name}.yaml")))
        config.validate()
    shapes = OmegaConf.load(CONFIGS / "shapes.yaml")
    assert shapes.resolution == 32 and shapes.random_flip is False and shapes.source == "shapes"
    default = OmegaConf.load(CONFIGS / "default.yaml")
    assert default.path is None and default.resolution == 256 and default.crop == "center"


def test_config_validation_and_from_config(tmp_path):
    with pytest.raises(ConfigError, match="crop"):
        DataConfig(crop="middle").validate()
    with pytest.raises(ConfigError, match="holdout_fraction"):
        DataConfig(holdout_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="data.path is not set"):
        ImageFolderDataset.from_config(DataConfig())
    noise_image(8, 8).save(tmp_path / "a.png")
    dataset = ImageFolderDataset.from_config(DataConfig(path=str(tmp_path), resolution=8), split="all")
    assert dataset[0]["image"].shape == (3, 8, 8)


def test_resolve_data_root_generates_shapes_once(tmp_path):
    config = DataConfig(source="shapes", resolution=16, num_images=6)
    root = resolve_data_root(config, tmp_path)
    assert len(list(root.glob("*.png"))) == 6
    stamp = (root / "metadata.jsonl").stat().st_mtime_ns
    assert resolve_data_root(config, tmp_path) == root
    assert (root / "metadata.jsonl").stat().st_mtime_ns == stamp
    dataset = ImageFolderDataset.from_config(config, root=root, split="all")
    assert dataset[0]["caption"].startswith("a ") and dataset[0]["image"].shape == (3, 16, 16)
    assert resolve_data_root(DataConfig(path=str(tmp_path)), tmp_path) == tmp_path


# ----------------------------------------------------------------------------- check report

def test_check_report_numbers(tmp_path):
    make_folder_with_bad_files(tmp_path)
    noise_image(30, 20).save(tmp_path / "wide.jpg")
    Image.new("L", (10, 40)).save(tmp_path / "tall.png")
    (tmp_path / "good0.txt").write_text("a caption")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.jpg", "text": "wide"}) + "\n")
    report = check_dataset(tmp_path, resolution=16)
    assert report.n_images == 10 and report.n_bad == 3 and report.n_good == 7
    assert sorted(Path(path).name for path, _ in report.bad_files) == ["bad_empty.png", "bad_garbage.png",
                                                                        "bad_truncated.jpg"]
    assert dict(report.bad_files)[str(tmp_path / "bad_truncated.jpg")].startswith("image file is truncated")
    assert report.n_captioned == 2 and report.caption_coverage == pytest.approx(20.0)
    assert report.width == (10, 12, 30) and report.height == (12, 12, 40)
    assert report.formats == {"PNG": 6, "JPEG": 1} and report.modes == {"RGB": 6, "L": 1}
    assert report.n_smaller == 6  # five 12x12 and the 10-wide one
    text = format_report(report)
    assert "images: 10 (7 readable, 3 bad)" in text and "captions: 2/10 (20.0%)" in text
    assert "bad_empty.png: empty file" in text and "width: min 10 / median 12 / max 30" in text


def test_large_jpeg_reduced_decode_matches_full_decode(tmp_path):
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128 + 0 * ramp[None, :]), -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    dataset = ImageFolderDataset(tmp_path, resolution=32, split="all")
    full = pil_to_tensor(load_image_rgb(tmp_path / "big.jpg").resize((32, 32), Image.Resampling.BICUBIC))
    assert load_image_rgb(tmp_path / "big.jpg", min_size=32).size == (32, 32)  # decoded at 1/8
    assert load_image_rgb(tmp_path / "big.jpg", min_size=33).size == (64, 64)  # never below min_size
    assert (dataset[0]["image"] - full).abs().max() < 0.06


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.jsonl"])
def test_non_utf8_metadata_is_one_line(tmp_path, name):
    noise_image(12, 12).save(tmp_path / "a.png")
    body = "file_name,text\na.png,caf\xe9\n" if name.endswith(".csv") else '{"file_name": "a.png", "text": "caf\xe9"}\n'
    (tmp_path / name).write_bytes(body.encode("latin-1"))
    with pytest.raises(DataError, match=f"{name} is not UTF-8 text \\(byte 0xe9 at offset \\d+\\); save it as UTF-8"):
        ImageFolderDataset(tmp_path, resolution=8, split="all")
