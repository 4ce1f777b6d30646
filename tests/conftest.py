import os
import sys
from pathlib import Path

# Lightning's log handler binds to the stderr current when it is imported: import it before any test captures
# stderr, or a test that happens to import it first under capsys leaves it a closed stream ("--- Logging error ---"
# in later tests' output, depending on which tests run).
import lightning.pytorch  # noqa: F401
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: never try the hub in tests
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import (  # noqa: E402
    build_tiny_flux, build_tiny_model, build_tiny_sd3, build_tiny_sd3_t5, build_tiny_sd35, build_tiny_sd3_wide_pooled,
    build_tiny_sdxl)

REPO = Path(__file__).resolve().parents[1]


def load(folder: Path):
    from diffinv.backbone import Backbone, BackboneConfig

    return Backbone.load(BackboneConfig(pretrained=str(folder)))


# Tiny random-weight components of each family, built once per test session (tests/tiny_model.py): a folder
# fixture and a loaded-backbone fixture per family. SD 3 with T5, SD 3.5 and FLUX.1 (dev: guidance embedding;
# schnell: none) are saved by their pipelines.
def _family(folder_name: str, backbone_name: str, build, **kw):
    """A session fixture ``folder_name`` building the family's folder and ``backbone_name`` loading it."""

    @pytest.fixture(scope="session", name=folder_name)
    def folder(tmp_path_factory) -> Path:
        return build(tmp_path_factory.mktemp(folder_name.removesuffix("_dir")), **kw)

    @pytest.fixture(scope="session", name=backbone_name)
    def backbone(request):
        return load(request.getfixturevalue(folder_name))

    return folder, backbone


FAMILIES = [("tiny_model_dir", "tiny_backbone", build_tiny_model, {}),
            ("tiny_sdxl_dir", "tiny_sdxl", build_tiny_sdxl, {}),
            ("tiny_sd3_dir", "tiny_sd3", build_tiny_sd3, {}),
            ("tiny_sd3_t5_dir", "tiny_sd3_t5", build_tiny_sd3_t5, {}),
            ("tiny_sd35_dir", "tiny_sd35", build_tiny_sd35, {}),
            ("tiny_sd3_wide_dir", "tiny_sd3_wide", build_tiny_sd3_wide_pooled, {}),
            ("tiny_flux_dir", "tiny_flux", build_tiny_flux, {}),
            ("tiny_flux_schnell_dir", "tiny_flux_schnell", build_tiny_flux, {"guidance_embeds": False})]
for _folder, _backbone, _build, _kw in FAMILIES:  # pytest collects fixtures from the module's attributes
    globals()[f"_{_folder}"], globals()[f"_{_backbone}"] = _family(_folder, _backbone, _build, **_kw)


@pytest.fixture(scope="session")
def bb64(tiny_model_dir):
    """The tiny SD in float64: exactness checked where float32 round-off cannot hide a mistake."""
    return load(tiny_model_dir).to(torch.float64)
