"""mmbridge.compose / HybridModel / fusion and task heads (CPU, no TF, a few seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmbridge
from mmbridge.composition import Branch, masked_mean
from mmbridge.errors import ConfigError, MMBridgeError, RegistryError
from mmbridge.train.encoders import ConvEncoder, MLPEncoder, TextEncoder

N, C, D = 6, 5, 32


def _batch(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, 10, dtype=torch.int64)
    mask[:, 7:] = 0
    return {
        "image": torch.randint(0, 256, (n, 16, 16, 3), generator=g, dtype=torch.uint8),
        "text": torch.randint(1, 40, (n, 10), generator=g) * mask,
        "text_mask": mask,
        "numeric": torch.randn(n, 4, generator=g),
        "label": torch.randint(0, C, (n,), generator=g),
    }


def _model(fusion: str, **kw) -> mmbridge.HybridModel:
    torch.manual_seed(0)
    return mmbridge.compose(
        {"image": ConvEncoder(8, 2), "text": Branch(TextEncoder(40, 16), input_keys=("text", "text_mask")),
         "numeric": MLPEncoder(4, 16)},
        fusion=fusion, num_classes=C, fusion_dim=D, **kw)


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_each_fusion_head_shapes_and_embeddings(fusion):
    model = _model(fusion).eval()
    out = model(_batch())
    assert out.shape == (N, C) and out.dtype == torch.float32
    res = model(_batch(), return_embeddings=True)
    assert torch.equal(res["logits"], out)
    assert list(res["embeddings"]) == ["image", "text", "numeric"]
    assert all(e.shape == (N, D) for e in res["embeddings"].values())
    assert res["present"].shape == (N, 3) and res["present"].all()
    # gradients reach every branch's encoder
    model.train()
    model(_batch()).sum().backward()
    for name, b in model.branches.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.encoder.parameters()), name


def test_registries_list_heads_and_reject_unknown_names():
    assert set(mmbridge.fusion_heads.names()) >= {"concat", "gated", "attention"}
    assert set(mmbridge.task_heads.names()) >= {"classification", "regression"}
    with pytest.raises(RegistryError, match="Did you mean 'gated'"):
        _model("gatd")


def test_regression_head_outputs_k_values():
    torch.manual_seed(0)
    m = mmbridge.compose({"numeric": MLPEncoder(4, 8)}, task="regression", num_classes=3, fusion_dim=8)
    assert m(_batch()).shape == (N, 3)


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_missing_modality_at_inference_is_masked_not_a_crash(fusion):
    model = _model(fusion).eval()
    batch = _batch()
    del batch["image"]
    res = model(batch, return_embeddings=True)
    assert res["logits"].shape == (N, C)
    assert res["present"][:, 0].eq(False).all() and res["present"][:, 1:].all()
    assert res["embeddings"]["image"].abs().sum() == 0
    # the missing branch is really ignored: its weights do not change the output
    with torch.no_grad():
        for p in model.branches["image"].parameters():
            p.add_(1.0)
    assert torch.allclose(model(batch), res["logits"])


def test_all_modalities_missing_raises_with_the_keys():
    model = _model("concat").eval()
    with pytest.raises(MMBridgeError, match=r"branches read \['image', 'numeric', 'text', 'text_mask'\]"):
        model({"label": torch.zeros(2, dtype=torch.int64)})


def test_modality_dropout_drops_whole_branches_per_sample_only_in_training():
    torch.manual_seed(1)
    model = _model("attention", modality_dropout=0.5)
    res = model(_batch(64), return_embeddings=True)
    present = res["present"]
    assert present.any(1).all(), "every sample keeps at least one modality"
    dropped = (~present).float().mean().item()
    assert 0.25 < dropped < 0.6, dropped  # p=0.5 per branch, minus the 'keep one' rescue
    for i, name in enumerate(model.names):  # dropped tokens are exactly zero, kept ones are not
        emb = res["embeddings"][name]
        assert emb[~present[:, i]].abs().sum() == 0
        assert (emb[present[:, i]].abs().sum(1) > 0).all()
    model.eval()
    assert model(_batch(64), return_embeddings=True)["present"].all()


def test_frozen_branch_is_not_updated_and_stays_in_eval_mode():
    torch.manual_seed(0)
    frozen_enc = ConvEncoder(8, 2)  # has BatchNorm: running stats must not move either
    model = mmbridge.compose({"image": Branch(frozen_enc, trainable=False), "numeric": MLPEncoder(4, 16)},
                             num_classes=C, fusion_dim=D)
    before = {k: v.clone() for k, v in frozen_enc.state_dict().items()}
    other = {k: v.clone() for k, v in model.branches["numeric"].state_dict().items()}
    model.train()
    assert not frozen_enc.training and model.branches["image"].proj.training
    assert all(not p.requires_grad for p in frozen_enc.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(_batch()), _batch()["label"]).backward()
        opt.step()
    after = frozen_enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(other[k], v) for k, v in model.branches["numeric"].state_dict().items())
    # the projection of the frozen branch trains
    assert model.branches["image"].proj.weight.requires_grad
    # DDP's module holds no frozen encoder
    stage_params = {id(p) for p in model.trainable_module().parameters()}
    assert not any(id(p) in stage_params for p in frozen_enc.parameters())
    assert id(model.branches["image"].proj.weight) in stage_params


def test_preprocess_is_frozen_and_out_dim_inferred_by_dry_run():
    class Scale(nn.Module):  # stands in for an ORT / bridged preprocessing module
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(1 / 255.0))

        def forward(self, x):
            return x.float() * self.w

    enc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16 * 3, 11), nn.ReLU())  # no out_dim attribute
    pre = Scale()
    model = mmbridge.compose({"image": Branch(enc, preprocess=pre)}, num_classes=C, fusion_dim=D,
                             example_batch=_batch(2))
    b = model.branches["image"]
    assert b.out_dim == 11 and b.proj.in_features == 11
    assert not pre.w.requires_grad and not pre.training
    model(_batch()).sum().backward()
    assert pre.w.grad is None and enc[1].weight.grad is not None
    with pytest.raises(ConfigError, match="cannot infer out_dim of branch 'image'"):
        mmbridge.compose({"image": Branch(nn.Sequential(nn.Flatten()))}, num_classes=C)


def test_hf_model_branch_mean_pools_masked_tokens():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    model = mmbridge.compose({"text": bert}, num_classes=C, fusion_dim=D).eval()
    b = model.branches["text"]
    assert b.is_hf and b.input_keys == ("text", "text_mask") and b.out_dim == 16
    batch = _batch()
    res = model(batch, return_embeddings=True)
    hidden = bert(input_ids=batch["text"], attention_mask=batch["text_mask"]).last_hidden_state
    expected = b.proj(masked_mean(hidden, batch["text_mask"]))
    assert torch.allclose(res["embeddings"]["text"], expected, atol=1e-5)
    # padding tokens do not change the pooled embedding
    batch2 = dict(batch, text=batch["text"].clone())
    batch2["text"][:, 8:] = 7
    assert torch.allclose(model(batch2), res["logits"], atol=1e-5)


def test_attention_fusion_rejects_bad_head_count():
    with pytest.raises(ConfigError, match="not divisible by num_heads=4"):
        mmbridge.compose({"numeric": MLPEncoder(4, 8)}, fusion="attention", num_classes=C, fusion_dim=30)


def test_per_sample_presence_masks_rows():
    model = _model("attention").eval()
    batch = _batch()
    full = model(batch)
    batch["numeric_present"] = torch.tensor([1, 0, 1, 0, 1, 1])
    res = model(batch, return_embeddings=True)
    assert res["present"][:, 2].tolist() == [True, False, True, False, True, True]
    assert res["embeddings"]["numeric"][1].abs().sum() == 0
    rows = [0, 2, 4, 5]
    assert torch.allclose(res["logits"][rows], full[rows], atol=1e-6)
    assert not torch.allclose(res["logits"][1], full[1])
    batch["image_present"] = batch["text_present"] = torch.tensor([1, 0, 1, 1, 1, 1])
    with pytest.raises(MMBridgeError, match=r"batch rows \[1\] have no modality present"):
        model(batch)


def test_onnxruntime_encoder_must_be_declared_frozen():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from mmbridge.runtime.module import to_ort

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    ort = to_ort(model_proto)
    with pytest.raises(ConfigError, match="onnxruntime branch has no gradients"):
        Branch(ort, input_keys=("numeric",))
    torch.manual_seed(0)
    model = mmbridge.compose({"numeric": Branch(ort, input_keys=("numeric",), trainable=False, out_dim=4),
                              "text": Branch(TextEncoder(40, 8), input_keys=("text", "text_mask"))},
                             num_classes=C, fusion_dim=8)
    batch = _batch()
    res = model(batch, return_embeddings=True)
    proj = model.branches["numeric"].proj
    assert torch.allclose(res["embeddings"]["numeric"], proj(2 * batch["numeric"]), atol=1e-6)
    res["logits"].sum().backward()
    assert proj.weight.grad is not None
    assert list(ort.parameters()) == []


def test_mask_key_is_declared_not_guessed_from_the_key_name():
    class Tokens(nn.Module):  # returns [N, T, F]: pooled with the declared mask only
        out_dim = 3

        def forward(self, ids, mask):
            return torch.ones(ids.shape[0], ids.shape[1], 3) * torch.arange(ids.shape[1]).view(1, -1, 1)

    batch = _batch()  # text_mask: 7 of 10 tokens
    torch.manual_seed(0)
    masked = mmbridge.compose({"text": Branch(Tokens(), input_keys=("text", "text_mask"), mask_key="text_mask")},
                              num_classes=C, fusion_dim=D).eval()
    state = masked.branches["text"].frozen_forward(batch)
    feat = masked.branches["text"].encode(state["args"], state["mask"])
    assert torch.allclose(feat, torch.full((N, 3), 3.0))  # mean of 0..6
    plain = Branch(Tokens(), input_keys=("text", "text_mask"))  # no mask declared: no masked pooling
    assert plain.mask_key is None and plain.frozen_forward(batch)["mask"] is None
    with pytest.raises(ConfigError, match=r"mask_key='mask'\): not one of input_keys"):
        Branch(Tokens(), input_keys=("text", "text_mask"), mask_key="mask")


def test_frozen_modules_are_recognised_by_a_declared_attribute():
    class Frozen(nn.Module):
        mmbridge_frozen = True

        def forward(self, x):
            return x

    with pytest.raises(ConfigError, match="has no gradients"):
        Branch(Frozen(), input_keys=("numeric",))
    assert not Branch(Frozen(), input_keys=("numeric",), trainable=False).trainable

    class ORTModule(nn.Module):  # the class name alone no longer decides anything
        def forward(self, x):
            return x

    assert Branch(ORTModule(), input_keys=("numeric",)).trainable


def test_compose_leaves_the_feature_cache_off_until_asked():
    model = _model("concat")
    assert model.feature_cache is None  # the training recipe turns it on (training.feature_cache)
    model.enable_feature_cache()
    assert model.feature_cache is not None and model.feature_cache.stats["hits"] == 0
