"""PIE-Bench (Ju et al. 2024): the per-item Prompt-to-Prompt protocol, its metrics against a transcription of its
evaluation code (cure-lab/PnPInversion evaluation/matrics_calculator.py, evaluate.py), and `diffinv bench --table
pie_bench` end to end on a PIE-Bench-format folder of shapes scenes."""

import csv
import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from diffinv import BackboneConfig, DDIMInversion
from diffinv.cli import main
from diffinv.editing import PromptToPrompt
from diffinv.editing.pie_bench import PieBenchP2P
from diffinv.metrics import dino_keys_self_similarity, pie_bench_scores, structure_distance
from diffinv.shapes import world
from test_methods import item

# --- a transcription of their structure distance, with DINO's own ViT layout (one qkv Linear per block) ----------


class DinoBlock(nn.Module):
    """facebookresearch/dino vision_transformer.py: Block(Attention, Mlp), pre-norm."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.heads = heads

    def forward(self, x, store):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x))
        store.append(qkv)  # their hook on block.attn.qkv
        q, k, v = qkv.reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DinoViT(nn.Module):
    def __init__(self, dim=48, depth=3, heads=4, hidden=96, patch=8, image=224):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads, hidden) for _ in range(depth))
        self.heads, self.dim = heads, dim

    def qkv_features(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        store = []
        for blk in self.blocks:
            x = blk(x, store)
        return store


def their_structure_distance(vit: DinoViT, img_pred: np.ndarray, img_gt: np.ndarray, divide_by_255=False) -> float:
    """MetricsCalculator.calculate_structure_distance -> LossG.calculate_global_ssim_loss ->
    VitExtractor.get_keys_self_sim_from_input (last block) -> attn_cosine_sim, transcribed. Their
    Resize(224, max_size=480) of a 512x512 tensor is torchvision's F.interpolate(bilinear, antialias)."""
    def prep(a):
        t = torch.from_numpy(np.transpose(a.astype(np.float32) / (255 if divide_by_255 else 1), (2, 0, 1)))[None]
        t = F.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        return (t - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def self_sim(x):
        qkv = vit.qkv_features(x)[-1]
        patch_num = 1 + (x.shape[2] // 8) * (x.shape[3] // 8)
        keys = qkv.reshape(patch_num, 3, vit.heads, vit.dim // vit.heads).permute(1, 2, 0, 3)[1]
        h, t, d = keys.shape
        x = keys.transpose(0, 1).reshape(t, h * d)[None, None][0]
        norm1 = x.norm(dim=2, keepdim=True)
        factor = torch.clamp(norm1 @ norm1.permute(0, 2, 1), min=1e-08)
        return (x @ x.permute(0, 2, 1)) / factor

    with torch.no_grad():
        return float(F.mse_loss(self_sim(prep(img_pred)), self_sim(prep(img_gt))))


def hf_copy(dino: DinoViT):
    """The same weights in a transformers ViTModel (facebook/dino-vitb8's layout), either transformers layout."""
    from transformers import ViTConfig, ViTModel

    hf = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                            patch_size=8, image_size=224, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    sd = hf.state_dict()
    new = "layers.0.attention.k_proj.weight" in sd
    out = {"embeddings.cls_token": dino.cls_token, "embeddings.position_embeddings": dino.pos_embed,
           "embeddings.patch_embeddings.projection.weight": dino.patch_embed.weight,
           "embeddings.patch_embeddings.projection.bias": dino.patch_embed.bias}
    for i, b in enumerate(dino.blocks):
        p = f"layers.{i}." if new else f"encoder.layer.{i}."
        qkv = (["attention.q_proj", "attention.k_proj", "attention.v_proj"] if new else
               ["attention.attention.query", "attention.attention.key", "attention.attention.value"])
        for name, w, bias in zip(qkv, b.qkv.weight.chunk(3), b.qkv.bias.chunk(3)):
            out[p + name + ".weight"], out[p + name + ".bias"] = w, bias
        pairs = {"attention.o_proj" if new else "attention.output.dense": b.proj, "layernorm_before": b.norm1,
                 "layernorm_after": b.norm2, "mlp.fc1" if new else "intermediate.dense": b.fc1,
                 "mlp.fc2" if new else "output.dense": b.fc2}
        for name, module in pairs.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = module.weight, module.bias
    out |= {k: v for k, v in sd.items() if k not in out}  # the final layernorm: not on the keys' path
    assert set(out) == set(sd)
    hf.load_state_dict({k: v.detach().clone() for k, v in out.items()})
    return hf


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return DinoViT().eval()


@pytest.fixture(scope="module")
def dino_dir(dino, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dino")
    hf_copy(dino).save_pretrained(folder)
    return folder


def pair(seed: int, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    b = a.copy()
    region = b[size // 5 : size // 2, size // 10 : 3 * size // 4]
    region[:] = rng.integers(0, 256, region.shape)
    return a, b


def chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def test_structure_distance_equals_their_formula(dino, dino_dir):
    """Ours (transformers ViT, last block's keys) against their code's path (DINO's qkv hook and reshape), on the
    same random-weight ViT and images: equal to float round-off. Dividing by 255 first (a plausible 'fix') is not
    their metric: it changes the figure."""
    worst = 0.0
    for seed in range(3):
        a, b = pair(seed)
        theirs = their_structure_distance(dino, b, a)
        ours = structure_distance(chw(b), chw(a), str(dino_dir))
        worst = max(worst, abs(ours - theirs) / theirs)
        assert abs(their_structure_distance(dino, b, a, divide_by_255=True) - theirs) > 0.05 * theirs
    assert worst < 1e-5, worst
    assert structure_distance(chw(a), chw(a), str(dino_dir)) == 0.0
    from transformers import ViTModel

    sim = dino_keys_self_similarity(chw(a), ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval())
    assert sim.shape == (1 + 28 * 28, 1 + 28 * 28)  # every patch and the CLS token, as theirs


def their_background(metric, img_pred, img_gt, mask):
    """MetricsCalculator.calculate_{psnr,mse,ssim} with mask_pred = mask_gt = 1 - mask, transcribed."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.regression import MeanSquaredError

    keep = (1 - mask).astype(np.float32)
    p = img_pred.astype(np.float32) / 255 * keep
    g = img_gt.astype(np.float32) / 255 * keep
    p, g = torch.tensor(p).permute(2, 0, 1), torch.tensor(g).permute(2, 0, 1)
    if metric == "mse_unedit_part":
        return MeanSquaredError()(p.contiguous(), g.contiguous()).item()
    calc = PeakSignalNoiseRatio(data_range=1.0) if metric == "psnr_unedit_part" else StructuralSimilarityIndexMeasure(data_range=1.0)
    return calc(p[None], g[None]).item()


def test_background_and_clip_columns_equal_their_code(dino_dir, monkeypatch):
    """PSNR / MSE / SSIM outside the mask against their calculate_* on the same images; CLIP is handed exactly
    their masked 8-bit image (np.uint8(img * mask)) and the target prompt. A region that is empty is NaN ("nan")."""
    from diffinv import metrics

    seen = []
    monkeypatch.setattr(metrics, "_clip", lambda model: (lambda image, text: seen.append((image, text)) or torch.tensor(0.25)))
    worst = {}
    for seed in range(3):
        a, b = pair(seed, 64)
        mask = np.zeros((64, 64), dtype=np.float32)
        mask[15:30, 10:40] = 1  # inside the changed block: the background changed too
        scores = pie_bench_scores(chw(a), chw(b), torch.from_numpy(mask > 0), "a dog", "clip", str(dino_dir))
        for m in ("psnr_unedit_part", "mse_unedit_part", "ssim_unedit_part"):
            theirs = their_background(m, b, a, mask[..., None].repeat(3, 2))
            worst[m] = max(worst.get(m, 0.0), abs(scores[m] - theirs) / abs(theirs))
        assert scores["lpips_unedit_part"] == "unavailable"  # no torchvision here
        assert scores["clip_similarity_target_image"] == scores["clip_similarity_target_image_edit_part"] == 0.25
        whole, edited = seen[-2:]
        assert torch.equal(whole[0][0], chw(b)) and whole[1] == ["a dog"]
        assert torch.equal(edited[0][0], chw(np.uint8(b * mask[..., None].repeat(3, 2))))
        # the edit is inside the mask only: outside it, nothing changed
        b2 = a.copy()
        b2[mask > 0] = 0
        assert pie_bench_scores(chw(a), chw(b2), torch.from_numpy(mask > 0), "x", None, str(dino_dir))["mse_unedit_part"] == 0
    assert max(worst.values()) < 1e-5, worst
    everything = pie_bench_scores(chw(a), chw(b), torch.ones(64, 64, dtype=torch.bool), "a dog", "clip", str(dino_dir))
    assert np.isnan(everything["psnr_unedit_part"]) and np.isnan(everything["mse_unedit_part"])


def test_missing_weights_are_one_line_and_unavailable(capsys):
    a, b = pair(0, 32)
    scores = pie_bench_scores(chw(a), chw(b), torch.zeros(32, 32, dtype=torch.bool), "a dog", "/no/such/clip",
                              "/no/such/dino")
    assert scores["structure_distance"] == "unavailable" and scores["clip_similarity_target_image"] == "unavailable"
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("diffinv: ")]
    assert any("structure distance is unavailable" in x and "download /no/such/dino" in x for x in lines)
    assert any("CLIP score is unavailable" in x and "download /no/such/clip" in x for x in lines)
    assert "Traceback" not in err


# --- the per-item editor -----------------------------------------------------------------------------------------


def test_each_edit_gets_the_authors_settings_from_its_annotation():
    e = PieBenchP2P()
    cat_dog = {"blended_word": "cat dog"}
    assert e.setting(cat_dog, "a photo of a cat", "a photo of a dog") == ("refine", ("cat", "dog"), ("dog",))
    assert e.setting({"blended_word": ""}, "a cat", "a big cat") == ("refine", (), ())
    assert e.setting(None, "a cat", "a dog") == ("refine", (), ())
    assert e.setting({"blended_word": "cat cat"}, "a cat", "a red cat") == ("refine", ("cat",), ("cat",))
    by_count = PieBenchP2P(mode="word_count")
    assert by_count.setting(cat_dog, "a photo of a cat", "a photo of a dog")[0] == "replace"
    assert by_count.setting(cat_dog, "a photo of a cat", "a big photo of a dog")[0] == "refine"
    p2p = e.editor_for(("refine", ("cat", "dog"), ("dog",)))
    assert isinstance(p2p, PromptToPrompt) and p2p.mode == "refine"
    assert (p2p.cross_replace_steps, p2p.self_replace_steps) == (0.4, (0.0, 0.6))
    assert (p2p.local_blend_words, p2p.reweight_words, p2p.reweight_scale) == (["cat", "dog"], ["dog"], 2.0)
    assert (p2p.local_blend_threshold, p2p.local_blend_start, p2p.control_unconditional) == (0.3, 0.2, False)


STEPS = 5


def annotate(folder, entries: dict) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "mapping_file.json").write_text(json.dumps(entries))
    return str(folder)


def run(method, items):
    with torch.inference_mode():
        return method.run_batch(items)


def test_the_editor_is_per_item_and_batch_independent(tiny_model_dir, tmp_path):
    """img0 is edited with its own blend and reweighting whatever its neighbour's annotation: alone, after img1
    (other words), equal to a PromptToPrompt built from its settings; one editor for the whole batch (the first
    item's settings, a plausible mistake) would give img0 img1's empty annotation: that edit differs."""
    bb = BackboneConfig(pretrained=str(tiny_model_dir))
    root = annotate(tmp_path / "pie", {"img0": {"blended_word": "cat dog"}, "img1": {"blended_word": ""}})
    m = DDIMInversion(bb, STEPS, editor=PieBenchP2P(annotations=root))
    a, b = item(0), item(1, source="a cat on the grass", targets=["a red cat on the grass"])
    alone = run(m, [a])[0]
    after = run(m, [b, a])[1]
    torch.testing.assert_close(after.edits[0], alone.edits[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(after.reconstruction, alone.reconstruction, atol=2e-4, rtol=0)
    direct = run(DDIMInversion(bb, STEPS, editor=PieBenchP2P().editor_for(("refine", ("cat", "dog"), ("dog",)))), [a])[0]
    torch.testing.assert_close(direct.edits[0], alone.edits[0], atol=2e-4, rtol=0)
    unannotated = run(DDIMInversion(bb, STEPS, editor=PieBenchP2P()), [a])[0]
    assert (unannotated.edits[0] - alone.edits[0]).abs().max() > 1e-3  # the annotation matters
    alone_b = run(m, [b])[0]
    torch.testing.assert_close(run(m, [a, b])[1].edits[0], alone_b.edits[0], atol=2e-4, rtol=0)


# --- end to end: a PIE-Bench-format folder of shapes scenes through `diffinv bench --table pie_bench` ------------

EDITS = [  # (editing_type_id, attribute changed, blended_word of PIE-Bench's kind)
    ("1", {"shape": "circle"}, "{shape} circle"),
    ("6", {"colour": "blue"}, "{shape} {shape}"),
    ("8", {"background": "purple"}, "background background"),
]


def rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's run-length pairs (start, length) over the flattened 512x512 mask."""
    flat = np.concatenate([[0], mask.flatten().astype(np.int8), [0]])
    change = np.flatnonzero(np.diff(flat))
    starts, ends = change[0::2], change[1::2]
    return [int(v) for s, e in zip(starts, ends) for v in (s, e - s)]


def bracketed(caption: str, word: str) -> str:
    return re.sub(rf"\b{word}\b", f"[{word}]", caption, count=1)


def build_pie_bench(root) -> dict:
    """Three shapes scenes as PIE-Bench lays them out: 512x512 JPEGs in annotation_images/<type folder>/, the edit
    marked with brackets in the prompt, the edited region's mask (the shape; the background for a background edit)
    as run-length pairs."""
    entries = {}
    scenes = [s for s in world.sample_scenes(20, seed=3) if s.colour != "blue" and s.shape != "circle"
              and s.background != "purple"][: len(EDITS)]
    for k, (scene, (type_id, change, blended)) in enumerate(zip(scenes, EDITS)):
        key = f"00000000000{k}"
        path = f"{type_id}_type/{key}.jpg"
        (root / "annotation_images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(world.render(scene)).resize((512, 512), Image.NEAREST).save(root / "annotation_images" / path)
        region = world.coverage(scene.shape, scene.cx * 16, scene.cy * 16, scene.r * 16, size=512, supersample=1) > 0.5
        target = scene.edited(**change)
        changed = next(iter(change.values()))
        entries[key] = {"image_path": path, "original_prompt": scene.caption,
                        "editing_prompt": bracketed(target.caption, changed), "editing_instruction": "edit it",
                        "editing_type_id": type_id, "blended_word": blended.format(shape=scene.shape),
                        "mask": rle(~region if type_id == "8" else region)}
    (root / "mapping_file.json").write_text(json.dumps(entries))
    return entries


def test_bench_writes_pie_benchs_tables_end_to_end(dino_dir, tmp_path, monkeypatch, capsys):
    from diffinv.bench import read_pixels
    from diffinv.data import pie_bench_mask

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "PIE-Bench"
    entries = build_pie_bench(root)
    config = tmp_path / "bench_pie.yaml"
    config.write_text(json.dumps({
        "runs": [{"label": "DirectInversion+P2P", "config": "configs/reference/pie_bench_p2p.yaml"},
                 {"label": "DDIM+P2P", "config": "configs/reference/pie_bench_p2p.yaml",
                  "args": ["--model.class_path", "diffinv.inversion.DDIMInversion"]}],
        "steps": [3], "table": "pie_bench", "output_dir": str(tmp_path / "out"),
        # the annotations reach the editor with the items (--data.pie_bench), not from a second copy of the folder
        "args": ["--data.pie_bench", str(root), "--data.batch_size", "3", "--trainer.accelerator", "cpu"]}))
    main(["bench", "-c", str(config), "--dino_model", str(dino_dir), "--clip_model", "/no/such/clip-e2e"])
    out = tmp_path / "out"
    err = capsys.readouterr().err
    assert "download /no/such/clip-e2e" in err and "Traceback" not in err
    table = (out / "results.md").read_text()
    assert table.splitlines()[0] == ("| method | steps | n | structure distance ×10³ | PSNR | LPIPS ×10³ | MSE ×10⁴ | "
                                     "SSIM ×10² | CLIP whole | CLIP edited |")
    rows = {(r["label"], r["metric"]): r for r in csv.DictReader(open(out / "results.csv"))}
    for label in ("DirectInversion+P2P", "DDIM+P2P"):
        assert rows[(label, "lpips_unedit_part")]["n"] == "0" and rows[(label, "clip_similarity_target_image")]["unavailable"] == "3"
    # the figures in the paper's units, recomputed here from the run's images and masks
    run_dir = out / "DDIM+P2P" / "steps-3"
    structure, mse = [], []
    for key, e in entries.items():
        source, edit = read_pixels(run_dir / key / "source.png"), read_pixels(run_dir / key / "edit-0.png")
        assert source.shape == (3, 32, 32)
        structure.append(structure_distance(edit, source, str(dino_dir)))
        keep = torch.from_numpy(~pie_bench_mask(e["mask"])).float()[None, None]
        keep = (F.interpolate(keep, size=(32, 32), mode="nearest")[0] > 0.5).float()
        mse.append(float(((edit.float() / 255 * keep - source.float() / 255 * keep) ** 2).mean()))
    assert float(rows[("DDIM+P2P", "structure_distance")]["mean"]) == pytest.approx(1e3 * np.mean(structure), rel=1e-6)
    assert float(rows[("DDIM+P2P", "mse_unedit_part")]["mean"]) == pytest.approx(1e4 * np.mean(mse), rel=1e-5)
    assert 0 < float(rows[("DDIM+P2P", "ssim_unedit_part")]["mean"]) <= 100
    by_type = (out / "results_by_type.md").read_text()
    for name in ("| 1 change object | DirectInversion+P2P |", "| 6 change attribute color |",
                 "| 8 change background |"):
        assert name in by_type
    typed = list(csv.DictReader(open(out / "results_by_type.csv")))
    assert {r["editing_type_id"] for r in typed} == {"1", "6", "8"} and all(r["n"] in ("0", "1") for r in typed)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {x["target_prompt"] for x in lines if x["kind"] == "edit"} == {
        " ".join(e["editing_prompt"].replace("[", "").replace("]", "").split()) for e in entries.values()}
    assert all(x["edit_with"] == "prompt_to_prompt" for x in lines if x["kind"] == "edit")


def test_the_items_own_annotations_reach_the_editor(tiny_model_dir, tmp_path):
    """--data.pie_bench carries each item's annotation in Item.meta; the pipeline hands it to the editor
    (EditContext.annotations): the same edit as the annotation read from the folder by id, and not the
    unannotated one."""
    import dataclasses

    bb = BackboneConfig(pretrained=str(tiny_model_dir))
    root = annotate(tmp_path / "pie", {"img0": {"blended_word": "cat dog"}})
    from_folder = run(DDIMInversion(bb, STEPS, editor=PieBenchP2P(annotations=root)), [item(0)])[0]
    carried = dataclasses.replace(item(0), meta={"blended_word": "cat dog"})
    from_item = run(DDIMInversion(bb, STEPS, editor=PieBenchP2P()), [carried])[0]
    torch.testing.assert_close(from_item.edits[0], from_folder.edits[0], atol=1e-6, rtol=0)
    bare = run(DDIMInversion(bb, STEPS, editor=PieBenchP2P()), [item(0)])[0]
    assert (bare.edits[0] - from_item.edits[0]).abs().max() > 1e-3
