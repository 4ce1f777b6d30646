"""The typed conditioning and the text-token layout (diffinv.models.conditioning) on hand-made tensors and on each
family's tiny components."""

import pytest
import torch

from diffinv import BackboneConfig, DiffinvError, NegativePromptInversion, NullTextInversion
from diffinv.models import Conditioning, Segment, TextLayout
from test_methods import item


def layout(pooled: int, width: int = 4, tokens: int = 3) -> TextLayout:
    return TextLayout((Segment("clip", 0, tokens, None),), width=width, pooled=pooled)


@pytest.mark.parametrize("pooled", [0, 3, 4, 9])
def test_pack_then_unpack_gives_the_conditioning_back(pooled):
    lay = layout(pooled)
    g = torch.Generator().manual_seed(0)
    tokens, vec = torch.randn(2, 3, 4, generator=g), torch.randn(2, pooled, generator=g) if pooled else None
    packed = lay.pack(tokens, vec)
    assert packed.shape == (2, 3 + -(-pooled // 4), 4) and lay.rows == packed.shape[1]
    back = lay.unpack(packed)
    assert torch.equal(back.tokens, tokens)
    assert back.pooled is None if not pooled else torch.equal(back.pooled, vec)
    if pooled:  # the rows after the pooled embedding's last entry are zero: nothing else rides in them
        assert packed[:, 3:].flatten(1)[:, pooled:].eq(0).all()


def test_a_pooled_embedding_no_wider_than_a_row_is_the_records_last_row():
    """Records written before the layout hold the pooled embedding zero-padded in the last row: the same tensor."""
    lay = layout(3)
    tokens, vec = torch.randn(1, 3, 4), torch.randn(1, 3)
    old = torch.cat([tokens, torch.nn.functional.pad(vec, (0, 1))[:, None]], dim=1)
    assert torch.equal(lay.pack(tokens, vec), old) and torch.equal(lay.unpack(old).pooled, vec)


def test_shapes_that_do_not_fit_the_layout_are_refused():
    lay = layout(9)
    with pytest.raises(DiffinvError, match="width 9"):
        lay.pack(torch.zeros(1, 3, 4), torch.zeros(1, 8))
    with pytest.raises(DiffinvError, match="does not fit"):
        lay.unpack(torch.zeros(1, 4, 4))  # 9 pooled entries take 3 rows, not 1


def test_word_positions_count_each_segments_start_token_and_limit():
    class Chars:  # one token per letter
        def __call__(self, text, add_special_tokens=True):
            return type("T", (), {"input_ids": list(text)})()

    lay = TextLayout((Segment("clip", 0, 6, Chars()), Segment("t5", 6, 10, Chars(), start_token=False)), width=2)
    assert lay.word_positions("a cat", ["cat"]) == [2, 3, 4] + [6 + 1, 6 + 2, 6 + 3]
    # CLIP's row 5 is its end token's place when the prompt is cut: 'ox' (CLIP 5, 6) is found in T5 only
    assert lay.word_positions("a cat ox", ["OX"]) == [6 + 4, 6 + 5]
    # a trailing '.' is ignored in matching; its token is the word's (CLIP 2..5, of which 5 is cut)
    assert lay.word_positions("a cat.", ["cat"]) == [2, 3, 4] + [7, 8, 9, 10]


def test_sd3_layout_finds_a_word_in_clip_and_t5(tiny_sd3_t5, tiny_sd3):
    lay = tiny_sd3_t5.layout
    assert [(s.name, s.start, s.length) for s in lay.segments] == [("clip", 0, 8), ("t5", 8, 256)]
    assert lay.prompt_reader == (tiny_sd3_t5.tokenizer, 8)  # CLIP's limit cuts what SD 3 reads
    rows = lay.word_positions("a photo of a cat", ["cat"])
    clip_ids = tiny_sd3_t5.tokenizer("a photo of a cat").input_ids
    t5_ids = tiny_sd3_t5.tokenizer_3("a photo of a cat").input_ids
    cat_clip = tiny_sd3_t5.tokenizer("cat", add_special_tokens=False).input_ids
    cat_t5 = tiny_sd3_t5.tokenizer_3("cat", add_special_tokens=False).input_ids
    assert [clip_ids[r] for r in rows if r < 8] == cat_clip
    assert [t5_ids[r - 8] for r in rows if r >= 8] == cat_t5 and len(cat_t5) >= 1
    # without T5 its rows are zeros: the word is found in CLIP only
    assert all(r < 8 for r in tiny_sd3.layout.word_positions("a photo of a cat", ["cat"]))


def test_flux_layout_is_t5_only_and_reads_the_prompt_with_t5(tiny_flux):
    lay = tiny_flux.layout
    assert [(s.name, s.start, s.length) for s in lay.segments] == [("t5", 0, 512)]
    assert lay.prompt_reader == (tiny_flux.tokenizer_2, 512)
    ids = tiny_flux.tokenizer_2("a red car").input_ids
    assert [ids[r] for r in lay.word_positions("a red car", ["red"])] == \
        tiny_flux.tokenizer_2("red", add_special_tokens=False).input_ids


def test_each_family_encodes_into_its_layout(tiny_backbone, tiny_sdxl, tiny_sd3, tiny_sd3_wide, tiny_flux):
    for bb in (tiny_backbone, tiny_sdxl, tiny_sd3, tiny_sd3_wide, tiny_flux):
        cond = bb.encode_prompts(["a photo of a cat"])
        assert cond.shape[1:] == (bb.layout.rows, bb.layout.width), bb.family.name
        typed = bb.family.encode(bb, ["a photo of a cat"])
        assert isinstance(typed, Conditioning) and torch.equal(bb.layout.pack(*typed), cond)
    assert tiny_sd3_wide.layout.pooled == 48 and tiny_sd3_wide.layout.pooled_rows == 2


def test_an_sd3_with_a_pooled_embedding_wider_than_its_tokens_inverts_and_edits(tiny_sd3_wide_dir):
    """Refused before the typed layout ('pooled embedding (48) is wider than its token states (32)')."""
    method = NegativePromptInversion(BackboneConfig(pretrained=str(tiny_sd3_wide_dir)), 4)
    with torch.inference_mode():
        [out] = method.predict_step([item()])
    assert torch.isfinite(out.reconstruction).all() and len(out.edits) == 1 and torch.isfinite(out.edits[0]).all()


def test_null_text_inversion_learns_the_pooled_rows_and_never_their_padding(tiny_sd3_wide_dir):
    """NTI optimises the conditioning whole: both pooled rows' 48 entries move, the 16 zeros after them (never read
    by the transformer) get no gradient and stay zero."""
    m = NullTextInversion(BackboneConfig(pretrained=str(tiny_sd3_wide_dir)), 3, num_inner_steps=2)
    u = m.run_batch([item()])[0].inversion.unconditional
    assert u.shape == (3, 8 + 256 + 2, 32)
    pooled = u[:, 264:].flatten(1)
    assert pooled[:, 32:48].abs().sum() > 0 and not pooled[:, 48:].any()


def test_prompt_to_prompt_maps_a_layout_of_several_encoders_block_diagonally():
    from diffinv.editing import PromptToPrompt

    lay = TextLayout((Segment("clip", 0, 4, None), Segment("t5", 4, 4, None, start_token=False)), width=2)
    c = PromptToPrompt().controller(lay, ["a cat", "a cat"], [None, "a dog"], [0, 0], 4, (8, 8))
    assert c.mapping.shape == (2, 8, 8) and torch.equal(c.mapping[1], torch.eye(8))
