"""Keras-style progress output, used by `fit(verbose=1)` and `fastmlp-train`.

On a terminal the current epoch's line is redrawn with a bar, steps and ETA;
otherwise (a file, a pipe, CI logs) one line is written per epoch:

    Epoch 3/10
    600/600 - 0.08s - 140us/step - loss: 0.2345 - accuracy: 0.9312 - val_loss: ... - val_accuracy: ...
"""
import sys
import time

BAR_WIDTH = 30


def format_metrics(logs):
    return " - ".join(f"{key}: {value:.4f}" for key, value in logs.items())


class Callback:
    """What fit calls, in order: on_train_begin(compile_time) once, then per
    epoch on_epoch_begin(epoch, total_epochs, n_steps), on_steps(step,
    n_steps, logs) after every chunk of steps, and on_epoch_end(epoch,
    n_steps, epoch_time, logs). Epochs count from 0 over the model's life."""

    def on_train_begin(self, compile_time):
        pass

    def on_epoch_begin(self, epoch, total_epochs, n_steps):
        pass

    def on_steps(self, step, n_steps, logs):
        pass

    def on_epoch_end(self, epoch, n_steps, epoch_time, logs):
        pass


class ProgressPrinter(Callback):
    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()

    def on_train_begin(self, compile_time):
        # compiling (or loading cached kernels) is reported once, apart
        self.write(f"JIT compile: {compile_time:.2f}s\n")

    def on_epoch_begin(self, epoch, total_epochs, n_steps):
        self.write(f"Epoch {epoch + 1}/{total_epochs}\n")
        self.started = time.perf_counter()

    def on_steps(self, step, n_steps, logs):
        if not self.live:
            return
        done = step / n_steps
        filled = int(BAR_WIDTH * done)
        bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + "." * (BAR_WIDTH - filled - 1)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        width = len(str(n_steps))
        self.write(f"\r{step:{width}d}/{n_steps} [{bar[:BAR_WIDTH]}] - ETA: {eta:.0f}s - "
                   f"{format_metrics(logs)}")

    def on_epoch_end(self, epoch, n_steps, epoch_time, logs):
        per_step = epoch_time / max(n_steps, 1)
        line = (f"{n_steps}/{n_steps} - {epoch_time:.2f}s - {per_step * 1e6:.0f}us/step - "
                f"{format_metrics(logs)}")
        # on a terminal, overwrite the bar and clear what is left of it
        self.write(f"\r{line}\x1b[K\n" if self.live else f"{line}\n")
