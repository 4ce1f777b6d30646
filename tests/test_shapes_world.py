import json

import numpy as np
import pytest

from diffinv.shapes.classifier import attribute_accuracy, classify
from diffinv.shapes.tokenizer import VOCABULARY, learn_bpe, load_tokenizer, write_tokenizer_files
from diffinv.shapes.world import (
    COLOURS,
    all_attribute_combinations,
    coverage,
    held_out_combinations,
    parse_caption,
    render,
    sample_scenes,
)


def test_generator_is_seeded_and_follows_the_world_rules():
    a, b = sample_scenes(50, seed=3), sample_scenes(50, seed=3)
    assert a == b and a != sample_scenes(50, seed=4)
    for s in a:
        assert s.colour != s.background
        img = render(s)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert tuple(img[0, 0]) == COLOURS[s.background] or tuple(img[-1, -1]) == COLOURS[s.background]
        assert parse_caption(s.caption) == s.attributes
        lo, hi = (3.84, 5.76) if s.size == "small" else (7.68, 10.24)
        assert lo <= s.r <= hi


def test_shapes_are_inside_the_frame_and_antialiased():
    for s in sample_scenes(200, seed=5):
        cov = coverage(s.shape, s.cx, s.cy, s.r)
        area = {"circle": np.pi, "square": (2 * 0.886) ** 2, "triangle": 3 * np.sqrt(3) / 4 * 1.3**2}[s.shape] * s.r**2
        assert abs(cov.sum() - area) < 0.05 * area  # the whole shape is drawn
    cov = coverage("circle", 16, 16, 6)
    assert ((cov > 0) & (cov < 1)).any()  # soft edges


def test_square_has_the_circle_area():
    circle = coverage("circle", 16, 16, 8).sum()
    assert abs(coverage("square", 16, 16, 8).sum() - circle) < 0.04 * circle  # up to the 4x grid's quantisation


def test_held_out_captions_are_never_in_training():
    held = held_out_combinations()
    assert len(all_attribute_combinations()) == 180 and len(held) == 20
    train = {tuple(s.attributes.values()) for s in sample_scenes(2000, seed=1, split="train")}
    assert train.isdisjoint(held) and len(train) == 160
    assert {tuple(s.attributes.values()) for s in sample_scenes(300, seed=1, split="held_out")} <= held


def test_classifier_agrees_with_the_generator():
    scenes = sample_scenes(600, seed=11)
    acc = attribute_accuracy([classify(render(s)) for s in scenes], [s.attributes for s in scenes])
    assert acc["all"] >= 0.99, acc


def test_classifier_survives_mild_noise():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(200, seed=12)
    noisy = [np.clip(render(s) + rng.normal(0, 10, (32, 32, 3)), 0, 255) for s in scenes]
    acc = attribute_accuracy([classify(x) for x in noisy], [s.attributes for s in scenes])
    assert acc["all"] >= 0.98, acc


def test_edited_scene_keeps_geometry():
    s = sample_scenes(1, seed=2)[0]
    e = s.edited(colour=next(c for c in COLOURS if c not in (s.colour, s.background)))
    assert (e.cx, e.cy, e.r, e.shape) == (s.cx, s.cy, s.r, s.shape)
    big = s.edited(size="big" if s.size == "small" else "small")
    assert big.size != s.size and big.r != s.r


def test_bpe_merges_make_every_word_one_token(tmp_path):
    merges = learn_bpe()
    assert len(merges) == len(set(merges))
    tok = load_tokenizer(write_tokenizer_files(tmp_path))
    for w in VOCABULARY:
        assert tok.tokenize(w) == [w + "</w>"], w
    ids = tok("a big red circle on a green background", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id and ids[9] == tok.eos_token_id
    # shipped files are exactly what the generator writes
    from diffinv.backbone import embedded_model_path

    shipped = embedded_model_path() / "tokenizer"
    if shipped.exists():
        assert json.loads((shipped / "vocab.json").read_text()) == json.loads((tmp_path / "vocab.json").read_text())
        assert (shipped / "merges.txt").read_text() == (tmp_path / "merges.txt").read_text()


def test_parse_caption_rejects_foreign_text():
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption("a photo of a cat")
