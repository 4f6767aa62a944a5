"""Training and evaluation of :class:`~mmbridge.HybridModel` (docs/design.md parts 9 and 11).

* :mod:`.trainer`: :class:`Trainer` (autocast, GradScaler, DDP, accumulation, checkpoints,
  early stopping, TensorBoard, tqdm, torchmetrics);
* :mod:`.distributed`: torchrun / Kubeflow environment -> process group and device;
* :mod:`.checkpoint`: atomic, ``weights_only``-loadable checkpoints with RNG states;
* :mod:`.metrics`: torchmetrics collections and JSON / Markdown reports;
* :mod:`.encoders`: small native torch encoders (image CNN, text, numeric MLP);
* :mod:`.config`: the config dataclasses (:class:`~.config.RunConfig`, :class:`~.config.TrainConfig`,
  :class:`~.config.DataConfig`, :class:`~.config.OutputConfig`; the model's are in
  :mod:`mmbridge.composition.config`), the one source of defaults, and the YAML schema,
  validated up front (every problem at once);
* :mod:`.components`: the built-in YAML component types (config dataclass + builder, registered)
  and the tokenizer names;
* :mod:`.build`: config -> data + model (imports ORT / exports only after validation);
* :mod:`.cli`: ``mmbridge train | evaluate | demo``.

Importing this package is light (no TensorFlow, no onnxruntime).
"""
