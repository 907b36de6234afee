"""Classification metrics from per-example predictions, on the host.

Accumulating a confusion matrix (not just a running accuracy) costs nothing
extra and answers the questions a fine-tuning run raises next: which classes
the new head confuses, and whether top-1 hides a near miss (top-5).
"""

from __future__ import annotations

import jax
import numpy as np

from xfer.training import mesh as mesh_lib


class Accumulator:
    """Collects masked per-example outputs of `eval_step` over one eval pass."""

    def __init__(self, num_classes: int):
        self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [true, predicted]
        self.top5_hits = 0

    def add(self, outputs: dict) -> None:
        keep = np.asarray(outputs["mask"]) > 0
        labels, predictions = np.asarray(outputs["label"])[keep], np.asarray(outputs["prediction"])[keep]
        np.add.at(self.confusion, (labels, predictions), 1)
        self.top5_hits += int(np.asarray(outputs["top5"])[keep].sum())

    def metrics(self, class_names: list[str]) -> dict:
        """accuracy, top-5 (>= 5 classes), macro F1, and per-class precision/recall/F1."""
        count = int(self.confusion.sum())
        if count == 0:
            raise ValueError("the eval split is empty; point config.data at a split with examples")
        correct = np.diag(self.confusion).astype(np.float64)
        predicted, actual = self.confusion.sum(0), self.confusion.sum(1)
        precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
        recall = np.divide(correct, actual, out=np.zeros_like(correct), where=actual > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(correct), where=denom > 0)
        result = {"eval_accuracy": correct.sum() / count, "eval_examples": count,
                  "eval_macro_f1": float(f1[actual > 0].mean())}
        if len(class_names) >= 5:
            result["eval_top5"] = self.top5_hits / count
        result["per_class"] = {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, actual)}
        return result

    def confusion_csv(self, class_names: list[str]) -> str:
        """Rows are true classes, columns predicted ones."""
        lines = ["true\\predicted," + ",".join(class_names)]
        lines += [f"{name}," + ",".join(map(str, row)) for name, row in zip(class_names, self.confusion)]
        return "\n".join(lines) + "\n"


def one_pass(eval_step, state, data) -> "Accumulator":
    """`eval_step` over the whole eval split of `data` (an `xfer.data.Data`), accumulated."""
    mesh = mesh_lib.data_mesh()
    accumulator = Accumulator(data.num_classes)
    for batch in data.eval_batches():
        accumulator.add(jax.device_get(eval_step(state, mesh_lib.global_batch(batch, mesh))))
    return accumulator
