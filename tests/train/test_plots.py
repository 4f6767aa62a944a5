"""mmbridge.train.plots: the run's learning-curve and confusion-matrix PNGs, and the predictions behind them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmbridge.train.plots import predictions, write_run_plots

pytest.importorskip("matplotlib")


def test_predictions_are_the_argmax_of_the_model_on_the_dataset():
    data = [{"x": torch.tensor([float(i % 3), 1.0]), "label": torch.tensor(i % 2)} for i in range(10)]

    class Pick(torch.nn.Module):
        def forward(self, batch):
            x = batch["x"]
            return torch.stack([x[:, 0], 1 - x[:, 0], x[:, 1] * 0.5], -1)

    true, pred = predictions(Pick(), data, batch_size=4)
    np.testing.assert_array_equal(true, [i % 2 for i in range(10)])
    np.testing.assert_array_equal(pred, [[1, 0, 0][i % 3] for i in range(10)])


def test_write_run_plots_writes_both_pngs(tmp_path):
    history = [{"epoch": e, "train/loss": 2.0 / e, "val/loss": 2.2 / e, "val/top1": 0.3 + 0.1 * e} for e in (1, 2, 3)]
    true = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0, 2])
    written = write_run_plots(tmp_path, history, monitor="val/top1", confusion=(true, pred), class_names=["a", "b", "c"])
    assert set(written) == {"learning_curve", "confusion_matrix"}
    for path in written.values():
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert set(write_run_plots(tmp_path / "r", history, monitor=None)) == {"learning_curve"}  # regression: no matrix
