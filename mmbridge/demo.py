"""``mmbridge demo``: the whole pipeline on the built-in sample (or ``--data DIR``), end to end.

1. **export** (TF -> ONNX, in a child process, so this process never imports TensorFlow):
   :func:`~mmbridge.baselines.tf_models.image_preprocess` (a ``tf.function``: uint8 NHWC -> float32 in [-1, 1]) and
   ``image_encoder_32`` / ``image_encoder_64`` (a small Keras CNN), both by ``"mmbridge.baselines.tf_models:<name>"`` reference;
2. **bridge**: the preprocessing runs on onnxruntime (frozen, IO binding), the Keras encoder is
   converted to a trainable torch module;
3. **compose** with a native torch text branch (embedding bag) and a numeric MLP branch, attention fusion;
4. **train** with bf16 autocast (:class:`~mmbridge.Trainer`), early stopping on validation
   top-1, checkpoints in ``OUT``;
5. **evaluate** on the test split: ``OUT/report.json`` and ``OUT/report.md``.

The TF builders live in :mod:`mmbridge.baselines.tf_models` (the only place beside the export
side that may import TensorFlow); this module never imports it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

DEFAULT_IMAGE_SIZE = 32


def demo_config(data: str | None, out: str, epochs: int, image_size: int, *,
                preprocess_backend: str = "ort") -> dict[str, Any]:
    """The demo as ``mmbridge train`` config data (YAML form; :func:`~mmbridge.train.config.load_config`
    fills the rest from the config dataclasses and returns a :class:`~mmbridge.train.config.RunConfig`)."""
    return {
        "data": {"root": data, "image_size": image_size, "tokenizer": "word", "max_length": 48},
        "model": {
            "branches": {
                "image": {"preprocess": {"type": "export", "ref": "mmbridge.baselines.tf_models:image_preprocess",
                                         "backend": preprocess_backend, "name": "demo_preprocess"},
                          "encoder": {"type": "export", "ref": f"mmbridge.baselines.tf_models:image_encoder_{image_size}",
                                      "backend": "torch", "name": f"demo_image_encoder_{image_size}"}},
                "text": {"encoder": {"type": "text", "kind": "bag", "dim": 64}},
                "numeric": {"encoder": {"type": "mlp", "hidden": 64}},
            },
            "fusion": "attention", "fusion_dim": 64, "fusion_kwargs": {"num_layers": 1, "num_heads": 4},
            "modality_dropout": 0.1,
        },
        "training": {"epochs": epochs, "batch_size": 16, "lr": 3e-3, "precision": "bf16", "patience": 5,
                     "seed": 0, "resume": None, "restore_best": True, "progress": True},
        "output": {"dir": out, "tensorboard": True},
    }


def run_demo(data: str | os.PathLike | None = None, out: str | os.PathLike = "runs/demo",
             epochs: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the demo (see the module doc) and return :func:`mmbridge.train.run.run_train`'s result.

    Args:
        data: dataset folder in the layout of :func:`mmbridge.data.load_splits`; None: the
            built-in sample (:func:`mmbridge.data.sample_dir`).
        out: output directory (checkpoints, TensorBoard logs, ``report.{json,md}``).
        epochs: default 8 on the sample, 15 on ``data``.
        quiet: no progress lines on stderr while the model is built (exports, cache hits, seconds).

    Raises:
        ConfigError: ``data`` is not a directory, or ``epochs < 1``.
        ExportError / ParityError: the TF export failed (the child's error is re-raised).
        DataError: the data checks failed.
    """

    from mmbridge.errors import ConfigError
    from mmbridge.train.config import load_config
    from mmbridge.train.run import run_train

    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"mmbridge demo: epochs must be a whole number >= 1 (None: 8 on the sample, 15 on your "
                          f"data), got {epochs!r}")
    if data is None:
        from mmbridge.data import sample_dir

        print(f"mmbridge demo: no --data given, using the small synthetic sample built into the package "
              f"({sample_dir()}); pass --data DIR to run on your own folder", flush=True)
    else:
        print(f"mmbridge demo: using your data in {Path(data).resolve()}", flush=True)
    size = DEFAULT_IMAGE_SIZE if data is None else 64  # image_encoder_32 / image_encoder_64
    backend = "ort"  # frozen TF preprocessing runs on onnxruntime (IO binding)
    cfg = load_config(None, data=demo_config(None if data is None else str(data), str(out),
                                             epochs if epochs is not None else (8 if data is None else 15), size,
                                             preprocess_backend=backend))
    t0 = time.perf_counter()
    print("step 1-2: exporting the TF preprocessing and Keras encoder (child process), bridging them "
          f"(preprocess: {backend}, encoder: torch)", flush=True)
    result = run_train(cfg, name="demo hybrid (bridged TF image + torch text/numeric)", quiet=quiet)
    if result["report"]:
        print("\n" + Path(result["report"]).read_text(), flush=True)
    print(f"mmbridge demo: done in {time.perf_counter() - t0:.0f} s; report in {result['report']} "
          f"(and report.json); checkpoints and TensorBoard logs in {out}", flush=True)
    return result
