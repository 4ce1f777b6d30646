import json

import numpy as np
import pytest
from PIL import Image

from diffinv.data import InversionData, fit_to_model, load_image, read_manifest
from diffinv.errors import DiffinvError


def test_modes_are_converted_to_8bit_rgb(tmp_path):
    Image.new("L", (10, 6), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((6, 10), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (10, 6), 3).save(tmp_path / "pal.png")
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (6, 10, 3) and gray.dtype == np.uint8 and (gray == 128).all()
    assert (load_image(tmp_path / "clear.png") == 255).all()  # transparent -> composited on white
    assert (load_image(tmp_path / "deep.png") == 255).all()  # 16-bit full scale -> 255, not clipped garbage
    cmyk = load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (6, 10, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60
    assert load_image(tmp_path / "pal.png").shape == (6, 10, 3)


def test_exif_orientation_is_respected(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    arr = load_image(tmp_path / "rot.jpg")
    assert arr.shape == (20, 10, 3)  # displayed upright: portrait
    assert arr[:10].mean() > 200 and arr[10:].mean() < 50  # white half now on top


def test_unreadable_and_missing_files_name_the_problem(tmp_path):
    (tmp_path / "notimage.png").write_text("hello")
    with pytest.raises(DiffinvError, match="cannot read image .*notimage.png"):
        load_image(tmp_path / "notimage.png")
    with pytest.raises(DiffinvError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_fit_to_model_resizes_and_crops_to_the_vae_factor():
    img = np.zeros((30, 45, 3), dtype=np.uint8)
    out = fit_to_model(img, resolution=20, factor=8)
    assert out.shape == (16, 24, 3)  # 30x45 -> 20x30 -> cropped to multiples of 8
    assert fit_to_model(img, resolution=16, factor=4, square=True).shape == (16, 16, 3)
    same = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    assert np.array_equal(fit_to_model(same, 32, 4), same)  # already fits: untouched


def write_manifest(tmp_path, rows):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "captions.jsonl"


def test_manifest_paths_are_relative_to_its_folder_and_ids_unique(tmp_path, capsys):
    m = write_manifest(tmp_path, [{"image": "a.png", "source_prompt": "x", "target_prompts": ["y"]},
                                  {"image": "a.png", "source_prompt": "x"}])
    first = InversionData(manifest=str(m), limit=1)
    first.setup()
    assert [i.id for i in first.items] == ["a"]
    dm = InversionData(manifest=str(m))
    dm.setup()
    assert "1 item(s) have no target prompts and are only reconstructed (a-2)" in capsys.readouterr().out
    assert [i.id for i in dm.items] == ["a", "a-2"]
    assert dm.items[1].target_prompts == []
    assert read_manifest(m)[0].image == tmp_path / "a.png"


@pytest.mark.parametrize("row, message", [
    ({"image": "a.png", "source_prompt": "  "}, "source_prompt .* is empty"),
    ({"image": "a.png", "source_prompt": "x", "target_prompts": ["ok", ""]}, "target prompt 1 .* is empty"),
    ({"image": "missing.png", "source_prompt": "x"}, "missing.png does not exist"),
    ({"source_prompt": "x"}, "needs at least"),
])
def test_bad_manifest_rows_fail_before_anything_runs(tmp_path, row, message):
    m = write_manifest(tmp_path, [{"image": "a.png", "source_prompt": "fine"}, row])
    with pytest.raises(DiffinvError, match=message):
        InversionData(manifest=str(m)).setup()


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "source_prompt": "x"}\n{oops\n')
    with pytest.raises(DiffinvError, match=r"c.jsonl:2: not valid JSON"):
        read_manifest(tmp_path / "c.jsonl")


def test_command_line_item_and_conflicts(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    dm = InversionData(image=str(tmp_path / "one.png"), source_prompt="a cat", target_prompts=["a dog", "a car"])
    dm.setup()
    assert dm.items[0].target_prompts == ["a dog", "a car"]
    with pytest.raises(DiffinvError, match="needs --data.source_prompt"):
        InversionData(image=str(tmp_path / "one.png"))
    with pytest.raises(DiffinvError, match="give one of"):
        InversionData(image="x.png", source_prompt="a", manifest="m.jsonl")


def test_bundled_example_is_the_default():
    dm = InversionData()
    dm.setup()
    assert len(dm.items) >= 1 and all(i.target_prompts for i in dm.items)


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_pie_bench_mapping_file_is_read_with_markers_stripped_and_masks():
    from diffinv.data import pie_bench_mask

    dm = InversionData(pie_bench=str(FIXTURES / "pie_bench"))
    dm.setup()
    first, second = dm.items
    assert first.id == "000000000000" and first.source_prompt == "a cat sitting on a wooden chair"
    assert first.target_prompts == ["a dog sitting on a wooden chair"]
    assert second.target_prompts == ["a slanted rusty mountain bicycle on the road"]
    assert first.meta["editing_type_id"] == "1" and first.meta["blended_word"] == "cat dog"
    mask = pie_bench_mask(first.meta["mask_rle"])
    assert mask.shape == (512, 512) and mask[200:250, 100:200].all() and not mask[300, 300]
    assert mask[0].all() and mask[:, -1].all()  # the border is set, as the benchmark's decoder does
    assert mask.sum() == 50 * 100 + 4 * 511
    limited = InversionData(pie_bench=str(FIXTURES / "pie_bench"), limit=1)
    limited.setup()
    assert len(limited.items) == 1


def test_coco_captions_first_caption_seeded_draw():
    dm = InversionData(coco_captions=str(FIXTURES / "coco/captions_val2017.json"))
    dm.setup()
    assert [i.id for i in dm.items] == ["coco-139", "coco-285", "coco-632"]
    assert dm.items[0].source_prompt == "A room with chairs, a table, and a woman in it."  # lowest annotation id
    draw = lambda seed: [i.id for i in (lambda d: (d.setup(), d.items)[1])(  # noqa: E731
        InversionData(coco_captions=str(FIXTURES / "coco/captions_val2017.json"), limit=2, seed=seed))]
    assert draw(0) == draw(0) and len(draw(0)) == 2


def test_benchmark_sources_fail_clearly(tmp_path):
    with pytest.raises(DiffinvError, match="no PIE-Bench mapping file"):
        InversionData(pie_bench=str(tmp_path)).setup()
    (tmp_path / "captions.json").write_text('{"images": []}')
    with pytest.raises(DiffinvError, match="is not a COCO captions file"):
        InversionData(coco_captions=str(tmp_path / "captions.json")).setup()


def test_perturbations_are_seeded_per_item_and_do_what_they_say():
    from diffinv.data import Item, Perturbation

    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (64, 64, 3)).astype(np.uint8)
    a = Item("a", image, "a big red circle on a white background")
    b = Item("b", image, "a big red circle on a white background")
    noisy = Perturbation(pixel_noise=10, seed=1)
    once, again, other = noisy.apply(a), noisy.apply(a), noisy.apply(b)
    assert np.array_equal(once.image, again.image) and not np.array_equal(once.image, other.image)
    assert abs(float((once.image.astype(float) - image).std()) - 10) < 0.5 and once.meta["pixel_noise"] == 10
    assert np.array_equal(a.image, image)  # the original is untouched
    dropped = Perturbation(caption="drop_word", seed=3).apply(a)
    words = a.source_prompt.split()
    assert len(dropped.source_prompt.split()) == len(words) - 1
    gone = [w for w in words if w not in dropped.source_prompt.split()]
    assert len(gone) == 1 and len(gone[0]) >= 3
    assert dropped.meta["caption_before_perturbation"] == a.source_prompt
    swapped = Perturbation(caption="replace_word", neighbours={"circle": "disc", "big": "large"}).apply(a)
    assert swapped.source_prompt in ("a large red circle on a white background", "a big red disc on a white background")
    untouched = Perturbation(caption="replace_word", neighbours={"dog": "hound"}).apply(a)
    assert untouched.source_prompt == a.source_prompt and "caption_before_perturbation" not in untouched.meta
    with pytest.raises(DiffinvError, match="neighbours"):
        InversionData(perturb=Perturbation(caption="replace_word"))
    with pytest.raises(DiffinvError, match="pixel_noise"):
        InversionData(perturb=Perturbation(pixel_noise=-1))


def test_benchmark_files_json_cannot_read_are_one_line(tmp_path):
    """A PIE-Bench mapping or COCO captions file with a number or a nesting Python's json cannot read."""
    from diffinv.data import coco_rows, pie_bench_rows

    (tmp_path / "pie").mkdir()
    (tmp_path / "pie" / "mapping_file.json").write_text('{"0": {"mask": ' + "[" * 100000 + "]" * 100000 + "}}")
    with pytest.raises(DiffinvError, match=r"mapping_file.json: lists or objects nested too deeply"):
        pie_bench_rows(tmp_path / "pie")
    (tmp_path / "captions.json").write_text('{"images": [{"id": ' + "7" * 5000 + "}]}")
    with pytest.raises(DiffinvError, match=r"captions.json: a number of 5000 digits"):
        coco_rows(tmp_path / "captions.json", None, None, 0)
    (tmp_path / "pie" / "mapping_file.json").write_text("[1, 2]")
    with pytest.raises(DiffinvError, match=r"mapping_file.json: expected an object of entries, got a list"):
        pie_bench_rows(tmp_path / "pie")
