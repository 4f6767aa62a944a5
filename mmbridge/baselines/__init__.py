"""The TensorFlow side of mmbridge's comparisons (allowed to import TensorFlow and Keras).

* :mod:`.keras_run` -- ``framework: keras`` configs: the TF-only baseline trained with ``model.fit``;
* :mod:`.tf_models` -- the TF preprocessing and Keras encoders that the demo exports.
"""
