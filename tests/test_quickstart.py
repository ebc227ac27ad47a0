import json

import numpy as np

from ldm_cli.data.shapes import draw_shape_image, parse_caption
from ldm_cli.eval.adherence import adherence_prompts, score_adherence
from ldm_cli.quickstart import HELD_OUT_PAIRS, write_training_shapes


def test_the_u_nets_shapes_leave_out_the_held_out_pairs_and_the_autoencoders_keep_them(tmp_path):
    def pairs(root):
        entries = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
        return entries, {(parse_caption(e["text"])["colour"], parse_caption(e["text"])["shape"]) for e in entries}

    everything, captioned = write_training_shapes(tmp_path, 300, 16)
    entries, seen = pairs(captioned)
    assert not seen & HELD_OUT_PAIRS
    assert 200 < len(entries) < 300  # some were removed, most kept
    assert sorted(p.name for p in captioned.glob("*.png")) == sorted(e["file_name"] for e in entries)
    assert all((captioned / e["file_name"]).read_bytes() == (everything / e["file_name"]).read_bytes() for e in entries)
    all_entries, all_seen = pairs(everything)
    assert len(all_entries) == 300 and HELD_OUT_PAIRS <= all_seen
    assert len(list(everything.glob("*.png"))) == 300
    assert write_training_shapes(tmp_path, 300, 16) == (everything, captioned)  # complete: kept as it is


def test_adherence_scores_true_and_wrong_captions():
    rng = np.random.default_rng(0)
    drawn = [draw_shape_image(rng, 32) for _ in range(20)]
    images, captions = [d[0] for d in drawn], [d[1] for d in drawn]
    perfect = score_adherence(images, captions)
    assert perfect["colour_and_shape"] == 1.0 and perfect["position"] == 1.0
    shuffled = score_adherence(images, captions[1:] + captions[:1])
    assert shuffled["colour_and_shape"] < 0.5
    assert len(adherence_prompts(5)) == 5 and adherence_prompts(5) == adherence_prompts(5)


def test_adherence_stage_reports_random_and_held_out_prompts_with_intervals(tmp_path, monkeypatch):
    from ldm_cli import quickstart
    from tests.sampling.helpers import write_tiny_latent_diffusion

    model = write_tiny_latent_diffusion(tmp_path / "model", resolution=32)
    monkeypatch.setitem(quickstart.PRESET, "adherence_prompts", 6)
    monkeypatch.setitem(quickstart.PRESET, "held_out_prompts", 4)
    monkeypatch.setitem(quickstart.PRESET, "sample_steps", 2)
    reports = quickstart.adherence(model, tmp_path / "adherence", "cpu")
    assert set(reports) == {"random", "held_out"}
    assert reports["random"]["prompts"] == 6 and reports["held_out"]["prompts"] == 4
    assert len(list((tmp_path / "adherence" / "held_out").glob("*.png"))) == 4
    for report in reports.values():
        both = report["colour_and_shape"]
        assert 0 <= both["low"] <= both["rate"] <= both["high"] <= 1 and both["n"] == report["prompts"]
    asked = {colour for rows in reports["held_out"]["colour_confusion"].values() for colour in rows}
    assert asked <= {colour for colour, _ in HELD_OUT_PAIRS}
    json.dumps(reports)  # summary.json takes it as it is


def test_reconstruction_adherence_scores_the_autoencoders_round_trip(tmp_path):
    from ldm_cli.quickstart import reconstruction_adherence
    from tests.sampling.helpers import write_tiny_latent_diffusion

    model = write_tiny_latent_diffusion(tmp_path / "model", resolution=32)  # random weights: shapes are lost
    report = reconstruction_adherence(model, 8, 32)
    assert report["prompts"] == 8 and report["colour_and_shape"]["n"] == 8
    assert report["colour_and_shape"]["rate"] < 0.5


def test_quickstart_end_to_end_with_the_decoder_fine_tuned_beside_the_unet(tmp_path, monkeypatch):
    """Every stage at toy sizes: the shipped model carries the fine-tuned decoder, and a re-run resumes."""
    from ldm_cli import quickstart
    from ldm_cli.autoencoder.load import bundle_latent_space
    from ldm_cli.bundle import load_bundle

    for key, value in {"images": 48, "adherence_prompts": 4, "held_out_prompts": 2, "reconstructions": 4,
                       "sample_steps": 2, "decoder_steps": {"bf16": 2, "fp32": 2}}.items():
        monkeypatch.setitem(quickstart.PRESET, key, value)
    monkeypatch.setattr(quickstart, "GRID_PROMPTS", quickstart.GRID_PROMPTS[:2])
    tiny = ["train.batch_size=4", "train.eval_batches=1", "train.log_with=[none]"]
    out = tmp_path / "qs"
    summary = quickstart.run_quickstart(out, "cpu", extra_vae=["train.max_steps=2", *tiny],
                                        extra_diffusion=["train.max_steps=2", "train.warmup_steps=1", *tiny])

    shipped = load_bundle(out / "diffusion" / "bundle")
    carried = load_bundle(shipped.path / "autoencoder", kind="autoencoder")
    tuned, first = load_bundle(out / "vae-decoder" / "bundle"), load_bundle(out / "vae" / "bundle")
    assert tuned.meta["trained_steps"] == 2 and (out / "vae-decoder.log").is_file()
    assert carried.content_hash == tuned.content_hash == shipped.meta["autoencoder"]["content_hash"] != first.content_hash
    assert bundle_latent_space(tuned) == bundle_latent_space(first)
    assert summary["vae"]["psnr"] == tuned.meta["holdout_metrics"]["psnr"]
    assert summary["vae_before_decoder_fine_tune"]["psnr"] == first.meta["holdout_metrics"]["psnr"]
    assert summary["adherence"]["random"]["prompts"] == 4
    assert json.loads((out / "summary.json").read_text())["vae"]["reconstruction_adherence"]["prompts"] == 4

    again = quickstart.run_quickstart(out, "cpu", extra_vae=["train.max_steps=2", *tiny],
                                      extra_diffusion=["train.max_steps=2", "train.warmup_steps=1", *tiny])
    assert load_bundle(out / "diffusion" / "bundle").content_hash == shipped.content_hash  # nothing retrained
    assert again["vae"]["psnr"] == summary["vae"]["psnr"]
