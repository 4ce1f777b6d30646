"""Settings that used to be accepted in silence, refused at construction through the Python API too (the CLI's
cases are in test_bad_input.py): NaN or infinity in any float setting, nested ones included, and out-of-range
counts, rates and thresholds."""

import math

import pytest

from diffinv.editing import PromptToPrompt
from diffinv.errors import DiffinvError, check_finite
from diffinv.guidance import ProximalGuidance
from diffinv.inversion import (CycleDiffusion, LatentTrajectoryOptimization, NegativePromptInversion,
                               NullTextInversion, ProximalNegativePromptInversion)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, message", [
    (lambda: NegativePromptInversion(guidance_scale=NAN), "guidance_scale must be a finite number, got nan"),
    (lambda: NullTextInversion(lr=NAN), "lr must be a finite number, got nan"),
    (lambda: NullTextInversion(early_stop_delta=INF), "early_stop_delta must be a finite number, got inf"),
    (lambda: LatentTrajectoryOptimization(text_init_std=NAN), "text_init_std must be a finite number, got nan"),
    (lambda: CycleDiffusion(source_guidance_scale=-INF), "source_guidance_scale must be a finite number, got -inf"),
    (lambda: ProximalGuidance(step_size=NAN), "proximal.step_size must be a finite number, got nan"),
    (lambda: PromptToPrompt(reweight_scale=INF), "editor.reweight_scale must be a finite number, got inf"),
])
def test_nan_and_infinity_are_refused(make, message):
    with pytest.raises(DiffinvError, match=message):
        make()


@pytest.mark.parametrize("make, message", [
    (lambda: NullTextInversion(lr=-0.01), r"lr must be > 0, got -0.01"),
    (lambda: NullTextInversion(lr_floor=1.5), r"lr_floor must be in \[0, 1\], got 1.5"),
    (lambda: NullTextInversion(schedule_steps=0), r"schedule_steps must be >= 1, got 0"),
    (lambda: LatentTrajectoryOptimization(num_starts=0), r"num_starts must be >= 1, got 0"),
    (lambda: LatentTrajectoryOptimization(noise_bias_rounds=-1), r"noise_bias_rounds must be >= 0, got -1"),
    (lambda: ProximalNegativePromptInversion(proximal=ProximalGuidance(mask_dilation=-1)),
     r"proximal.mask_dilation must be >= 0, got -1"),
    (lambda: PromptToPrompt(local_blend_words=["cat"], local_blend_threshold=1.2),
     r"editor.local_blend_threshold must be in \[0, 1\], got 1.2"),
    (lambda: PromptToPrompt(local_blend_start=-0.5), r"editor.local_blend_start must be in \[0, 1\], got -0.5"),
    (lambda: NegativePromptInversion(guidance_scale=-7.5), r"guidance_scale must be >= 0, got -7.5"),
])
def test_out_of_range_settings_are_refused(make, message):
    with pytest.raises(DiffinvError, match=message):
        make()


def test_defaults_and_edge_values_are_accepted():
    NullTextInversion(num_inner_steps=0, early_stop_epsilon=0, early_stop_delta=0, schedule_steps=None)
    LatentTrajectoryOptimization(num_starts=1, hops=0)
    NegativePromptInversion(guidance_scale=0)
    PromptToPrompt(local_blend_words=["cat"], local_blend_threshold=1.0, local_blend_start=0.0)


def test_check_finite_searches_nested_settings():
    check_finite({"a": 1.0, "b": [1, (2.0, 3)], "c": {"d": 0.5}, "self": object(), "flag": True})
    with pytest.raises(DiffinvError, match=r"^b\[1\]\[0\] must be a finite number, got nan$"):
        check_finite({"b": [1, (math.nan, 3)]})
    with pytest.raises(DiffinvError, match=r"^x\.c\.d must be a finite number, got inf$"):
        check_finite({"c": {"d": math.inf}}, prefix="x.")
