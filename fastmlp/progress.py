"""Keras-style progress output, used by `fit(verbose=1)` and `fastmlp-train`.

On a terminal the current epoch's line is redrawn with a bar, steps and ETA;
otherwise (a file, a pipe, CI logs) one line is written per epoch:

    Epoch 3/10
    600/600 - 0.08s - 140us/step - loss: 0.2345 - accuracy: 0.9312 - val_loss: ... - val_accuracy: ...
"""
import sys
import threading
import time

from . import jit

BAR_WIDTH = 30
SPINNER = "|/-\\"


def format_metrics(logs):
    return " - ".join(f"{key}: {value:.4f}" for key, value in logs.items())


class Callback:
    """What fit calls, in order: on_compile_begin(cached) once (cached: the
    kernels are in Numba's cache for this CPU; None when unknown), then
    on_train_begin(compile_time) once, then per
    epoch on_epoch_begin(epoch, total_epochs, n_steps), on_steps(step,
    n_steps, logs) after every chunk of steps, and on_epoch_end(epoch,
    n_steps, epoch_time, logs), which may return True to stop training after
    that epoch. Epochs count from 0 over the model's life."""

    def on_compile_begin(self, cached):
        pass

    def on_train_begin(self, compile_time):
        pass

    def on_epoch_begin(self, epoch, total_epochs, n_steps):
        pass

    def on_steps(self, step, n_steps, logs):
        pass

    def on_epoch_end(self, epoch, n_steps, epoch_time, logs):
        pass


# what the first run's compile takes, said before it starts
COMPILE_NOTICE = ("Compiling kernels for this CPU (first run only; 20-50 s on 2 cores, "
                  "cached after)")
# the same before a first prediction (predict and evaluate compile less)
PREDICT_COMPILE_NOTICE = ("Compiling kernels for this CPU (first run only; about 40 s, "
                          "cached after)")
# the same where Numba's cache has no writable directory (jit.py)
UNCACHED_NOTICE = ("Compiling kernels for this CPU (about a minute, in every run: no writable "
                   "directory for Numba's cache; set NUMBA_CACHE_DIR)")


class CompileNotice(Callback):
    """What fit says with verbose=0 (and no ProgressPrinter) when it must
    compile: the notice, on stderr, so that a silent minute does not look
    like a hang."""

    def __init__(self, stream=None):
        self.stream = stream

    def on_compile_begin(self, cached):
        if cached is False:
            stream = self.stream or sys.stderr
            stream.write((COMPILE_NOTICE if jit.caching() else UNCACHED_NOTICE) + "...\n")
            stream.flush()


class ProgressPrinter(Callback):
    """epochs=False prints the compile notice and time only."""

    def __init__(self, stream=None, epochs=True):
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.epochs = epochs
        self.spinner = None

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()

    def on_compile_begin(self, cached):
        if cached is not False:
            return
        notice = COMPILE_NOTICE if jit.caching() else UNCACHED_NOTICE
        self.write(notice + ("" if self.live else "...\n"))
        if self.live:
            self.spinner = Spinner(self.write)

    def on_train_begin(self, compile_time):
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None
            self.write("\r\x1b[K")
        # compiling (or loading cached kernels) is reported once, apart
        self.write(f"JIT compile: {compile_time:.2f}s\n")

    def on_epoch_begin(self, epoch, total_epochs, n_steps):
        if not self.epochs:
            return
        self.write(f"Epoch {epoch + 1}/{total_epochs}\n")
        self.started = time.perf_counter()

    def on_steps(self, step, n_steps, logs):
        if not self.live or not self.epochs:
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
        if not self.epochs:
            return
        per_step = epoch_time / max(n_steps, 1)
        line = (f"{n_steps}/{n_steps} - {epoch_time:.2f}s - {per_step * 1e6:.0f}us/step - "
                f"{format_metrics(logs)}")
        # on a terminal, overwrite the bar and clear what is left of it
        self.write(f"\r{line}\x1b[K\n" if self.live else f"{line}\n")


class Spinner:
    """Turns a character after the current line on a terminal, from a thread
    of its own, until stop()."""

    def __init__(self, write, interval=0.25):
        self.write, self.interval = write, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        turn = 0
        while not self.done.wait(self.interval):
            self.write(f" {SPINNER[turn % len(SPINNER)]}\b\b")
            turn += 1

    def stop(self):
        self.done.set()
        self.thread.join()
