import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: never try the hub in tests
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from diffinv.backbone import Backbone, BackboneConfig

    return Backbone.load(BackboneConfig(pretrained=str(tiny_model_dir)))
