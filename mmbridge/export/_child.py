"""Child-process side of :func:`mmbridge.export` (``python -m mmbridge.export._child REQ RES``).

Reads a JSON request (reference, options, cache dir), exports in this fresh process (the only
one that imports TensorFlow), and writes a JSON result: ``{"path": ...}`` or
``{"error": {"type", "message", "ops"?, "report"?}}``.
"""

from __future__ import annotations

import json
import sys


def main(req_path: str, res_path: str) -> int:
    with open(req_path) as f:
        req = json.load(f)
    result: dict
    try:
        import numpy as np

        from mmbridge._torch_stack import preload_torch_stack

        preload_torch_stack()  # before TF, always (see mmbridge._torch_stack)
        from mmbridge.export.exporter import export
        from mmbridge.specs import TensorSpec, Tolerance

        opts = dict(req["options"])
        samples = None
        if req.get("samples"):
            with np.load(req["samples"], allow_pickle=False) as z:
                samples = {k: z[k] for k in z.files}
        specs = [TensorSpec.from_dict(d) for d in opts.pop("input_specs")] if opts.get("input_specs") else None
        tol = Tolerance(**opts.pop("tolerance")) if opts.get("tolerance") else None
        opts.pop("tolerance", None)
        opts.pop("input_specs", None)
        if req.get("fingerprint"):  # the parent fingerprinted the file(s): use the same cache key
            from pathlib import Path

            from mmbridge.export.exporter import _export_live, _load_reference

            art = _export_live(_load_reference(req["ref"]), dict(req["options"]), samples, Path(req["cache_dir"]),
                               req["force"], req["fingerprint"])
        else:
            art = export(req["ref"], input_specs=specs, tolerance=tol, sample_inputs=samples,
                         cache_dir=req["cache_dir"], force=req["force"], isolate=False, **opts)
        result = {"path": str(art.path)}
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        err = {"type": type(exc).__name__, "message": str(exc)}
        if hasattr(exc, "ops"):
            err["ops"] = exc.ops
        if getattr(exc, "report", None) is not None:
            err["report"] = exc.report.to_dict()
        result = {"error": err}
    with open(res_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
