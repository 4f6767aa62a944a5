"""The export stage: TensorFlow / Keras / tf2onnx -> a checked ONNX artifact.

Everything in mmbridge that imports TensorFlow, Keras or tf2onnx lives in this package (and in
:mod:`mmbridge.baselines` and :mod:`mmbridge.data.tf_adapter`; lint enforces it):

* :mod:`.exporter` -- ``export()``: options, locate the source, fingerprint, trace and freeze,
  tf2onnx, repairs and refusals, ``onnx.checker``, onnxoptimizer, parity against TF, the cache;
* :mod:`.options` -- :class:`ExportOptions`, the one frozen record of an export's options;
* :mod:`.sources` -- one adapter per source kind (:data:`SOURCES`: Keras file, SavedModel,
  reference, bridge, Keras 3, tf-keras, ``tf.function``, Python callable);
* :mod:`.handlers` -- tf2onnx handlers for the TF ops it leaves unconverted or converts wrongly;
* :mod:`.rewrites` -- exact ONNX rewrites of TF ops tf2onnx leaves in the graph;
* :mod:`.trainable` -- the trainable export (BatchNorm, Dropout, LayerNorm kept; weight markers);
* :mod:`.preprocessing` -- the Keras preprocessing-layer support table and measurements;
* :mod:`.fingerprint` -- what determines an exported graph (the cache key);
* :mod:`._tf` -- importing TensorFlow after torch's compiler stack; :mod:`._child` -- the child
  process that exports SavedModels, files and references so the caller never loads TF.

Importing this package does not import TensorFlow; exporting does. The package is callable:
``mmbridge.export(obj, ...)`` is :func:`mmbridge.export.exporter.export`.
"""

from mmbridge._callable import make_callable
from mmbridge.export.exporter import SAFE_PASSES, export, optimize_model
from mmbridge.export.options import ExportOptions
from mmbridge.export.rewrites import ONNX_REWRITES, register_onnx_rewrite
from mmbridge.export.sources import SOURCES, SourceAdapter

__all__ = ["export", "ExportOptions", "SOURCES", "SourceAdapter", "optimize_model", "register_onnx_rewrite",
           "ONNX_REWRITES", "SAFE_PASSES"]

make_callable(__name__, export)
