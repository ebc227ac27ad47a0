import json

import numpy as np

from ldm_cli.data.shapes import draw_shape_image, parse_caption
from ldm_cli.eval.adherence import adherence_prompts, score_adherence
from ldm_cli.quickstart import HELD_OUT_PAIRS, write_training_shapes


def test_training_shapes_leave_out_the_held_out_pairs(tmp_path):
    root = write_training_shapes(tmp_path / "data", 300, 16)
    entries = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    pairs = {(parse_caption(e["text"])["colour"], parse_caption(e["text"])["shape"]) for e in entries}
    assert not pairs & HELD_OUT_PAIRS
    assert 200 < len(entries) < 300  # some were removed, most kept
    assert sorted(p.name for p in root.glob("*.png")) == sorted(e["file_name"] for e in entries)


def test_adherence_scores_true_and_wrong_captions():
    rng = np.random.default_rng(0)
    drawn = [draw_shape_image(rng, 32) for _ in range(20)]
    images, captions = [d[0] for d in drawn], [d[1] for d in drawn]
    perfect = score_adherence(images, captions)
    assert perfect["colour_and_shape"] == 1.0 and perfect["position"] == 1.0
    shuffled = score_adherence(images, captions[1:] + captions[:1])
    assert shuffled["colour_and_shape"] < 0.5
    assert len(adherence_prompts(5)) == 5 and adherence_prompts(5) == adherence_prompts(5)
