"""``framework: keras``: build and train a config's multimodal model in TF/Keras (the TF-only baseline).

:func:`run_keras` is what ``mmbridge train CONFIG.yaml`` runs when the config says
``framework: keras`` (:func:`mmbridge.cli.train.run_train` hands it over). It reads the data with
mmbridge's own data layer (:func:`mmbridge.train.build.build_data`: the same ids, split, label map,
tokenizer and numeric imputation as a torch run of the same ``data`` section), builds a Keras
functional model from ``model.branches``, trains it with ``model.fit`` and scores it with the
same metric code as the torch runs (:func:`mmbridge.train.metrics.make_metrics`), so its
``report.json`` sits in the same comparison table (``python -m mmbridge.train.metrics``).

Branch ``encoder`` types and the Keras layers they become (nothing else is accepted; the config
validation names the branch):

* ``conv`` (``width``, ``depth``), input ``image`` uint8 ``[N, S, S, 3]`` (NHWC, 0..255):
  ``Rescaling(1/127.5, offset=-1)`` (float32 in [-1, 1], the same as
  :func:`mmbridge.baselines.tf_models.image_preprocess`), then a separate ``keras.Model`` named
  ``<branch>_encoder`` taking float32 ``[N, S, S, 3]`` in [-1, 1]: ``depth`` times
  ``Conv2D(width * 2**i, 3, strides=2, padding="same", use_bias=False)`` ->
  ``BatchNormalization(momentum=0.9)`` -> ``ReLU``, then ``GlobalAveragePooling2D`` ->
  ``[N, width * 2**(depth-1)]`` (the layout of :class:`~mmbridge.train.encoders.ConvEncoder`).
  Saved as ``<branch>_encoder.keras`` (e.g. ``image_encoder.keras``) for a hybrid to bridge,
  always with ``trainable=True`` (even for a frozen branch) so that a trainable export keeps
  its weights as parameters.
* ``text`` (``dim``, ``kind``), inputs ``text`` int32 ``[N, T]`` token ids and ``text_mask``
  int32 ``[N, T]`` (1 = token; without it, id 0 is padding): ``Embedding(vocab, dim)``, then
  for ``kind: gru`` a ``Bidirectional(GRU(dim // 2, return_sequences=True))`` run under the mask,
  then a masked mean over T (``GlobalAveragePooling1D`` with the mask) -> ``[N, dim]``.
* ``mlp`` (``hidden``, ``standardize``), input ``numeric`` float32 ``[N, F]`` (missing values
  already filled with the train median, plus 0/1 indicator columns): a separate ``keras.Model``
  named ``<branch>_preprocess`` holding a ``keras.layers.Normalization`` adapted on the train
  split (``standardize: false``: mean 0, variance 1, i.e. the identity; a column with zero
  train variance is divided by 1), saved as ``<branch>_preprocess.keras`` (e.g.
  ``numeric_preprocess.keras``); then ``Dense(hidden, relu)`` twice -> ``[N, hidden]``.

Each branch then gets ``Dense(fusion_dim)`` (``projection: true``; with ``projection: false``
its width must equal ``fusion_dim``). Fusion is ``concat`` only, mirroring
:class:`mmbridge.composition.heads.ConcatFusion` without its presence flags (every modality is always
present here): the M tokens ``[N, M, D]`` share one ``LayerNormalization``;
``model.modality_dropout > 0`` drops whole tokens (``Dropout`` with ``noise_shape [N, M, 1]``;
unlike the torch model, kept tokens are scaled by ``1 / (1 - p)`` and a sample may lose every
token); then flatten -> ``Dense(D, gelu)`` -> ``Dropout(fusion_kwargs.dropout, default 0.1)``
-> ``Dense(D)`` -> ``Dropout(task_kwargs.dropout, default 0)`` -> ``Dense(C)`` logits (the
softmax is in the cross-entropy loss). ``trainable: false`` freezes a branch's encoder (its
BatchNormalization then runs in inference mode). ``out_dim`` is ignored (widths are known).

Training (``training`` section): ``keras.optimizers.AdamW(lr, weight_decay,
global_clipnorm=grad_clip)`` with ``CosineDecay`` over every step (``scheduler: cosine``),
``batch_size``, ``epochs``, shuffled each epoch, seeded with ``keras.utils.set_random_seed(seed)``
(``deterministic: true`` also enables TF op determinism). After every epoch the validation
split is scored with the torch runs' metric code; ``patience`` stops early on ``monitor``
(default ``val/top1``) and ``restore_best`` restores the best epoch's weights (moving statistics
included) before the final val / test evaluation. fp32 only, one process, CPU (mmbridge hides
GPUs from TensorFlow). Ignored: ``resume`` (a Keras run always starts from scratch and writes
no checkpoint), ``num_workers``, ``checkpoint_every_steps``, ``keep_checkpoints``,
``max_steps_per_epoch``, ``stop_after_epochs``, ``log_every``.

Written into ``output.dir``: ``config.yaml``, ``report.json`` / ``report.md`` (the same row
keys as a torch run: ``test/*``, ``val/*``, ``epochs``, ``best_epoch``, ``train_time_s``,
``world_size``, ``precision``), ``data.json`` (label map, tokenizer, numeric statistics),
``tensorboard/`` (``output.tensorboard``), and the ``.keras`` files above, each written to a
temporary name in the same folder and then renamed (:func:`os.replace`), so a reader never sees
a half-written file.

TensorFlow is imported inside :func:`run_keras` only, through
:func:`mmbridge.export._tf.import_tensorflow` (after torch's compiler stack; the CLI has loaded it).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmbridge.composition.heads import ClassificationHead, ConcatFusion
from mmbridge.errors import ConfigError
from mmbridge.train.config import RunConfig, as_run_config

#: Batch keys -> numpy dtype of the arrays :func:`to_numpy` returns (and the Keras ``Input`` dtypes).
ARRAY_DTYPES = {"image": np.uint8, "text": np.int32, "text_mask": np.int32, "numeric": np.float32}


def to_numpy(ds: Any) -> dict[str, np.ndarray]:
    """Every item of a :class:`~mmbridge.data.MultimodalDataset` stacked into numpy arrays.

    Args:
        ds: a dataset whose items are dicts of tensors (``ds[i]``), as from
            :func:`mmbridge.data.load_splits`.

    Returns:
        ``{"id": int64 [N], "label": int64 [N]}`` plus, for the modalities present,
        ``"image"`` uint8 ``[N, S, S, 3]`` (NHWC, RGB, 0..255), ``"text"`` int32 ``[N, T]``
        token ids, ``"text_mask"`` int32 ``[N, T]`` (1 = token) and ``"numeric"`` float32
        ``[N, F]`` (train-median filled, indicator columns last).

    Raises:
        DataError: an image cannot be decoded (from the dataset).
        ValueError: the dataset is empty.
    """
    if len(ds) == 0:
        raise ValueError("to_numpy: the dataset is empty")
    items = [ds[i] for i in range(len(ds))]
    out: dict[str, np.ndarray] = {}
    for key in items[0]:
        arr = np.stack([np.asarray(it[key]) for it in items])
        out[key] = arr.astype(ARRAY_DTYPES.get(key, arr.dtype), copy=False)
    return out


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str) -> dict[str, float]:
    """Loss and metrics of classification logits, computed exactly as the torch trainer does.

    Args:
        logits: float ``[N, C]`` (unnormalised scores).
        labels: int ``[N]`` class indices in ``[0, C)``.
        num_classes: C.
        prefix: key prefix (``"val"`` -> ``"val/top1"``).

    Returns:
        ``{prefix}/loss`` (mean cross-entropy, nats), ``{prefix}/top1``, ``{prefix}/macro_f1`` and
        ``{prefix}/top5`` (C >= 5), as floats; the metrics are fractions in [0, 1]
        (:func:`mmbridge.train.metrics.make_metrics`).
    """
    import torch

    out = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    target = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    metrics = ClassificationHead.make_metrics(num_classes)
    metrics.update(out, target)
    result = {f"{prefix}/loss": float(torch.nn.functional.cross_entropy(out, target))}
    result.update({f"{prefix}/{k}": float(v) for k, v in metrics.compute().items()})
    return result


def save_keras_atomic(model: Any, path: str | os.PathLike) -> Path:
    """``model.save(path)`` through a temporary ``.keras`` file in the same folder and :func:`os.replace`.

    Args:
        model: a ``keras.Model``.
        path: destination ending in ``.keras``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``path`` does not end in ``.keras``.
        OSError: the folder is not writable (the temporary file is removed).
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"save_keras_atomic: {path} must end in .keras")
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    try:
        model.save(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the rename makes them visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def build_keras_model(cfg: RunConfig | Mapping[str, Any], train: Mapping[str, np.ndarray], *,
                      vocab_size: int | None, num_classes: int) -> tuple[Any, dict[str, Any], list[str]]:
    """The Keras functional model of ``cfg.model`` (see the module doc for each branch type).

    Call after :func:`mmbridge.export._tf.import_tensorflow`; uses the global Keras seed as set.

    Args:
        cfg: a validated config with ``framework: keras`` (a :class:`~mmbridge.train.config.RunConfig`).
        train: the train split from :func:`to_numpy` (input shapes; the numeric branch's
            ``Normalization`` is adapted on ``train["numeric"]``).
        vocab_size: number of token ids (``dataset.vocab_size``); needed by a ``text`` branch.
        num_classes: C.

    Returns:
        ``(model, parts, description)``: ``model`` maps a dict of the batch keys it reads
        (``model.input`` names: ``image`` uint8 ``[N, S, S, 3]``, ``text`` / ``text_mask`` int32
        ``[N, T]``, ``numeric`` float32 ``[N, F]``) to float32 logits ``[N, C]``; ``parts`` maps
        file names (``image_encoder.keras``, ``numeric_preprocess.keras``) to the sub-models to
        save; ``description`` has one line per branch.

    Raises:
        ConfigError: a branch type without a Keras counterpart, a ``text`` branch without
            ``vocab_size``, an input key missing from ``train``, or ``projection: false`` with a
            width other than ``fusion_dim``.
    """
    import keras

    m = as_run_config(cfg).model
    d = int(m.fusion_dim)
    inputs: dict[str, Any] = {}

    def model_input(key: str, where: str) -> Any:
        if key not in inputs:
            if key not in train:
                raise ConfigError(f"{where}.input_keys: {key!r} is not in the data (it has {sorted(train)})")
            inputs[key] = keras.Input(train[key].shape[1:], dtype=np.dtype(train[key].dtype).name, name=key)
        return inputs[key]

    parts: dict[str, Any] = {}
    tokens, lines = [], []
    for name, b in m.branches.items():
        where = f"model.branches.{name}"
        enc: Any = b.encoder
        kind, keys = enc.type, b.input_keys
        frozen = not b.trainable
        if kind == "conv":
            x = model_input(keys[0], where)
            size = tuple(x.shape[1:])
            scaled = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name=f"{name}_rescale")(x)
            encoder = conv_encoder(keras, size, enc.width, enc.depth, name=f"{name}_encoder")
            encoder.trainable = not frozen
            feat = encoder(scaled)
            parts[f"{name}_encoder.keras"] = encoder
            lines.append(f"{name}: uint8 {list(size)} -> Rescaling([-1, 1]) -> {encoder.name} "
                         f"({enc.depth} x Conv2D+BN+ReLU, {encoder.count_params():,} weights) -> [N, {feat.shape[-1]}]")
        elif kind == "text":
            if vocab_size is None:
                raise ConfigError(f"{where}: a 'text' encoder needs the text modality in data.modalities")
            ids = model_input(keys[0], where)
            mask_in = model_input(b.mask_key, where) if b.mask_key is not None else ids
            mask = keras.ops.not_equal(mask_in, 0)
            layers = [keras.layers.Embedding(int(vocab_size), enc.dim, name=f"{name}_embedding")]
            x = layers[0](ids)
            if enc.kind == "gru":
                layers.append(keras.layers.Bidirectional(keras.layers.GRU(enc.dim // 2, return_sequences=True),
                                                         name=f"{name}_bigru"))
                x = layers[-1](x, mask=mask)
            feat = keras.layers.GlobalAveragePooling1D(name=f"{name}_masked_mean")(x, mask=mask)
            for layer in layers:
                layer.trainable = not frozen
            lines.append(f"{name}: int32 [N, {ids.shape[1]}] -> Embedding({vocab_size}, {enc.dim})"
                         + (f" -> BiGRU({enc.dim // 2})" if enc.kind == "gru" else "")
                         + f" -> masked mean -> [N, {feat.shape[-1]}]")
        elif kind == "mlp":
            x = model_input(keys[0], where)
            pre = numeric_preprocess(keras, train[keys[0]], standardize=enc.standardize, name=f"{name}_preprocess")
            parts[f"{name}_preprocess.keras"] = pre
            layers = [keras.layers.Dense(enc.hidden, activation="relu", name=f"{name}_dense{i}") for i in (1, 2)]
            feat = pre(x)
            for layer in layers:
                layer.trainable = not frozen
                feat = layer(feat)
            lines.append(f"{name}: float32 [N, {x.shape[1]}] -> {pre.name} (Normalization"
                         f"{', adapted on train' if enc.standardize else ', identity'}) -> "
                         f"2 x Dense({enc.hidden}, relu) -> [N, {feat.shape[-1]}]")
        else:
            raise ConfigError(f"{where}.encoder.type: {kind!r} has no Keras equivalent (framework: keras builds "
                              f"conv, text and mlp branches)")
        if b.projection:
            feat = keras.layers.Dense(d, name=f"{name}_proj")(feat)
        elif feat.shape[-1] != d:
            raise ConfigError(f"{where}.projection: false needs the encoder width {feat.shape[-1]} to equal "
                              f"model.fusion_dim={d}")
        tokens.append(keras.layers.Reshape((1, d), name=f"{name}_token")(feat))

    x = tokens[0] if len(tokens) == 1 else keras.layers.Concatenate(axis=1, name="tokens")(tokens)  # [N, M, D]
    x = keras.layers.LayerNormalization(name="fusion_norm")(x)
    if m.modality_dropout > 0:
        x = keras.layers.Dropout(m.modality_dropout, noise_shape=(None, len(tokens), 1),
                                 name="modality_dropout")(x)
    x = keras.layers.Flatten(name="fusion_flatten")(x)
    x = keras.layers.Dense(d, activation="gelu", name="fusion_dense1")(x)
    # the torch heads' own defaults (ConcatFusion dropout 0.1, ClassificationHead dropout 0.0)
    x = keras.layers.Dropout(float(m.fusion_kwargs.get("dropout", _default_arg(ConcatFusion, "dropout"))),
                             name="fusion_dropout")(x)
    x = keras.layers.Dense(d, name="fusion_dense2")(x)
    x = keras.layers.Dropout(float(m.task_kwargs.get("dropout", _default_arg(ClassificationHead, "dropout"))),
                             name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    model = keras.Model(inputs, logits, name="keras_multimodal")
    lines.append(f"fusion: concat of {len(tokens)} tokens [N, {len(tokens)}, {d}] -> LayerNorm -> MLP -> "
                 f"logits [N, {num_classes}]; {model.count_params():,} weights")
    return model, parts, lines


def _default_arg(cls: Any, name: str) -> Any:
    """The default of keyword argument ``name`` of ``cls(...)``."""
    import inspect

    return inspect.signature(cls).parameters[name].default


def conv_encoder(keras: Any, size: tuple[int, ...], width: int, depth: int, *, name: str = "image_encoder") -> Any:
    """The Keras CNN of a ``conv`` branch: float32 ``[N, H, W, 3]`` (NHWC, in [-1, 1]) -> ``[N, width * 2**(depth-1)]``.

    ``depth`` stages of ``Conv2D(width * 2**i, 3, strides=2, padding="same", use_bias=False)``,
    ``BatchNormalization(momentum=0.9)`` (torch's default momentum 0.1) and ``ReLU``, then global
    average pooling. H and W are fixed (tf2onnx then writes explicit pads, which onnx2torch converts).

    Args:
        keras: the imported ``keras`` module.
        size: ``(H, W, 3)``.
        width: channels of the first conv; doubled at each stage.
        depth: number of stages (each halves H and W).
        name: the model's name (its input is named ``image``).

    Returns:
        A ``keras.Model``.
    """
    inp = keras.Input(tuple(size), dtype="float32", name="image")
    x = inp
    for i in range(depth):
        x = keras.layers.Conv2D(width * 2**i, 3, strides=2, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, out, name=name)


def numeric_preprocess(keras: Any, x_train: np.ndarray, *, standardize: bool = True,
                       name: str = "numeric_preprocess") -> Any:
    """A ``keras.Model`` standardising numeric features: float32 ``[N, F]`` -> float32 ``[N, F]``.

    One ``keras.layers.Normalization(axis=-1)``: adapted on ``x_train`` (per-column mean and
    population variance; a column constant in ``x_train`` gets its value as mean and variance 1,
    so it is only centred: Keras's own float32 adapt would leave round-off as its variance),
    or with ``standardize=False`` mean 0 and variance 1 (the identity).

    Args:
        keras: the imported ``keras`` module.
        x_train: float ``[N, F]`` train features without NaN (the dataset fills missing values).
        standardize: adapt on ``x_train`` (True) or keep the identity (False).
        name: the model's name (its input is named ``numeric``).

    Returns:
        A ``keras.Model`` (saveable alone as ``.keras``; exports to ONNX as ``(x - mean) / std``).

    Raises:
        ValueError: ``x_train`` is not 2-D or holds non-finite values.
    """
    x_train = np.asarray(x_train, dtype=np.float32)
    if x_train.ndim != 2 or not np.isfinite(x_train).all():
        raise ValueError(f"numeric_preprocess: x_train must be a finite float array [N, F], got shape {x_train.shape}")
    f = x_train.shape[1]
    inp = keras.Input((f,), dtype="float32", name="numeric")
    norm = keras.layers.Normalization(axis=-1, name="normalization")
    norm.build((None, f))
    if standardize:
        norm.adapt(x_train)
        var = np.asarray(norm.adapt_variance.numpy())
        # a constant column: Keras's batched float32 adapt leaves round-off (measured 1.4e-6 for a
        # column of 123.456) as its variance, and would then scale that column by ~800; decide
        # constancy from the data itself
        constant = (np.ptp(x_train, axis=0) == 0) | (var <= 0)
        if constant.any():  # centred exactly (the adapted mean is off by float32 round-off too)
            mean = np.asarray(norm.adapt_mean.numpy())
            norm.adapt_mean.assign(np.where(constant, x_train[0], mean).astype(mean.dtype))
            norm.adapt_variance.assign(np.where(constant, 1.0, var).astype(var.dtype))
            norm.finalize_state()
    return keras.Model(inp, norm(inp), name=name)


def _epoch_callback(keras: Any, *, x_val: Mapping[str, np.ndarray], y_val: np.ndarray, num_classes: int,
                    batch_size: int, monitor: str, mode: str, patience: int | None, writer: Any) -> Any:
    """A ``keras.callbacks.Callback`` that scores val after each epoch, logs it and stops early."""

    class EpochEval(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history: list[dict[str, Any]] = []
            self.best: float | None = None
            self.best_epoch = -1
            self.best_weights: list[np.ndarray] | None = None
            self.bad_epochs = 0
            self.stopped_early = False
            self.steps = 0

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.steps += 1

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            logits = self.model.predict(x_val, batch_size=batch_size, verbose=0)
            opt = self.model.optimizer
            lr = opt.learning_rate
            lr = float(lr(opt.iterations) if callable(lr) else keras.ops.convert_to_numpy(lr))
            record: dict[str, Any] = {"epoch": epoch + 1, "train/loss": float((logs or {}).get("loss", math.nan)),
                                      "lr": lr, "step": self.steps}
            record.update(evaluate_logits(logits, y_val, num_classes, "val"))
            value = record.get(monitor)
            if value is None:
                raise ConfigError(f"training.monitor: {monitor!r} is not among the validation metrics "
                                  f"{sorted(k for k in record if k.startswith('val/'))}; set it to one of them")
            if self.best is None or (value > self.best if mode == "max" else value < self.best):
                self.best, self.best_epoch, self.bad_epochs = float(value), epoch + 1, 0
                self.best_weights = [np.array(w) for w in self.model.get_weights()]
            else:
                self.bad_epochs += 1
            self.history.append(record)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                  flush=True)
            if writer is not None:
                for k, v in record.items():
                    if k not in ("epoch", "step"):
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, epoch + 1)
            if patience is not None and self.bad_epochs >= patience:
                self.stopped_early = True
                self.model.stop_training = True

    return EpochEval()


def run_keras(cfg: RunConfig | Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """Train and evaluate a validated ``framework: keras`` config in TF/Keras (see the module doc).

    Args:
        cfg: from :func:`mmbridge.train.config.load_config`, with ``framework: keras``.
        name: row name in the report (default ``output.name``, else the folder name of ``output.dir``).

    Returns:
        ``{"fit": {"history": [per-epoch dict: epoch, train/loss, lr, step, val/loss, val/top1,
        val/macro_f1, val/top5], "best", "best_epoch", "monitor", "stopped_early", "epochs_run",
        "train_time_s" (seconds of model.fit, per-epoch validation included)}, "val": metrics,
        "test": metrics, "report": path of report.md}``, the shape of
        :func:`mmbridge.cli.train.run_train`'s result; metrics are fractions in [0, 1] plus the
        loss in nats.

    Raises:
        ConfigError: the config is not ``framework: keras``; several processes (torchrun); Keras
            runs on a backend other than TensorFlow (``KERAS_BACKEND``); a branch the Keras
            builder cannot make (see :func:`build_keras_model`).
        DataError: the data checks failed (from :func:`mmbridge.data.load_splits`).
        ImportError: TensorFlow is not installed (``pip install 'mmbridge[tf]'``).
        ImportOrderError: TensorFlow was imported before torch's compiler stack in this process.
    """
    from mmbridge.export._tf import import_tensorflow
    from mmbridge.train import distributed
    from mmbridge.train.build import build_data, data_root
    from mmbridge.train.config import dump
    from mmbridge.train.metrics import write_report

    cfg = as_run_config(cfg)
    if cfg.framework != "keras":
        raise ConfigError(f"run_keras: the config has framework: {cfg.framework!r}; "
                          f"it needs framework: keras (use run_train for torch configs)")
    world = distributed.read_env()["world_size"]
    if world > 1:
        raise ConfigError(f"framework: keras trains in one process, but this is one of {world} (torchrun / "
                          f"WORLD_SIZE); launch it with plain `mmbridge train` (python -m mmbridge.cli train)")
    t = cfg.training
    root, builtin = data_root(cfg.data)
    t_data = time.perf_counter()
    splits = build_data(cfg.data)
    arrays = {s: to_numpy(ds) for s, ds in splits.items()}
    t_data = time.perf_counter() - t_data
    train_ds = splits["train"]
    num_classes = int(train_ds.num_classes)

    tf = import_tensorflow()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"framework: keras needs Keras on the TensorFlow backend, but KERAS_BACKEND selects "
                          f"{keras.backend.backend()!r}; unset KERAS_BACKEND or set it to tensorflow")
    keras.utils.set_random_seed(int(t.seed))
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    t_model = time.perf_counter()
    model, parts, lines = build_keras_model(cfg, arrays["train"], vocab_size=train_ds.vocab_size,
                                            num_classes=num_classes)
    t_model = time.perf_counter() - t_model
    keys = list(model.input.keys()) if isinstance(model.input, dict) else [i.name for i in model.inputs]
    x = {s: {k: a[k] for k in keys} for s, a in arrays.items()}
    y = {s: a["label"] for s, a in arrays.items()}

    out_dir = Path(cfg.output.dir)
    name = name or cfg.output.name or out_dir.name
    print(f"data: {'the built-in sample ' if builtin else ''}{root} "
          f"({len(train_ds)} train / {len(splits['val'])} val / {len(splits['test'])} test, "
          f"{num_classes} classes; read in {t_data:.1f} s)", flush=True)
    print(f"model (Keras {keras.__version__}, TensorFlow {tf.__version__}; built in {t_model:.1f} s; 1 process, "
          f"cpu, fp32):\n  " + "\n  ".join(lines), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    from mmbridge.train.checkpoint import write_text_atomic

    # a previous run's parts must not survive next to this run's config if this one fails
    for fname in parts:
        (out_dir / fname).unlink(missing_ok=True)
    write_text_atomic(out_dir / "config.yaml", dump(cfg))
    write_text_atomic(out_dir / "data.json", json.dumps(train_ds.metadata(), indent=1))

    bs, epochs = int(t.batch_size), int(t.epochs)
    total = epochs * math.ceil(len(train_ds) / bs)
    lr: Any = float(t.lr)
    if t.scheduler == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total))
    opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=float(t.weight_decay),
                                 global_clipnorm=t.grad_clip)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # the classification head's contract, as in a torch run (the Keras model is classification only)
    monitor = t.monitor or ClassificationHead.monitor
    mode = t.mode or ClassificationHead.metric_mode(monitor)
    writer = None
    if "tensorboard" in cfg.output.active_loggers:
        from mmbridge.train.trainer import summary_writer

        writer = summary_writer(out_dir / "tensorboard")
    cb = _epoch_callback(keras, x_val=x["val"], y_val=y["val"], num_classes=num_classes, batch_size=bs,
                         monitor=monitor, mode=mode, patience=t.patience, writer=writer)
    try:
        t0 = time.perf_counter()
        model.fit(x["train"], y["train"], batch_size=bs, epochs=epochs, shuffle=True, callbacks=[cb],
                  verbose=1 if t.progress else 0)
        elapsed = time.perf_counter() - t0
    finally:
        if writer is not None:
            writer.close()
    if t.restore_best and cb.best_weights is not None:
        model.set_weights(cb.best_weights)
    for part in parts.values():
        # saved trainable, whatever this run froze: a hybrid exports the file with trainable_export and
        # Keras would otherwise record every variable as non-trainable (0 parameters to fine-tune there)
        part.trainable = True
    saved = [save_keras_atomic(part, out_dir / fname) for fname, part in parts.items()]
    val = evaluate_logits(model.predict(x["val"], batch_size=bs, verbose=0), y["val"], num_classes, "val")
    test = evaluate_logits(model.predict(x["test"], batch_size=bs, verbose=0), y["test"], num_classes, "test")
    fit = {"history": cb.history, "best": cb.best, "best_epoch": cb.best_epoch, "monitor": monitor,
           "stopped_early": cb.stopped_early, "epochs_run": len(cb.history), "train_time_s": elapsed}
    row = {**test, **val, "epochs": len(cb.history), "best_epoch": cb.best_epoch,
           "train_time_s": round(elapsed, 1), "world_size": 1, "precision": "fp32"}
    notes = [f"data: {root}{' (built-in sample)' if builtin else ''}",
             f"framework: keras (Keras {keras.__version__}, TensorFlow {tf.__version__}, CPU)",
             f"weights: {'best epoch (' + monitor + ')' if t.restore_best else 'last epoch'}",
             "saved: " + ", ".join(p.name for p in saved)]
    report = str(write_report({name: row}, out_dir, title=f"mmbridge: {name}", notes=notes)[1])
    print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()), flush=True)
    print(f"saved: {', '.join(str(p) for p in saved)}", flush=True)
    print(f"report: {report}", flush=True)
    return {"fit": fit, "val": val, "test": test, "report": report}
