"""Image metrics, per image, in pixel space: RGB in [0, 1], data range 1 (torchmetrics).

* ``psnr``: 10 log10(1 / MSE) over all pixels and channels; identical images give +inf (written "inf").
* ``ssim``: 11x11 Gaussian window, sigma 1.5, averaged over pixels and channels (smaller windows for images
  under 11 pixels).
* ``mse``: mean squared error over pixels and channels.
* ``lpips_alex`` / ``lpips_vgg``: torchmetrics' LPIPS on inputs scaled to [-1, 1]; needs torchvision and the
  network weights (``pip install 'diffinv[metrics]'``), else "unavailable".
* ``clip_score``: torchmetrics' CLIPScore (100 x cosine of image and text embeddings, floored at 0) with a CLIP
  model from the hub cache or a local folder, else "unavailable".
* PIE-Bench's background preservation (``*_unedited``): as PIE-Bench computes it, both images multiplied by the
  unedited mask (1 - edit mask, the mask resized to the image with nearest neighbours), then the metric over
  the whole image; ``clip_score_edited``: CLIP score of the edited image times the edit mask.
* ``structure_distance``: PIE-Bench's structure distance (:func:`structure_distance`), DINO ViT-B/8's
  self-similarity of the last block's keys, MSE between the two images'.
* :func:`pie_bench_scores`: every column of PIE-Bench's table for one edit, on the 8-bit images as its evaluation
  code reads them (cure-lab/PnPInversion ``evaluation/evaluate.py``, ``calculate_metric``).

Weights (CLIP, DINO, LPIPS's backbones) load from a local folder or the hub cache, offline where
``HF_HUB_OFFLINE`` is set; one that is missing is one line on stderr naming what to download, and its column is
"unavailable".
"""

from __future__ import annotations

import math
import sys
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

UNAVAILABLE = "unavailable"


def mse(pred: Tensor, target: Tensor) -> float:
    return float(torch.mean((pred.double() - target.double()) ** 2))


def psnr(pred: Tensor, target: Tensor) -> float:
    """PSNR in dB of two (3, H, W) images in [0, 1] (data range 1); identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if mse(pred, target) == 0:
        return math.inf
    return float(peak_signal_noise_ratio(pred[None].float(), target[None].float(), data_range=1.0))


def ssim(pred: Tensor, target: Tensor) -> float:
    """SSIM of two (3, H, W) images in [0, 1] (see the module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, *(s if s % 2 else s - 1 for s in pred.shape[-2:]))
    return float(structural_similarity_index_measure(pred[None].float(), target[None].float(), data_range=1.0,
                                                     kernel_size=k, sigma=1.5 * k / 11))


def _tell_once(key: str, message: str) -> None:
    if key not in _told:
        _told.add(key)
        print(f"diffinv: {message}", file=sys.stderr)


_told: set[str] = set()


@lru_cache(maxsize=None)
def _lpips(net: str):
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval()
    except Exception as e:  # noqa: BLE001 - missing torchvision/lpips or weights: reported once, column unavailable
        _tell_once(f"lpips-{net}", f"LPIPS ({net}) is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                   "enable it with `pip install 'diffinv[metrics]'` where torchvision works and its weights can be "
                   "downloaded once")
        return None


def lpips(pred: Tensor, target: Tensor, net: str = "alex") -> float | str:
    metric = _lpips(net)
    if metric is None:
        return UNAVAILABLE
    with torch.no_grad():
        return float(metric(pred[None].float().clamp(0, 1), target[None].float().clamp(0, 1)))


@lru_cache(maxsize=None)
def _clip(model: str):
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        return CLIPScore(model_name_or_path=model).eval()
    except Exception as e:  # noqa: BLE001
        _tell_once(f"clip-{model}", f"CLIP score is unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                   f"download {model} where there is network (`hf download {model}`) and pass its folder as "
                   "--writer.clip_model (diffinv bench: --clip_model)")
        return None


def clip_score(image: Tensor, text: str, model: str) -> float | str:
    """CLIPScore of a (3, H, W) image, in [0, 1] (truncated to 8 bits) or already uint8 (used as it is)."""
    metric = _clip(model)
    if metric is None:
        return UNAVAILABLE
    pixels = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).to(torch.uint8)
    with torch.no_grad():
        return float(metric(pixels[None], [text]))


def masked(image: Tensor, keep: Tensor) -> Tensor:
    """The image times a (H, W) 0/1 mask."""
    return image * keep.to(image.dtype)[None]


DINO_MODEL = "facebook/dino-vitb8"
"""PIE-Bench's structure-distance network (``torch.hub`` 'dino_vitb8' there; the same weights in transformers'
ViT layout on the hub)."""
PIE_BENCH_CLIP = "openai/clip-vit-large-patch14"
"""PIE-Bench's CLIP (``MetricsCalculator.__init__``)."""
PIE_BENCH_LPIPS = "squeeze"
"""PIE-Bench's LPIPS backbone (``MetricsCalculator.__init__``: ``net_type='squeeze'``)."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@lru_cache(maxsize=None)
def _dino(model: str):
    try:
        from transformers import ViTModel

        return ViTModel.from_pretrained(model, add_pooling_layer=False).eval()
    except Exception as e:  # noqa: BLE001 - missing weights: reported once, column unavailable
        _tell_once(f"dino-{model}", f"structure distance is unavailable ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:120] if str(e) else ''}); download {model} where there is network "
                   f"(`hf download {model}`) and pass its folder (diffinv bench --dino_model)")
        return None


def dino_resize(images: Tensor, size: int = 224, max_size: int = 480) -> Tensor:
    """torchvision's ``Resize(224, max_size=480)`` on (B, 3, H, W) tensors (PIE-Bench's ``LossG.global_transform``):
    the short side to ``size``, the long one in proportion (truncated) unless it would pass ``max_size``;
    bilinear with antialiasing (torchvision >= 0.17's default for tensors)."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    return F.interpolate(images, size=out_hw, mode="bilinear", align_corners=False, antialias=True)


def _last_block(vit):
    """The last transformer block of a transformers ViT (``layers`` from transformers 5, ``encoder.layer`` before)."""
    blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    return blocks[-1]


def _key_projection(block):
    attention = block.attention
    return attention.k_proj if hasattr(attention, "k_proj") else attention.attention.key


def dino_keys_self_similarity(image: Tensor, vit) -> Tensor:
    """(T, T) cosine self-similarity of the keys of ``vit``'s last block (T = patches + CLS) for one (3, H, W)
    image with values in [0, 255], as PIE-Bench computes it (``matrics_calculator.py``: ``LossG.global_transform``,
    ``VitExtractor.get_keys_self_sim_from_input`` at ``layer_num=11`` and ``attn_cosine_sim``):

    1. Resize(224, max_size=480), then ImageNet normalisation of the 0-255 values as they are ((x - 0.485) / 0.229:
       ``calculate_structure_distance`` never divides by 255; the published figures measure that input);
    2. the keys k = W_k LN1(h) of the last block's input h, all heads side by side (their ``qkv`` output's key
       third, reshaped to (heads, T, d) and back to (T, heads d));
    3. S_ij = k_i . k_j / max(|k_i| |k_j|, 1e-8).
    """
    x = dino_resize(image[None].float())
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    native = vit.config.image_size
    out = vit(pixel_values=x, output_hidden_states=True,
              interpolate_pos_encoding=tuple(x.shape[-2:]) != (native, native))
    block = _last_block(vit)
    keys = _key_projection(block)(block.layernorm_before(out.hidden_states[-2]))[0]
    norm = keys.norm(dim=1, keepdim=True)
    return (keys @ keys.T) / torch.clamp(norm @ norm.T, min=1e-8)


def structure_distance(pred: Tensor, target: Tensor, model: str = DINO_MODEL) -> float | str:
    """PIE-Bench's structure distance of two (3, H, W) images (uint8, or floats in [0, 255]): the mean squared
    difference of their DINO key self-similarities (``LossG.calculate_global_ssim_loss``: ``F.mse_loss``); the
    table shows it x 10^3. "unavailable" without the network's weights."""
    vit = _dino(model)
    if vit is None:
        return UNAVAILABLE
    with torch.no_grad():
        return float(F.mse_loss(dino_keys_self_similarity(pred, vit), dino_keys_self_similarity(target, vit)))


PIE_BENCH_COLUMNS = {
    "structure_distance": ("structure distance ×10³", 1e3),
    "psnr_unedit_part": ("PSNR", 1.0),
    "lpips_unedit_part": ("LPIPS ×10³", 1e3),
    "mse_unedit_part": ("MSE ×10⁴", 1e4),
    "ssim_unedit_part": ("SSIM ×10²", 1e2),
    "clip_similarity_target_image": ("CLIP whole", 1.0),
    "clip_similarity_target_image_edit_part": ("CLIP edited", 1.0),
}
"""PIE-Bench's table: its evaluation's metric names (``evaluate.py``'s defaults, less the source image's CLIP)
with the heading and the factor of the paper's Table 1. Background preservation (PSNR, LPIPS, MSE, SSIM) is
measured outside the edit mask; "CLIP edited" inside it."""


def pie_bench_scores(source: Tensor, edited: Tensor, edit_mask: Tensor, target_prompt: str,
                     clip_model: str | None = PIE_BENCH_CLIP, dino_model: str = DINO_MODEL) -> dict[str, float | str]:
    """PIE-Bench's metrics of one edit in its own units (not yet scaled: :data:`PIE_BENCH_COLUMNS`), as
    ``evaluate.py``'s ``calculate_metric`` computes them: ``source`` and ``edited`` (3, H, W) uint8 images,
    ``edit_mask`` (H, W) bool (True = edited region). The background metrics multiply both images by 1 - mask
    (``MetricsCalculator.calculate_*``: images / 255, times the mask, the metric over the whole image); "CLIP
    edited" scores the edited image times the mask (``np.uint8(img * mask)``). A region that is empty gives NaN
    there ("nan" in their code). ``clip_model`` None: no CLIP columns."""
    src, out = source.float() / 255, edited.float() / 255
    keep = ~edit_mask
    scores: dict[str, float | str] = {"structure_distance": structure_distance(edited, source, dino_model)}
    if keep.any():
        a, b = masked(out, keep), masked(src, keep)
        scores |= {"psnr_unedit_part": psnr(a, b), "lpips_unedit_part": lpips(a, b, PIE_BENCH_LPIPS),
                   "mse_unedit_part": mse(a, b), "ssim_unedit_part": ssim(a, b)}
    else:
        scores |= dict.fromkeys(("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part"),
                                math.nan)
    if clip_model is not None:
        scores["clip_similarity_target_image"] = clip_score(edited, target_prompt, clip_model)
        scores["clip_similarity_target_image_edit_part"] = (
            clip_score(edited * edit_mask.to(torch.uint8)[None], target_prompt, clip_model) if edit_mask.any()
            else math.nan)
    return scores
