"""fastmlp-train: train, evaluate and resume MLPs from the terminal."""
import argparse
import csv
import json
import os
import signal
import sys
import time


from . import datasets, distributed
from .model import MLP
from .modelfile import load as load_model, loads as load_model_bytes
from .optimizers import DEFAULT_LR, OPTIMIZERS
from .progress import Callback, ProgressPrinter
from .training import MONITORS, SAMPLINGS, TrainingDiverged, TrainingInterrupted, fit

EXAMPLES = """examples:
  fastmlp-train                                   the classic lesson: MNIST, 784-50-10 sigmoid, SGD 0.1, batch 100
  fastmlp-train --dataset fashion-mnist --plot curves.png --history history.csv
  fastmlp-train --hidden 256,128 --activation relu --init he --optimizer adam --epochs 20
  fastmlp-train --dataset fashion-mnist --epochs 5 --save model.fmlp
  fastmlp-train --resume model.fmlp --epochs 10 --save model.fmlp   (epochs 6 to 10)
  fastmlp-train --epochs 50 --save model.fmlp --checkpoint-every 5
  fastmlp-train --evaluate model.fmlp --dataset fashion-mnist
  mpiexec -n 4 fastmlp-train --distributed --hidden 512,512 --activation relu --batch-size 128

exit codes: 0 success, 2 usage error or bad input, 130 interrupted (after --save)
"""
# Architecture flags: defaults apply to a new model; with --resume the file decides.
ARCHITECTURE_DEFAULTS = {"hidden": "50", "activation": "sigmoid", "dtype": "float32",
                         "init": "normal", "init_scale": 0.01}


OPTIMIZER_DEFAULTS = {"optimizer": "sgd", "lr": None, "momentum": 0.9, "nesterov": False,
                      "weight_decay": 0.0}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it has none or its help states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """Bad flags or input: one line on stderr, exit code 2."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastmlp-train", description="Train a multi-layer perceptron on MNIST-style data "
        "with fastmlp: model summary, Keras-style progress, test accuracy, optional history, "
        "plot and model file.", epilog=EXAMPLES,
        formatter_class=lambda prog: HelpFormatter(prog, width=100))
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="mnist", choices=datasets.NAMES,
                      help="downloaded when not found locally (digits ships with scikit-learn)")
    data.add_argument("--data-dir", help="a directory holding the four IDX files")
    data.add_argument("--no-download", action="store_true", help="never download")
    model = parser.add_argument_group("model (taken from the file with --resume)")
    model.add_argument("--hidden", help="hidden layer widths, comma separated ('' for none) "
                       f"(default: {ARCHITECTURE_DEFAULTS['hidden']})")
    model.add_argument("--activation", choices=["sigmoid", "tanh", "relu"],
                       help=f"(default: {ARCHITECTURE_DEFAULTS['activation']})")
    model.add_argument("--dtype", choices=["float32", "float64"],
                       help=f"(default: {ARCHITECTURE_DEFAULTS['dtype']})")
    model.add_argument("--init", choices=["normal", "xavier", "he"],
                       help=f"(default: {ARCHITECTURE_DEFAULTS['init']})")
    model.add_argument("--init-scale", type=float,
                       help=f"std of --init normal (default: {ARCHITECTURE_DEFAULTS['init_scale']})")
    train = parser.add_argument_group("training")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                       help=f"(default: {OPTIMIZER_DEFAULTS['optimizer']}; with --resume, the file's)")
    train.add_argument("--lr", type=float, help="learning rate (default: 0.1 for sgd, as in the "
                       f"lesson; {DEFAULT_LR['momentum']} for momentum; {DEFAULT_LR['adam']} "
                       "for adam; with --resume, the file's)")
    train.add_argument("--momentum", type=float,
                       help=f"(default: {OPTIMIZER_DEFAULTS['momentum']}; with --resume, the file's)")
    train.add_argument("--nesterov", action="store_const", const=True,
                       help="Nesterov momentum (with --resume, the file's)")
    train.add_argument("--weight-decay", type=float, help="L2 on weights "
                       f"(default: {OPTIMIZER_DEFAULTS['weight_decay']}; with --resume, the file's)")
    train.add_argument("--epochs", type=int, default=10,
                       help="epochs to train; with --resume, the total to reach")
    train.add_argument("--batch-size", type=int, default=100, help="rows per step")
    train.add_argument("--sampling", default="epoch", choices=SAMPLINGS,
                       help="epoch: a permutation per epoch; replacement: rows drawn with replacement")
    train.add_argument("--no-shuffle", action="store_true", help="take rows in order")
    train.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    train.add_argument("--threads", type=int, help="threads (default: all cores; with "
                       "--distributed, the cores each rank has to itself)")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training over MPI: start with mpiexec -n N; each "
                       "rank trains its shard of every batch (--batch-size is the global "
                       "batch) and rank 0 alone prints and writes files (needs "
                       "pip install 'fastmlp[mpi]')")
    train.add_argument("--patience", type=int, help="early stopping: stop after this many "
                       "epochs without improvement of --monitor (default: off)")
    train.add_argument("--monitor", default="val_loss", choices=MONITORS,
                       help="the metric early stopping watches (on the test set for val_*)")
    train.add_argument("--min-delta", type=float, default=0.0,
                       help="the least change that counts as an improvement")
    train.add_argument("--no-restore-best", action="store_true",
                       help="keep the last epoch's parameters, not the best epoch's")
    out = parser.add_argument_group("output")
    out.add_argument("--history", metavar="FILE", help="per-epoch metrics as .csv or .json")
    out.add_argument("--plot", metavar="FILE.png",
                     help="accuracy and loss curves (needs matplotlib: pip install 'fastmlp[plot]')")
    out.add_argument("--save", metavar="FILE",
                     help="write the trained model (also on Ctrl-C, SIGTERM or divergence)")
    out.add_argument("--checkpoint-every", metavar="N", type=int,
                     help="also write --save every N epochs, atomically, to resume from")
    out.add_argument("--resume", metavar="FILE", help="continue training a saved model")
    out.add_argument("--evaluate", metavar="FILE",
                     help="only report the test loss and accuracy of a saved model")
    out.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    return parser


def parse_hidden(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--hidden takes comma-separated integers, got {text!r}") from None


def check_args(parser, args):
    if args.evaluate and (args.resume or args.save or args.distributed):
        parser.error("--evaluate only reads a model: it takes no --resume, --save or "
                     "--distributed")
    if args.resume:
        given = [f"--{key.replace('_', '-')}" for key in ARCHITECTURE_DEFAULTS
                 if getattr(args, key) is not None]
        if given:
            parser.error(f"{', '.join(given)} cannot change a resumed model (the file decides)")
    if args.checkpoint_every is not None and (args.checkpoint_every < 1 or not args.save):
        parser.error("--checkpoint-every N needs N >= 1 and --save FILE")
    if args.history and os.path.splitext(args.history)[1].lower() not in (".csv", ".json"):
        parser.error("--history FILE must end in .csv or .json")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only whether it is there)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fastmlp[plot]'")
    if args.patience is not None and args.patience < 1:
        parser.error("--patience must be >= 1")
    for flag in ("lr", "momentum", "weight_decay", "min_delta"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    if args.epochs < 0 or args.batch_size < 1:
        parser.error("--epochs must be >= 0 and --batch-size >= 1")


def print_summary(model, out):
    rows = [("input", f"(None, {model.layer_sizes[0]})", 0)]
    for i, (fan_in, fan_out) in enumerate(zip(model.layer_sizes[:-1], model.layer_sizes[1:])):
        kind = model.activation if i < len(model.layer_sizes) - 2 else "softmax"
        rows.append((f"dense_{i + 1} ({kind})", f"(None, {fan_out})", fan_in * fan_out + fan_out))
    out.write(f'Model: "{"-".join(map(str, model.layer_sizes))}" ({model.dtype.name})\n')
    out.write(f"{'Layer (activation)':<24}{'Output Shape':<16}{'Param #':>10}\n")
    for name, shape, count in rows:
        out.write(f"{name:<24}{shape:<16}{count:>10,}\n")
    out.write(f"Total params: {model.n_params:,}\n")


def write_history(history, path):
    keys = [k for k in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_time")
            if k in history.history]
    rows = [dict(epoch=e + 1, **{k: history.history[k][i] for k in keys})
            for i, e in enumerate(history.epoch)]
    if path.lower().endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["epoch"] + keys)
            writer.writeheader()
            writer.writerows(rows)


def plot_history(history, path):
    """The lesson's two figures: accuracy and loss per epoch, train and test."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [e + 1 for e in history.epoch]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((acc, "accuracy", "Accuracy"), (loss, "loss", "Loss")):
        axis.plot(epochs, history.history[key], marker="o", label="train")
        if f"val_{key}" in history.history:
            axis.plot(epochs, history.history[f"val_{key}"], marker="o", label="test")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.legend()
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    comm = None
    if args.distributed:
        try:
            comm = distributed.world()
        except ImportError as exc:
            parser.error(f"--distributed: {exc}")
    leader = comm is None or comm.rank == 0
    # with MPI, rank 0 alone prints and writes files
    out = sys.stdout if leader else open(os.devnull, "w")
    # SIGTERM stops training like Ctrl-C: at a consistent point, saved.
    previous_term = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    model = None
    try:
        x_train, y_train, x_test, y_test = load_data(args, comm)
        if args.evaluate:
            model = load_model(args.evaluate)
            loss, accuracy = model.evaluate(x_test, y_test)
            out.write(f"{args.evaluate}: test loss {loss:.4f} - test accuracy {accuracy:.4f}\n")
            return 0
        model = make_model(args, x_train, y_train, y_test, comm)
        epochs = args.epochs - model.training_state.epoch if args.resume else args.epochs
        if args.resume and epochs <= 0:
            raise UsageError(f"{args.resume} has trained {model.training_state.epoch} epochs "
                             f"already; --epochs is the total to reach, ask for more")
        print_summary(model, out)
        if comm is not None:
            out.write(f"Distributed over {comm.size} MPI ranks: {args.batch_size} rows per step "
                      f"in all\n")
        started = time.perf_counter()
        history = fit(model, x_train, y_train, epochs=epochs, batch_size=args.batch_size,
                      **optimizer_settings(args, model), shuffle=not args.no_shuffle,
                      sampling=args.sampling,
                      validation_data=(x_test, y_test), threads=args.threads,
                      seed=None if args.resume else args.seed,
                      patience=args.patience, monitor=args.monitor, min_delta=args.min_delta,
                      restore_best_weights=not args.no_restore_best,
                      callbacks=callbacks(args, model, out) if leader else (), comm=comm)
        elapsed = time.perf_counter() - started - history.compile_time
        if not leader:
            return 0
        loss, accuracy = model.evaluate(x_test, y_test)
        trained = sum(history.history["epoch_time"])
        out.write(f"Test loss: {loss:.4f} - test accuracy: {accuracy:.4f}\n")
        if history.epoch:
            out.write(f"Trained {len(history.epoch)} epochs in {elapsed:.2f}s "
                      f"({len(history.epoch) / trained:.2f} epochs/s in the training loop)\n")
        if comm is not None and history.allreduce_steps:
            per_step = history.allreduce_time / history.allreduce_steps
            out.write(f"Allreduce: {per_step * 1e6:.0f}us per step, "
                      f"{history.allreduce_time / trained:.0%} of the training loop\n")
        if history.stopped_epoch is not None:
            out.write(f"Early stopping after epoch {history.stopped_epoch + 1}: no "
                      f"{args.monitor} improvement for {args.patience} epochs")
            out.write(f"; restored epoch {history.best_epoch + 1}\n" if not args.no_restore_best
                      else "\n")
        if args.history:
            write_history(history, args.history)
        if args.plot:
            plot_history(history, args.plot)
        if args.save:
            model.save(args.save)
            out.write(f"Saved {args.save}\n")
        return 0
    except TrainingDiverged as exc:  # every MPI rank stops at the same step
        saved = ""
        if args.save and leader:
            model.save(args.save)
            saved = f" (saved the last finite parameters to {args.save})"
        if leader:
            sys.stderr.write(f"fastmlp-train: error: {exc}{saved}\n")
        return 2
    except KeyboardInterrupt as exc:
        if not leader:
            pass
        elif model is not None and args.save:  # outside fit's steps the model is consistent
            model.save(args.save)
            sys.stderr.write(f"\nInterrupted; saved {args.save} (resume with --resume {args.save})\n")
        else:
            sys.stderr.write("\nInterrupted\n")
        # TrainingInterrupted stops every MPI rank at the same step; any
        # other interrupt may have hit one rank only
        return 130 if isinstance(exc, TrainingInterrupted) else abort_ranks(comm, 130)
    except (UsageError, ValueError, OSError) as exc:
        rank = f"rank {comm.rank}: " if comm is not None and comm.size > 1 else ""
        sys.stderr.write(f"fastmlp-train: error: {rank}{exc}\n")
        return abort_ranks(comm, 2)
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def abort_ranks(comm, code):
    """Returns code; with other MPI ranks, which may be waiting for this one
    in a collective call, ends them all first (MPI_Abort)."""
    if comm is not None and comm.size > 1:
        sys.stderr.flush()
        comm.Abort(code)
    return code


def load_data(args, comm):
    """The dataset; with MPI, rank 0 loads (and downloads) it first, so that
    ranks sharing a file system find it in the cache."""
    def load():
        return datasets.load(args.dataset, data_dir=args.data_dir, download=not args.no_download)

    if comm is None:
        return load()
    data = load() if comm.rank == 0 else None
    comm.Barrier()
    return data if comm.rank == 0 else load()


class Checkpointer(Callback):
    """Writes the model to path after every `every` epochs (atomically)."""

    def __init__(self, model, path, every):
        self.model, self.path, self.every = model, path, every

    def on_epoch_end(self, epoch, n_steps, epoch_time, logs):
        if (epoch + 1) % self.every == 0:
            self.model.save(self.path)


def callbacks(args, model, out):
    chosen = [] if args.quiet else [ProgressPrinter(out)]
    if args.checkpoint_every:
        chosen.append(Checkpointer(model, args.save, args.checkpoint_every))
    return chosen


def optimizer_settings(args, model):
    """fit's optimizer keywords: the flags given, else (with --resume) the
    file's, else the defaults (SGD at the lesson's 0.1)."""
    settings = dict(OPTIMIZER_DEFAULTS)
    saved = model.optimizer_state
    if saved is not None and args.optimizer in (None, saved.name):
        settings.update(optimizer=saved.name, lr=saved.settings[0], momentum=saved.settings[1],
                        nesterov=saved.settings[2], weight_decay=saved.settings[3])
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["lr"] is None and settings["optimizer"] == "sgd":
        settings["lr"] = 0.1
    return settings


def make_model(args, x_train, y_train, y_test, comm=None):
    """A new model shaped by the flags and the data, or the resumed one (the
    data must then fit it: fit checks). With MPI, rank 0 reads the file and
    sends its bytes to the others."""
    if args.resume:
        if comm is None:
            model = load_model(args.resume)
        else:
            data = None
            if comm.rank == 0:
                with open(args.resume, "rb") as f:
                    data = f.read()
            model = load_model_bytes(comm.bcast(data, root=0), args.resume)
        if model.training_state is None:
            from .training import TrainingState
            model.training_state = TrainingState(args.seed)
        return model
    settings = {key: getattr(args, key) if getattr(args, key) is not None else default
                for key, default in ARCHITECTURE_DEFAULTS.items()}
    n_classes = max(2, int(max(y_train.max(), y_test.max())) + 1)
    sizes = [x_train.shape[1]] + parse_hidden(settings["hidden"]) + [n_classes]
    return MLP(sizes, activation=settings["activation"], dtype=settings["dtype"],
               init=settings["init"], init_scale=settings["init_scale"], seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
