"""YAML config validation (every problem at once), overrides, examples, and the train/evaluate CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mmbridge.errors import ConfigError
from mmbridge.train.config import DEFAULTS, load_config
from mmbridge.train.distributed import read_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "pokedex").glob("*.yaml"))

BAD = textwrap.dedent("""
    data:
      root: /no/such/dir
      modalities: [image, audio]
      image_size: 4
    model:
      branches:
        image:
          encoder: {type: convv}
          trainable: maybe
        text:
          encoder: {type: artifact, path: /no/artifact, backend: ort}
        numeric:
          encoder: {type: mlp, hiden: 3}
          input_keys: [tabular]
      fusion: attentoin
      fusion_dim: 30
      modality_dropout: 1.5
    training:
      epochs: 0
      precision: fp8
      lr: -1
      learning_rate: 0.1
    outptu: {}
""")


def test_every_problem_is_listed_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.batch_size=0", "oops"])
    msg = str(err.value)
    expected = [
        "outptu: unknown key; did you mean 'output'?",
        "data.root: '/no/such/dir' is not a directory",
        "data.modalities: must be a non-empty list of ['image', 'text', 'numeric'], got ['image', 'audio']",
        "data.image_size: must be an int >= 8",
        "model.fusion: unknown fusion head 'attentoin'; did you mean 'attention'?",
        "model.modality_dropout: must be a number in [0, 1), got 1.5",
        "model.branches.image.encoder.type: unknown 'convv'; did you mean 'conv'?",
        "model.branches.image.trainable: must be true or false, got 'maybe'",
        "model.branches.text.encoder.path: '/no/artifact' is not an artifact directory",
        "model.branches.text: an onnxruntime (backend: ort) encoder cannot train",
        "model.branches.numeric.encoder.hiden: unknown key; did you mean 'hidden'?",
        "model.branches.numeric.input_keys: ['tabular'] not provided by data.modalities",
        "training.epochs: must be an int >= 1, got 0",
        "training.precision: must be fp32, bf16 or fp16, got 'fp8'",
        "training.lr: must be a finite number in (0, 10], got -1",
        "training.learning_rate: unknown key",
        "training.batch_size: must be an int >= 1, got 0",
        "override 'oops': expected dotted.key=value",
    ]
    missing = [e for e in expected if e not in msg]
    assert not missing, f"not reported: {missing}\n--- message:\n{msg}"
    n = int(msg.split(": ", 1)[1].split(" problems")[0])
    assert n == msg.count("\n  - ") and n >= len(expected)


def test_attention_heads_and_head_kwargs_are_checked():
    base = {"model": {"branches": {"numeric": {"encoder": {"type": "mlp"}}}}, "data": {"modalities": ["numeric"]}}
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.fusion=attention", "model.fusion_dim=30", "model.fusion_kwargs.num_layer=1"],
                    data=base)
    msg = str(err.value)
    assert "model.fusion_dim: 30 is not divisible by fusion_kwargs.num_heads=4" in msg
    assert "model.fusion_kwargs.num_layer: not an argument of the 'attention' head" in msg


def test_defaults_and_overrides_are_typed_yaml():
    base = {"model": {"branches": {"text": {"encoder": {"type": "text"}}}}, "data": {"modalities": ["text"]}}
    cfg = load_config(None, ["training.epochs=3", "training.lr=3e-4", "model.fusion=gated", "training.patience=null",
                             "model.fusion_kwargs={dropout: 0.2}"], data=base)
    assert cfg["training"]["epochs"] == 3 and cfg["training"]["lr"] == pytest.approx(3e-4)
    assert cfg["model"]["fusion"] == "gated" and cfg["model"]["fusion_kwargs"] == {"dropout": 0.2}
    assert cfg["training"]["batch_size"] == DEFAULTS["training"]["batch_size"]
    br = cfg["model"]["branches"]["text"]
    assert br["input_keys"] == ["text", "text_mask"] and br["encoder"] == {"type": "text", "dim": 64, "kind": "bag"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_validate(path, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    overrides = [] if (REPO.parent / "shared" / "data" / "pokedex").is_dir() else ["data.root=null"]
    # .keras files another run writes (hybrid.yaml reads tf-only.yaml's): refused with the fix while
    # missing, then validated against stand-in files
    missing = [(f"model.branches.{name}.{part}.ref", b[part]["ref"])
               for name, b in yaml.safe_load(path.read_text())["model"]["branches"].items()
               for part in ("preprocess", "encoder") if isinstance(b.get(part), dict)
               and str(b[part].get("ref", "")).endswith(".keras") and not (REPO / b[part]["ref"]).is_file()]
    if missing:
        with pytest.raises(ConfigError, match="run examples/pokedex/tf-only.yaml first"):
            load_config(path, overrides)
        for key, ref in missing:
            (tmp_path / Path(ref).name).touch()
            overrides.append(f"{key}={tmp_path / Path(ref).name}")
    cfg = load_config(path, overrides)
    assert cfg["model"]["branches"] and cfg["output"]["dir"].startswith("runs/pokedex/")


def test_validation_runs_before_tf_or_onnxruntime_is_imported(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD)
    code = textwrap.dedent(f"""
        import sys
        from mmbridge.cli.train import main
        rc = main(["train", {str(tmp_path / "bad.yaml")!r}])
        print("RC", rc, "tensorflow" in sys.modules, "onnxruntime" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 2 False False" in proc.stdout, proc.stdout + proc.stderr
    assert "problems:" in proc.stderr and "training.precision" in proc.stderr


def test_kubeflow_and_torchrun_environments():
    assert read_env({}) == {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}
    kubeflow = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    assert read_env(kubeflow) == {"rank": 3, "world_size": 4, "local_rank": 0, "local_world_size": 1}
    torchrun = dict(kubeflow, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert read_env(torchrun)["local_rank"] == 1 and read_env(torchrun)["local_world_size"] == 2
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set") as err:
        read_env({"RANK": "5", "WORLD_SIZE": "2"})
    assert "RANK=5 is not in [0, WORLD_SIZE=2)" in str(err.value)


def test_train_then_evaluate_cli_on_builtin_sample(tmp_path, capsys):
    from mmbridge.cli.train import main

    cfg = {
        "data": {"root": None, "image_size": 16, "max_length": 16, "modalities": ["text", "numeric"]},
        "model": {"branches": {"text": {"encoder": {"type": "text", "dim": 32}},
                               "numeric": {"encoder": {"type": "mlp", "hidden": 16}}},
                  "fusion": "gated", "fusion_dim": 32},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.01, "precision": "fp32", "progress": False},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "data: the built-in sample" in out
    train_report = json.loads((tmp_path / "run" / "report.json").read_text())
    row = next(iter(train_report["results"].values()))
    assert main(["evaluate", str(tmp_path / "c.yaml"), "--checkpoint", str(tmp_path / "run" / "best.pt"),
                 "--out", str(tmp_path / "eval")]) == 0
    ev = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    erow = next(iter(ev["results"].values()))
    # restore_best=True: the train report's test metrics come from best.pt, as does evaluate's
    assert erow["test/top1"] == pytest.approx(row["test/top1"]) and erow["val/loss"] == pytest.approx(row["val/loss"])
    assert (tmp_path / "eval" / "eval_report.md").read_text().count("| run |") == 1
    # a config that does not match the checkpoint is refused with the keys
    assert main(["evaluate", str(tmp_path / "c.yaml"), "model.fusion_dim=16", "--checkpoint",
                 str(tmp_path / "run" / "best.pt")]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_launcher_examples_reference_real_configs():
    """The cluster examples export once (TF), then train from the prepared config (no TF), resumably."""
    prep, job = yaml.safe_load_all((REPO / "examples" / "kubeflow" / "pytorchjob.yaml").read_text())
    assert prep["kind"] == "Job" and job["kind"] == "PyTorchJob"
    (pc,) = prep["spec"]["template"]["spec"]["containers"]
    script = pc["command"][-1]
    out = script.split("--out ")[1].split()[0]
    for name in ("tf-only.yaml", "hybrid.yaml"):
        assert f"/config/{name}" in script and (REPO / "examples" / "pokedex" / name).is_file()
    assert "mmbridge.cli prepare /config/hybrid.yaml" in script and out.startswith("/runs/")
    specs = job["spec"]["pytorchReplicaSpecs"]
    for role in ("Master", "Worker"):
        spec = specs[role]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["name"] == "pytorch"  # the training operator requires it
        cmd = container["command"]
        assert cmd[:5] == ["python", "-m", "mmbridge.cli", "train", f"{out}/train.yaml"]
        assert "output.dir=/runs/" in cmd[5] and container["image"] != pc["image"]  # the image without TF
        (wait,) = spec["initContainers"]
        assert f"{out}/train.yaml" in wait["command"][-1]
    sbatch = (REPO / "examples" / "slurm" / "train.sbatch").read_text()
    assert "torch.distributed.run" in sbatch and '-m mmbridge.cli train "$ART/train.yaml"' in sbatch
    assert sbatch.index("mmbridge.cli prepare") < sbatch.index("torch.distributed.run")
    assert "SLURM_JOB_ID-" not in sbatch and "--requeue" in sbatch  # the same output.dir on resubmission
    assert subprocess.run(["bash", "-n", str(REPO / "examples" / "slurm" / "train.sbatch")]).returncode == 0


@pytest.mark.tf
@pytest.mark.slow
def test_demo_runs_end_to_end_without_tf_in_the_training_process(tmp_path):
    """export (child) -> ORT preprocessing + converted Keras encoder -> compose -> bf16 -> report."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
        pytest.skip("TensorFlow / tf2onnx are not installed (install mmbridge[tf])")
    code = textwrap.dedent(f"""
        import sys
        from mmbridge.cli import main
        rc = main(["demo", "--out", {str(tmp_path / "demo")!r}, "--epochs", "2"])
        print("RC", rc, "TF", "tensorflow" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert "RC 0 TF False" in proc.stdout, out[-4000:]
    assert "using the small synthetic sample built into the package" in out
    assert "<- ORTModule -> GraphModule" in out  # bridged TF preprocessing on ORT, Keras encoder in torch
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    row = next(iter(report["results"].values()))
    assert row["precision"] == "bf16" and row["epochs"] == 2
    assert 0.0 <= row["test/top1"] <= 1.0 and row["test/loss"] > 0
    assert (tmp_path / "demo" / "best.pt").is_file() and (tmp_path / "demo" / "report.md").is_file()
    import torch

    losses = [h["train/loss"] for h in torch.load(tmp_path / "demo" / "last.pt", weights_only=True)["history"]]
    assert losses[1] < losses[0], losses
    # the pictures of the run (PNG files) and the test metrics + hparams in TensorBoard
    for png in ("learning_curve.png", "confusion_matrix.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "plots: " in out and (tmp_path / "demo" / "tensorboard" / "hparams").is_dir()


# -- the config dataclasses: one source of defaults --------------------------------------------
def test_defaults_agree_between_yaml_trainer_and_compose():
    import inspect

    import mmbridge
    from mmbridge.composition import Branch, BranchConfig, ModelConfig
    from mmbridge.train.config import OutputConfig, TrainConfig
    from mmbridge.train.trainer import Trainer

    trainer = inspect.signature(Trainer).parameters
    for key in TrainConfig.TRAINER_KEYS:
        assert trainer[key].default == getattr(TrainConfig, key), key
    assert trainer["out_dir"].default == OutputConfig.dir and trainer["tensorboard"].default == OutputConfig.tensorboard
    assert trainer["precision"].default == DEFAULTS["training"]["precision"] == "fp32"
    compose = inspect.signature(mmbridge.compose).parameters
    for key in ("fusion", "task", "fusion_dim", "modality_dropout"):
        assert compose[key].default == getattr(ModelConfig, key) == DEFAULTS["model"][key], key
    assert compose["fusion_dim"].default == 128
    branch = inspect.signature(Branch).parameters
    for key in ("input_keys", "mask_key", "out_dim", "trainable", "projection"):
        assert branch[key].default == getattr(BranchConfig, key), key


def test_run_config_round_trips_and_reads_by_attribute(tmp_path):
    from mmbridge.train.components import MLPConfig, TextConfig
    from mmbridge.train.config import RunConfig, dump

    base = {"model": {"branches": {"text": {"encoder": {"type": "text", "kind": "gru"}},
                                   "numeric": {"encoder": {"type": "mlp"}, "trainable": False}},
                      "fusion": "gated"},
            "data": {"modalities": ["text", "numeric"]}, "training": {"epochs": 2, "precision": "bf16"}}
    cfg = load_config(None, ["training.lr=3e-4"], data=base)
    assert isinstance(cfg, RunConfig) and cfg.training.epochs == 2 and cfg.training.lr == pytest.approx(3e-4)
    text = cfg.model.branches["text"]
    assert text.encoder == TextConfig(dim=64, kind="gru") and text.input_keys == ("text", "text_mask")
    assert text.mask_key == "text_mask" and cfg.model.branches["numeric"].mask_key is None
    assert cfg.model.branches["numeric"].encoder == MLPConfig() and cfg.model.branches["numeric"].trainable is False
    # to_dict -> from_dict is the identity; the saved config.yaml loads back to the same config
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "config.yaml").write_text(dump(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg
    # a config.yaml saved before mask_key existed still loads (the key is filled in from the data)
    old = cfg.to_dict()
    for b in old["model"]["branches"].values():
        del b["mask_key"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert load_config(tmp_path / "old.yaml") == cfg
    # the mapping view keeps dict-style callers working
    assert cfg["training"]["epochs"] == 2 and cfg.get("framework") == "torch" and dict(cfg)["model"]["fusion"] == "gated"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.epochs = 3  # type: ignore[misc]


def test_mask_key_must_be_one_of_the_input_keys():
    base = {"model": {"branches": {"text": {"encoder": {"type": "text"}, "mask_key": "mask"}}},
            "data": {"modalities": ["text"]}}
    with pytest.raises(ConfigError, match=r"model.branches.text.mask_key: must be one of input_keys \['text', 'text_mask'\]"):
        load_config(None, data=base)
    cfg = load_config(None, ["model.branches.text.mask_key=null"], data={**base, "model": {"branches": {
        "text": {"encoder": {"type": "text"}}}}})
    assert cfg.model.branches["text"].mask_key is None


def test_a_new_encoder_type_is_one_registered_entry(tmp_path):
    """A config dataclass + a builder, registered once: validated, defaulted and built from YAML."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from mmbridge.composition import ComponentConfig, components, register_component
    from mmbridge.train.build import build_component

    @dataclass(frozen=True)
    class PixelMeanConfig(ComponentConfig):
        type: ClassVar[str] = "pixel_mean_test"
        width: int = 4

        def validate(self, where, problems):
            if not (isinstance(self.width, int) and self.width > 0):
                problems.append(f"{where}.width: must be a positive int, got {self.width!r}")

    @register_component(PixelMeanConfig)
    def build(cfg, ctx):
        return torch.nn.Linear(3, cfg.width)

    try:
        base = {"model": {"branches": {"image": {"encoder": {"type": "pixel_mean_test"}}}},
                "data": {"modalities": ["image"]}}
        cfg = load_config(None, data=base)
        enc = cfg.model.branches["image"].encoder
        assert enc == PixelMeanConfig(width=4) and enc.to_dict() == {"type": "pixel_mean_test", "width": 4}
        assert build_component(enc, "x").out_features == 4
        with pytest.raises(ConfigError) as err:
            load_config(None, ["model.branches.image.encoder.width=0", "model.branches.image.encoder.widht=2"], data=base)
        assert "model.branches.image.encoder.width: must be a positive int, got 0" in str(err.value)
        assert "model.branches.image.encoder.widht: unknown key; did you mean 'width'?" in str(err.value)
        with pytest.raises(ConfigError, match="unknown 'pixel_mean_tset'; did you mean 'pixel_mean_test'"):
            load_config(None, ["model.branches.image.encoder.type=pixel_mean_tset"], data=base)
    finally:
        components.unregister("pixel_mean_test")


def test_component_types_and_tokenizers_are_registries():
    from mmbridge.composition import components
    from mmbridge.composition.config import component_types
    from mmbridge.data.tokenizers import TOKENIZER_NAMES
    from mmbridge.train.components import tokenizers

    assert components.names() == ["artifact", "conv", "export", "hf", "import", "mlp", "text"]
    assert component_types("preprocess") == ["artifact", "export", "import"]
    assert [n for n in components.names() if components.get(n).keras] == ["conv", "mlp", "text"]
    assert sorted(tokenizers.names()) == sorted(TOKENIZER_NAMES)
    with pytest.raises(ConfigError, match=r"data.tokenizer: must be one of \['minilm', 'word'\], a local transformers model directory or a cached Hugging Face model name, got 'wrod'; did you mean 'word'"):
        load_config(None, ["data.tokenizer=wrod"], data={"model": {"branches": {"numeric": {"encoder": {"type": "mlp"}}}}})


# -- YAML strictness (issue 15 item 4) and imports: (issue 14 item 5) ---------------------------
def test_duplicate_yaml_key_is_an_error_naming_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  epochs: 2\n  lr: 0.01\n  epochs: 3\noutput: {dir: x}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "duplicate key 'epochs' on line 4 (first given on line 2)" in msg, msg
    # the same key in different mappings is fine; a duplicate section is refused too
    path.write_text("data: {image_size: 16}\ntraining: {epochs: 1}\ndata: {image_size: 32}\n")
    with pytest.raises(ConfigError, match="duplicate key 'data' on line 3"):
        load_config(path)
    from mmbridge.train.config import _load_yaml

    assert _load_yaml("a: {epochs: 1}\nb: {epochs: 2}\nc: [{x: 1}, {x: 2}]\n")["b"]["epochs"] == 2


def test_numbers_must_be_finite_and_in_range_all_listed(tmp_path):
    path = tmp_path / "nums.yaml"
    path.write_text("training:\n  lr: .inf\n  weight_decay: .nan\n  grad_clip: -.inf\n  batch_size: -4\n"
                    "  epochs: 1.5\nmodel:\n  modality_dropout: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["training.seed=-1"])
    msg = str(err.value)
    for e in ("training.lr: must be a finite number in (0, 10], got inf",
              "training.weight_decay: must be a finite number in [0, 1], got nan",
              "training.grad_clip: must be a finite positive number or null, got -inf",
              "training.batch_size: must be an int >= 1, got -4",
              "training.epochs: must be an int >= 1, got 1.5",
              "model.modality_dropout: must be a number in [0, 1), got nan",
              "training.seed: must be an int >= 0, got -1"):
        assert e in msg, f"{e!r} not in\n{msg}"
    assert "8 problems" in msg  # the 7 above + model.branches (none given)
    with pytest.raises(ConfigError, match=r"training.lr: must be a finite number in \(0, 10\], got 100"):
        load_config(None, ["training.lr=100"])


def _authoring_guide_mean_fusion() -> str:
    """The `fusion: mean` example module of docs/authoring-guide.md, as written (minus its compose call and
    what follows it, which use the model)."""
    text = (REPO / "docs" / "authoring-guide.md").read_text()
    start = text.index('@mmbridge.fusion_heads.register("mean")')
    block_start = text.rindex("```python", 0, start) + len("```python")
    block = text[block_start:text.index("```", start)]
    assert "class MeanFusion" in block
    return block.split("\nmodel = mmbridge.compose(")[0] + "\n"


def test_imports_register_a_fusion_head_for_yaml_and_cli(tmp_path, monkeypatch, capsys):
    from mmbridge.cli.train import main
    from mmbridge.composition.heads import fusion_heads

    mod = "mmb_user_heads_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{mod}.py").write_text(_authoring_guide_mean_fusion())
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {
        "imports": [mod],
        "data": {"root": None, "image_size": 16, "max_length": 16, "modalities": ["text", "numeric"]},
        "model": {"branches": {"text": {"encoder": {"type": "text", "dim": 16}},
                               "numeric": {"encoder": {"type": "mlp", "hidden": 16}}},
                  "fusion": "mean", "fusion_dim": 16},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.01, "precision": "fp32", "progress": False},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
    }
    try:
        # without the import the head is unknown (reported as a config problem)
        no_imports = {k: v for k, v in cfg.items() if k != "imports"}
        if "mean" not in fusion_heads:
            with pytest.raises(ConfigError, match="unknown fusion head 'mean'"):
                load_config(None, data=no_imports)
        loaded = load_config(None, data=cfg)
        assert loaded.imports == (mod,) and loaded.model.fusion == "mean"
        assert load_config(None, data=loaded.to_dict()) == loaded  # the saved config.yaml form reloads
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "c.yaml")]) == 0
        assert (tmp_path / "run" / "report.json").is_file()
        # a module that does not import is one listed problem among the others
        with pytest.raises(ConfigError) as err:
            load_config(None, data={**cfg, "imports": ["no_such_module_xyz"], "training": {"epochs": 0}})
        assert "imports: cannot import 'no_such_module_xyz'" in str(err.value)
        assert "training.epochs: must be an int >= 1" in str(err.value)
        with pytest.raises(ConfigError, match="imports: must be a list of module names"):
            load_config(None, data={"imports": "x"})
    finally:
        if "mean" in fusion_heads:
            fusion_heads.unregister("mean")
        sys.modules.pop(mod, None)


# -- any Hugging Face text encoder, offline, with its own tokenizer (issue 14 item 4) -------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
    set("the a of and shape red blue green circle square triangle star small big colour is with".split())
    | set("abcdefghijklmnopqrstuvwxyz0123456789") | {f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"})


def _tiny_hf(path, kind="bert", vocab=VOCAB, vocab_rows=None):
    """A random tiny BERT / DistilBERT and its WordPiece tokenizer saved to ``path`` (no download)."""
    transformers = pytest.importorskip("transformers")
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok_cls = transformers.BertTokenizerFast if kind == "bert" else transformers.DistilBertTokenizerFast
    try:  # transformers >= 5 takes the vocabulary itself; older versions a vocab file
        tok = tok_cls(vocab={w: i for i, w in enumerate(vocab)})
    except TypeError:
        tok = tok_cls(vocab_file=str(path / "vocab.txt"))
    assert len(tok) == len(vocab)
    tok.save_pretrained(path)
    rows = vocab_rows or len(vocab)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=rows, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.DistilBertConfig(vocab_size=rows, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                            max_position_embeddings=64)
        model = transformers.DistilBertModel(cfg)
    model.save_pretrained(path)
    return str(path)


def _hf_cfg(tokenizer, encoder, out):
    return {
        "data": {"root": None, "image_size": 16, "max_length": 16, "modalities": ["text"], "tokenizer": tokenizer},
        "model": {"branches": {"text": {"encoder": {"type": "hf", "path": encoder}}}, "fusion_dim": 16},
        "training": {"epochs": 1, "batch_size": 32, "lr": 0.01, "precision": "fp32", "progress": False},
        "output": {"dir": str(out), "tensorboard": False},
    }


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_any_offline_hf_encoder_trains_with_its_own_tokenizer(tmp_path, kind):
    from mmbridge.cli.train import main

    model_dir = _tiny_hf(tmp_path / kind, kind)
    cfg = load_config(None, data=_hf_cfg(model_dir, model_dir, tmp_path / "run"))
    assert cfg.data.tokenizer == model_dir
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_hf_cfg(model_dir, model_dir, tmp_path / "run")))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["results"]


def test_tokenizer_encoder_mismatch_is_a_config_error_before_training(tmp_path):
    big_vocab = _tiny_hf(tmp_path / "small_embedding", "bert", vocab_rows=20)   # tokenizer ids > 20 rows
    a = _tiny_hf(tmp_path / "a", "bert")
    b = _tiny_hf(tmp_path / "b", "distilbert")
    with pytest.raises(ConfigError) as err:
        load_config(None, data=_hf_cfg(big_vocab, big_vocab, tmp_path / "r"))
    assert f"has {len(VOCAB)} ids but the encoder's embedding has 20 rows" in str(err.value)
    with pytest.raises(ConfigError, match="name two different models"):
        load_config(None, data=_hf_cfg(a, b, tmp_path / "r"))
    with pytest.raises(ConfigError, match="data.tokenizer is 'word'"):
        load_config(None, data=_hf_cfg("word", a, tmp_path / "r"))
    with pytest.raises(ConfigError, match="data.tokenizer: tokenizer '/no/such/model' cannot be loaded offline"):
        load_config(None, data=_hf_cfg("/no/such/model", a, tmp_path / "r"))
    with pytest.raises(ConfigError, match="did you mean 'word'"):
        load_config(None, data=_hf_cfg("wrod", a, tmp_path / "r"))


def test_a_model_directory_named_like_a_builtin_tokenizer_is_a_directory(tmp_path, monkeypatch):
    d = _tiny_hf(tmp_path / "words", "bert")          # "words" is close to "word": a path still wins
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, data=_hf_cfg("words", "words", tmp_path / "r"))
    assert cfg.data.tokenizer == "words" and Path(d).name == "words"


def test_export_component_probes_switch_reaches_export():
    """``probes: false`` on an ``export`` component (the config form of ``export(probes=False)`` /
    ``mmbridge export --no-probes``) is validated and passed to the export."""
    from mmbridge.train.components import ExportConfig, export_kwargs

    assert export_kwargs(ExportConfig(ref="m:f"), trainable=False, role="preprocess")["probes"] is True
    assert export_kwargs(ExportConfig(ref="m:f", probes=False), trainable=False, role="preprocess")["probes"] is False
    problems: list[str] = []
    ExportConfig(ref="m:f", probes="no").validate("model.branches.image.preprocess", problems)
    assert any("model.branches.image.preprocess.probes: must be true or false" in p for p in problems), problems
