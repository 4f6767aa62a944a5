"""What the probe check (mmbridge.export.probes) costs and covers at export, on three small models.

    PYTHONPATH=. python tools/probe_cost.py

Prints, per model: the probe runs, how many were skipped (TF raised) or had a backend raising,
the op types targeted, the probe check's own seconds (``meta.json`` ``probes.seconds``) and the
export's total seconds with probes on and off (fresh cache, same process; on a shared CPU the
totals are noisy, the probe seconds less so).
"""

from __future__ import annotations

import tempfile

import numpy as np

import mmbridge


def _models(keras):
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3), name="image")
    x = L.Rescaling(1 / 255)(inp)
    x = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = L.BatchNormalization()(x)
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="gelu")(x)
    out = L.Dense(3)(L.GlobalAveragePooling2D()(x))
    cnn = keras.Model(inp, out)
    cnn_spec = [mmbridge.TensorSpec("image", ("batch", "h", "w", 3), "float32", "NHWC", value_range=(0, 255))]
    cnn_sample = {"image": np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)}

    ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = L.Embedding(100, 16)(ids)
    x = L.LayerNormalization()(x + L.MultiHeadAttention(num_heads=2, key_dim=8)(x, x))
    x = L.LayerNormalization()(x + L.Dense(16)(L.Dense(32, activation="gelu")(x)))
    tfm = keras.Model(ids, L.GlobalAveragePooling1D()(x))
    tfm_spec = [mmbridge.TensorSpec("token_ids", ("batch", "seq"), "int32", "NT", value_range=(0, 99))]

    tv = L.TextVectorization(max_tokens=20, output_sequence_length=8)
    tv.adapt(["the quick brown fox", "jumps over the lazy dog", "Hello, World!"])
    tv_spec = [mmbridge.TensorSpec("text", ("batch",), "string")]
    return [("small CNN", cnn, cnn_spec, cnn_sample), ("Transformer block", tfm, tfm_spec, None),
            ("TextVectorization", tv, tv_spec, None)]


def main() -> None:
    import mmbridge.export.handlers  # noqa: F401  (loads onnxruntime-extensions before TF)

    mmbridge.export._tf.import_tensorflow()  # torch's stack first, then TF
    import keras  # noqa: TID251 - a tool of the export stage, after import_tensorflow()

    print(f"{'model':18} {'runs':>4} {'skip':>4} {'raised':>6} {'probe s':>8} {'export s (on)':>13} "
          f"{'export s (off)':>14}  targets")
    for name, obj, spec, sample in _models(keras):
        times: dict[bool, float] = {}
        for probes in (True, False, True, False):  # twice each, the faster kept: the first export warms TF up
            with tempfile.TemporaryDirectory() as cache:
                art = mmbridge.export(obj, input_specs=spec, sample_inputs=sample, cache_dir=cache, probes=probes,
                                      force=True)
                times[probes] = min(times.get(probes, float("inf")), art.meta["export_seconds"])
                if probes:
                    rec = art.meta["probes"]
        print(f"{name:18} {rec['runs']:>4} {rec['skipped']:>4} {rec['backend_raised']:>6} {rec['seconds']:>8.3f} "
              f"{times[True]:>13.2f} {times[False]:>14.2f}  {', '.join(rec['targets']) or '-'}")


if __name__ == "__main__":
    main()
