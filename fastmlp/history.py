"""History: what fit returns, per epoch, and the lesson's ways to look at it
(a table in a file, and the accuracy and loss curves)."""
import csv
import io
import json
import os

from .files import atomic_write


class History:
    """Per-epoch metrics, Keras style: `history` maps 'loss', the head's
    metric ('accuracy', or 'r2' for a linear output), 'val_loss' and
    'val_accuracy' or 'val_r2' (with validation data), 'epoch_time' and
    'lr' (the learning rate each epoch started with) to lists with one
    value per epoch. `compile_time` is the JIT compilation
    time of this fit (near zero when Numba's cache is warm), kept out of
    epoch_time."""

    def __init__(self, metric="accuracy"):
        self.metric = metric
        self.history = {"loss": [], metric: [], "epoch_time": [], "lr": []}
        self.epoch = []
        self.compile_time = 0.0
        # the thread count of fit's last epoch (given none, fit picks one
        # per epoch: training.ThreadChoice)
        self.threads = None
        self.best_epoch = None  # with early stopping
        self.stopped_epoch = None
        # with MPI: seconds spent in the per-step Allreduce, and steps taken
        self.allreduce_time = None
        self.allreduce_steps = 0

    def __repr__(self):
        last = {k: v[-1] for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"

    def rows(self):
        """One dict per epoch: 'epoch' (from 1), then every metric."""
        keys = [k for k in self.history if k != "epoch_time"] + ["epoch_time"]
        return [dict(epoch=e + 1, **{k: self.history[k][i] for k in keys})
                for i, e in enumerate(self.epoch)]

    def save(self, path):
        """Writes rows() as .csv (a header line, an epoch a line) or .json (a
        list of objects), chosen by the file's ending; atomically."""
        kind = os.path.splitext(str(path))[1].lower()
        if kind not in (".csv", ".json"):
            raise ValueError(f"{path}: a history is saved as .csv or .json")
        rows = self.rows()
        if kind == ".json":
            text = json.dumps(rows, indent=1)
        else:
            buffer = io.StringIO(newline="")
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["epoch"])
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
        atomic_write(path, [text.encode()])

    def plot(self, path=None, held_out="validation"):
        """The lesson's two figures side by side: the head's metric (accuracy,
        or R²) and the loss per epoch, on the training rows and, with
        validation data, on the rows labelled `held_out`. Returns the
        matplotlib Figure; with `path`, also saves it there (.png, .svg,
        .pdf: by the ending; atomically) and closes it. Needs matplotlib."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("History.plot needs matplotlib: pip install 'fastmlp[plot]'") \
                from None
        from matplotlib.ticker import MaxNLocator
        epochs = [e + 1 for e in self.epoch]
        fig, (score, loss) = plt.subplots(1, 2, figsize=(11, 4))
        metric = self.metric
        for axis, key, title in ((score, metric, metric.capitalize() if metric != "r2" else "R²"),
                                 (loss, "loss", "Loss")):
            axis.plot(epochs, self.history[key], marker="o", label="train")
            if f"val_{key}" in self.history:
                axis.plot(epochs, self.history[f"val_{key}"], marker="o", label=held_out)
            axis.set_title(title)
            axis.set_xlabel("epoch")
            axis.legend()
            axis.grid(alpha=0.3)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        if path is not None:
            image = io.BytesIO()
            fig.savefig(image, dpi=100, format=os.path.splitext(str(path))[1][1:].lower() or None)
            plt.close(fig)
            atomic_write(path, [image.getvalue()])
        return fig
