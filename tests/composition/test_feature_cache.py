"""The feature cache of frozen branches (mmbridge.composition.feature_cache; CPU, a few seconds)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

import mmbridge
from mmbridge.composition import Branch
from mmbridge.composition.feature_cache import FeatureCache, branch_cacheable
from mmbridge.train.encoders import MLPEncoder, TextEncoder
from mmbridge.train.trainer import Trainer


class Rows(Dataset):
    """text (frozen branch) + numeric (trainable branch); ids start at ``first_id``."""

    def __init__(self, n: int = 48, seed: int = 0, first_id: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.mask = torch.ones(n, 8, dtype=torch.int64)
        self.mask[:, 5:] = 0
        self.text = torch.randint(5, 40, (n, 8), generator=g) * self.mask
        self.text[:, 0] = 1 + self.labels
        self.numeric = torch.randn(n, 4, generator=g)
        self.first_id = first_id

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"id": torch.tensor(self.first_id + i), "text": self.text[i], "text_mask": self.mask[i],
                "numeric": self.numeric[i], "label": self.labels[i]}


class DropoutEncoder(nn.Module):
    out_dim = 16

    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 16), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def build(modality_dropout: float = 0.2) -> mmbridge.HybridModel:
    torch.manual_seed(0)
    return mmbridge.compose(
        {"text": Branch(TextEncoder(40, 16), input_keys=("text", "text_mask"), trainable=False),
         "numeric": MLPEncoder(4, 16)},
        fusion="gated", num_classes=3, fusion_dim=16, modality_dropout=modality_dropout)


TRAIN, VAL = Rows(48), Rows(16, seed=1, first_id=1000)
KW = dict(epochs=2, batch_size=8, lr=2e-2, progress=False, tensorboard=False, seed=3)


def _batch(ds: Dataset, idx) -> dict[str, torch.Tensor]:
    items = [ds[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_compose_is_uncached_unless_asked():
    model = build()
    assert model.feature_cache is None
    cache = model.enable_feature_cache()
    assert isinstance(cache, FeatureCache) and model.enable_feature_cache() is cache
    model.disable_feature_cache()
    assert model.feature_cache is None


def test_training_with_and_without_cache_is_bitwise_equal_and_hits_in_epoch_2(tmp_path):
    runs = {}
    for cached in (False, True):
        t = Trainer(build(), TRAIN, VAL, out_dir=tmp_path / str(cached), feature_cache=cached, **KW)
        t.fit(stop_after_epochs=1)
        after1 = dict(t.model.feature_cache.stats) if cached else None
        res = t.fit()
        model = t.model.eval()
        batch = _batch(TRAIN, range(len(TRAIN)))
        logits = model(batch)
        runs[cached] = (res["history"], model.state_dict(), logits, after1,
                        dict(model.feature_cache.stats) if cached else None)
        t.close()
    (h0, sd0, lg0, _, _), (h1, sd1, lg1, after1, after2) = runs[False], runs[True]
    assert [h["train/loss"] for h in h0] == [h["train/loss"] for h in h1]
    assert [h["val/loss"] for h in h0] == [h["val/loss"] for h in h1]
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.equal(lg0, lg1)
    # epoch 1: every train and val row computed once; the trainable branch went around the cache
    assert after1["hits"] == 0 and after1["misses"] == len(TRAIN) + len(VAL)
    assert after1["bypass"] == 6 + 2  # the numeric (trainable) branch, once per batch
    # epoch 2 (train + val) and the final full-batch forward: all hits, nothing recomputed
    assert after2["misses"] == after1["misses"]
    assert after2["hits"] == len(TRAIN) + len(VAL) + len(TRAIN)
    assert after2["invalidations"] == 0


def test_losses_equal_per_step_with_modality_dropout():
    ref, new = build(0.3), build(0.3)
    new.enable_feature_cache()
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    opt_n = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=0.1)
    for epoch in range(2):
        torch.manual_seed(epoch)
        order = torch.randperm(len(TRAIN)).tolist()
        for s in range(0, len(order), 8):
            batch = _batch(TRAIN, order[s:s + 8])
            losses = []
            for model, opt in ((ref, opt_r), (new, opt_n)):
                torch.manual_seed(100 * epoch + s)  # same modality-dropout draws
                loss = nn.functional.cross_entropy(model(batch), batch["label"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            assert torch.equal(losses[0], losses[1])
    assert new.feature_cache.stats["hits"] == len(TRAIN)  # epoch 2


def test_changed_weights_invalidate():
    model = build().eval()
    cache = model.enable_feature_cache()
    batch = _batch(TRAIN, range(8))
    model(batch)
    model(batch)
    assert cache.stats["hits"] == 8
    with torch.no_grad():
        next(model.branches["text"].encoder.parameters()).add_(0.5)
    out = model(batch)
    assert cache.stats["invalidations"] == 1 and cache.stats["hits"] == 8 and cache.stats["misses"] == 16
    ref = build().eval()
    ref.load_state_dict(model.state_dict())
    assert torch.equal(out, ref(batch))
    # load_state_dict back to the original weights: recomputed again (fingerprint changed back)
    model.load_state_dict(build().state_dict())
    assert torch.equal(model(batch), build().eval()(batch))
    assert cache.stats["invalidations"] == 2


def test_changed_input_for_an_id_is_recomputed():
    model = build().eval()
    cache = model.enable_feature_cache()
    batch = _batch(TRAIN, range(8))
    model(batch)
    changed = dict(batch, text=batch["text"].clone())
    changed["text"][3, 1] = 7 if int(changed["text"][3, 1]) != 7 else 8
    out = model(changed)
    assert cache.stats["hits"] == 0 and cache.stats["invalidations"] == 1
    assert torch.equal(out, build().eval()(changed))
    model(changed)
    assert cache.stats["hits"] == 8


def test_trainable_branch_is_never_cached():
    model = build().eval()
    cache = model.enable_feature_cache()
    batch = _batch(TRAIN, range(8))
    for _ in range(3):
        model(batch)
    assert not branch_cacheable(model.branches["numeric"])
    assert cache.cached_rows("numeric") == 0 and cache.cached_rows("text") == 8
    assert cache.stats["bypass"] == 3


def test_frozen_branch_with_active_dropout_is_never_cached():
    torch.manual_seed(0)
    model = mmbridge.compose(
        {"num": Branch(DropoutEncoder(), input_keys=("numeric",), trainable=False), "numeric": MLPEncoder(4, 16)},
        num_classes=3, fusion_dim=16)
    cache = model.enable_feature_cache()
    batch = _batch(TRAIN, range(8))
    model.branches["num"].encoder.train()  # Dropout active in a frozen encoder
    assert not branch_cacheable(model.branches["num"])
    model(batch)
    model(batch)
    assert cache.cached_rows("num") == 0 and cache.stats["bypass"] == 4
    model.train()  # Branch.train puts the frozen encoder back in eval: cacheable again
    assert branch_cacheable(model.branches["num"])


def test_batch_without_ids_and_cpu_storage():
    model = build().eval()
    cache = model.enable_feature_cache(device="cpu", max_bytes=4 * 16 * 4)  # room for 4 rows
    batch = _batch(TRAIN, range(8))
    no_id = {k: v for k, v in batch.items() if k != "id"}
    model(no_id)
    assert len(cache) == 0 and cache.stats["bypass"] == 2
    model(batch)
    assert cache.cached_rows("text") == 4 and cache.stats["full"] == 4
    assert cache.bytes <= cache.max_bytes
    assert torch.equal(model(_batch(TRAIN, range(4))), build().eval()(_batch(TRAIN, range(4))))
    assert cache.stats["hits"] == 4


def test_recipe_turns_it_on_by_default(tmp_path):
    from mmbridge.train.config import TrainConfig

    assert TrainConfig().feature_cache is True and "feature_cache" in TrainConfig().trainer_kwargs()
    t = Trainer.from_config(build(), TRAIN, None, TrainConfig(epochs=1, progress=False),
                            out_dir=tmp_path, tensorboard=False)
    assert t.model.feature_cache is not None
    t.close()
    t = Trainer(build(), TRAIN, None, out_dir=tmp_path / "off", feature_cache=False, **KW)
    assert t.model.feature_cache is None
    t.close()


def test_bench_row_cached_vs_uncached_tiny(tmp_path):
    from mmbridge.bench.harness import HarnessConfig
    from mmbridge.bench.suites import SuiteContext, _e2e_feature_cache

    ctx = SuiteContext(size="tiny", device="cpu", config=HarnessConfig(), cache_dir=tmp_path, log=lambda s: None,
                       threads=1)
    rows = {r.variant: r for r in _e2e_feature_cache(ctx, "fc")}
    assert set(rows) == {"cached", "uncached"} and all(r.status == "ok" for r in rows.values())
    assert rows["uncached"].ratio == 1.0 and rows["cached"].ratio > 0
    assert rows["cached"].extra["cache_hits"] > 0 and rows["cached"].extra["speedup"] > 0
