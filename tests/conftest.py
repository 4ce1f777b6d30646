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

from tiny_model import build_tiny_model, build_tiny_sd3, build_tiny_sdxl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load(folder: Path):
    from diffinv.backbone import Backbone, BackboneConfig

    return Backbone.load(BackboneConfig(pretrained=str(folder)))


# Tiny random-weight components of each family, built once per test session (tests/tiny_model.py).
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    return load(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    return load(tiny_sd3_dir)
