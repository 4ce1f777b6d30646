"""The Python API (diffinv.api): results equal the CLI's bit for bit, batches equal items alone, records re-edit
exactly, and bad input is refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffinv
from diffinv import DiffinvError
from diffinv.cli import main
from diffinv.inversion import Inversion

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"
STEPS = 4


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.set_num_threads(1)
    return diffinv.load(str(tiny_model_dir), device="cpu")


def picture(path: Path, seed: int = 0, size=(24, 16)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB"))


def cli(subcommand: str, config: str, image: Path, model_dir: Path, out: Path, *extra: str) -> Path:
    """Run the real CLI on one image; the item's output folder."""
    try:
        main([subcommand, "-c", str(REPO / "configs" / config), "--data.image", str(image), "--data.source_prompt",
              SOURCE, "--data.target_prompts", json.dumps([TARGET]), "--model.backbone.pretrained", str(model_dir),
              "--model.num_inference_steps", str(STEPS), "--trainer.accelerator", "cpu", "--output_dir", str(out),
              *extra])
    except SystemExit as e:
        assert e.code in (0, None)
    return next(p for p in out.iterdir() if (p / "reconstruction.png").is_file())


def same_record(a: Inversion, b: Inversion) -> bool:
    tensors = ("z0", "start_latent", "trajectory", "source_image")
    return all(torch.equal(getattr(a, k).cpu(), getattr(b, k).cpu()) for k in tensors) and (
        (a.unconditional is None and b.unconditional is None) or torch.equal(a.unconditional.cpu(),
                                                                               b.unconditional.cpu()))


def test_npi_with_prompt_to_prompt_equals_the_clis(model, tiny_model_dir, tmp_path):
    image = picture(tmp_path / "cat.png")
    item = cli("predict", "edit_p2p_replace.yaml", image, tiny_model_dir, tmp_path / "cli")
    inv = model.invert(image, SOURCE, method="npi", steps=STEPS, progress=False)
    edit = inv.edit(TARGET, editor=diffinv.PromptToPrompt(mode="replace", cross_replace_steps=0.8,
                                                         self_replace_steps=0.4))
    assert inv.id == "cat" and edit.editor == "prompt_to_prompt"
    assert np.array_equal(pixels(inv.reconstruction), pixels(item / "reconstruction.png"))
    assert np.array_equal(pixels(inv.source), pixels(item / "source.png"))
    assert np.array_equal(pixels(edit.image), pixels(item / "edit-0.png"))
    assert same_record(inv.record, Inversion.load(next(item.glob("*.safetensors"))))
    plain = inv.edit(TARGET)  # the prompt swap differs from Prompt-to-Prompt: the comparison can fail
    assert not np.array_equal(pixels(plain.image), pixels(edit.image))


def test_null_text_inversion_equals_diffinv_fit(model, tiny_model_dir, tmp_path):
    image = picture(tmp_path / "cat.png", seed=1)
    item = cli("fit", "null_text.yaml", image, tiny_model_dir, tmp_path / "cli", "--model.num_inner_steps", "2")
    inv = model.invert(image, SOURCE, method="null_text", steps=STEPS, targets=[TARGET], num_inner_steps=2,
                       progress=False)
    assert np.array_equal(pixels(inv.reconstruction), pixels(item / "reconstruction.png"))
    assert np.array_equal(pixels(inv.edits[0].image), pixels(item / "edit-0.png"))
    assert same_record(inv.record, Inversion.load(next(item.glob("*.safetensors"))))


def test_sdedit_noise_is_keyed_by_the_id_as_on_the_cli(model, tiny_model_dir, tmp_path):
    image = picture(tmp_path / "cat.png", seed=2)
    item = cli("predict", "edit_sdedit.yaml", image, tiny_model_dir, tmp_path / "cli")
    saved = diffinv.load_inversion(item / "inversion.safetensors", model)  # the CLI's record: its id is 'cat'
    assert saved.id == "cat"
    assert np.array_equal(pixels(saved.edit(TARGET, editor=diffinv.SDEdit(strength=0.5, seed=0)).image),
                          pixels(item / "edit-0.png"))
    array = pixels(image)
    sdedit = diffinv.SDEdit(strength=0.5, seed=0)
    same = model.invert(array, SOURCE, steps=STEPS, id="cat", progress=False).edit(TARGET, editor=sdedit)
    other = model.invert(array, SOURCE, steps=STEPS, id="dog", progress=False).edit(TARGET, editor=sdedit)
    assert np.array_equal(pixels(same.image), pixels(item / "edit-0.png"))
    assert not np.array_equal(pixels(other.image), pixels(same.image))  # another id, other noise


@pytest.mark.parametrize("method", ["npi", "cycle_diffusion", "NTI"])
def test_a_batch_equals_each_image_alone(model, method):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    prompts = [SOURCE, "a photo of a red car"]
    options = {"num_inner_steps": 2} if method == "NTI" else {}
    batch = model.invert(images, prompts, method=method, steps=STEPS, id=["a", "b"], progress=False, **options)
    for k in (1, 0):  # in the other order
        alone = model.invert(images[k], prompts[k], method=method, steps=STEPS, id="ab"[k], progress=False, **options)
        gap = (alone.reconstruction_tensor - batch[k].reconstruction_tensor).abs().max()
        assert gap < 1e-4, (method, k, float(gap))
    assert batch[0].edit(TARGET).tensor.shape == batch[1].edit([TARGET, TARGET])[1].tensor.shape


def test_a_saved_record_re_edits_exactly(model, tmp_path):
    inv = model.invert(pixels(picture(tmp_path / "cat.png")), SOURCE, method="proxnpi", steps=STEPS, progress=False,
                       proximal=diffinv.ProximalGuidance(quantile=0.5))
    p2p = diffinv.PromptToPrompt(mode="refine", local_blend_words=["cat", "dog"])
    edit = inv.edit("a photo of a big dog", editor=p2p)
    back = diffinv.load_inversion(inv.save(tmp_path / "cat.safetensors"), model,
                                  proximal=diffinv.ProximalGuidance(quantile=0.5))
    assert torch.equal(back.reconstruction_tensor, inv.reconstruction_tensor)
    assert torch.equal(back.edit("a photo of a big dog", editor=p2p).tensor, edit.tensor)
    # seeded noise (SDEdit) is keyed by the id the record was inverted under ('image'), not by its file's name
    sdedit = diffinv.SDEdit(strength=0.6)
    assert back.id == inv.id == "image"
    assert torch.equal(back.edit(TARGET, editor=sdedit).tensor, inv.edit(TARGET, editor=sdedit).tensor)
    with pytest.raises(DiffinvError, match="does not reproduce"):  # other ProxNPI settings: refused, not re-run
        diffinv.load_inversion(tmp_path / "cat.safetensors", model)


def test_inputs_of_every_kind_give_the_same_inversion(model, tmp_path):
    path = picture(tmp_path / "x.png", seed=4)
    array = pixels(path)
    runs = [model.invert(x, SOURCE, steps=STEPS, id="x", progress=False) for x in
            (path, Image.open(path), array, array.astype(np.float32) / 255,
             torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255)]
    for r in runs[1:]:
        assert torch.equal(r.record.z0, runs[0].record.z0)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.invert(np.zeros((8, 8, 3), np.uint8), SOURCE, method="nope"), "unknown inversion method 'nope'"),
    (lambda m: m.invert(np.zeros((8, 8, 3), np.uint8), SOURCE, num_inner_step=3), "takes no option num_inner_step"),
    (lambda m: m.invert(np.zeros((8, 8, 5), np.uint8), SOURCE), r"has shape \(8, 8, 5\)"),
    (lambda m: m.invert(np.full((8, 8, 3), 2.0), SOURCE), "floats in \\[0, 1\\]"),
    (lambda m: m.invert([np.zeros((8, 8, 3), np.uint8)] * 2, [SOURCE]), "2 image\\(s\\) need as many prompts"),
    (lambda m: m.invert(np.zeros((8, 8, 3), np.uint8), "  "), "is empty"),
    (lambda m: m.invert("/nonexistent/cat.png", SOURCE), "does not exist"),
    (lambda m: m.invert(object(), SOURCE), "must be a path, a PIL image, an array or a tensor"),
    (lambda m: m.invert(np.zeros((8, 8, 3), np.uint8), SOURCE, steps=0), "num_inference_steps"),
])
def test_bad_input_is_refused_in_one_line(model, call, message):
    with pytest.raises(DiffinvError, match=message) as e:
        call(model)
    assert "\n" not in str(e.value)


def test_replace_with_other_word_counts_is_refused_before_sampling(model):
    inv = model.invert(np.zeros((16, 16, 3), np.uint8), SOURCE, steps=STEPS, progress=False)
    with pytest.raises(DiffinvError, match="equal word counts"):
        inv.edit("a photo of a big dog", editor=diffinv.PromptToPrompt(mode="replace"))


def test_the_progress_bar_can_be_turned_off(model, capsys):
    model.invert(np.zeros((16, 16, 3), np.uint8), SOURCE, method="NTI", steps=2, num_inner_steps=1, progress=False)
    assert capsys.readouterr().err == ""
    model.invert(np.zeros((16, 16, 3), np.uint8), SOURCE, method="NTI", steps=2, num_inner_steps=1)
    assert "%|" in capsys.readouterr().err  # tqdm's bar


def test_methods_are_the_registrys():
    from diffinv.inversion import registry

    assert list(diffinv.methods()) == [m.name for m in registry.METHODS]
