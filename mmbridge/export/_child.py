"""Child-process side of :func:`mmbridge.export` (``python -m mmbridge.export._child REQ RES``).

Reads a JSON request (``ref``: a path or ``"module:attribute"``; ``options``:
``ExportOptions.to_dict()``; the cache dir, ``force``, the parent's fingerprint and optionally
a ``samples.npz``), exports in this fresh process (the only one that imports TensorFlow), and
writes a JSON result: ``{"path": ...}`` or ``{"error": {"type", "message", "ops"?, "report"?, "probes"?}}``.
"""

from __future__ import annotations

import json
import sys


def main(req_path: str, res_path: str) -> int:
    with open(req_path) as f:
        req = json.load(f)
    result: dict
    try:
        from pathlib import Path

        import numpy as np

        from mmbridge._torch_stack import preload_torch_stack

        preload_torch_stack()  # before TF, always (see mmbridge._torch_stack)
        from mmbridge.export.exporter import export_located
        from mmbridge.export.options import ExportOptions
        from mmbridge.export.sources import SOURCES

        options = ExportOptions.from_dict(req["options"])  # a bridge's defaults were applied by the parent
        samples = None
        if req.get("samples"):
            with np.load(req["samples"], allow_pickle=False) as z:
                samples = {k: z[k] for k in z.files}
        located = SOURCES.locate(req["ref"], isolate=False)
        art = export_located(located, options, samples, Path(req["cache_dir"]), req["force"], req.get("fingerprint"))
        from mmbridge.export.exporter import last_export
        from mmbridge.export.refcache import loaded_source_files

        result = {"path": str(art.path), "files": loaded_source_files(),
                  "outcome": last_export().get("outcome", "exported")}
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        err = {"type": type(exc).__name__, "message": str(exc)}
        if hasattr(exc, "ops"):
            err["ops"] = exc.ops
        if getattr(exc, "report", None) is not None:
            err["report"] = exc.report.to_dict()
        if getattr(exc, "probes", None) is not None:  # ProbeError: the probe record crosses too
            err["probes"] = exc.probes
        result = {"error": err}
    with open(res_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
