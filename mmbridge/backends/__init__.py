"""Backends that turn an ONNX artifact into a ``torch.nn.Module``.

* :mod:`.torch_backend`: trainable (onnx2torch, extended by :mod:`.converters` through its converter registry).
* :mod:`.ort_backend`: frozen onnxruntime session with IO binding.
"""
