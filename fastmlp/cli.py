"""fastmlp-train: train, evaluate and resume MLPs from the terminal."""
import argparse
import difflib
import math
import os
import re
import signal
import sys
import time

import numpy as np

from . import __version__, datasets, distributed, jit, sources, tabular
from .model import MLP
from .modelfile import load as load_model, loads as load_model_bytes
from .heads import HEADS, VALUE_HEADS
from .kernels import ACTIVATIONS
from .optimizers import DEFAULT_LR, OPTIMIZERS
from .schedules import Cosine, Plateau, Step
from .progress import PREDICT_COMPILE_NOTICE, Callback, ProgressPrinter
from .validation import check_dtype
from .training import (MONITORS, SAMPLINGS, TrainingDiverged, TrainingInterrupted,
                       balanced_class_weights, fit, monitors)

EXAMPLES = """examples:
  fastmlp-train                                   the classic lesson: MNIST, 784-50-10 sigmoid, SGD 0.1, batch 100
  fastmlp-train --dataset fashion-mnist --plot curves.png --history history.csv
  fastmlp-train --hidden 256,128 --activation relu --init he --optimizer adam --epochs 20
  fastmlp-train --data train.csv --target species --save model.safetensors   (your own table)
  fastmlp-predict model.safetensors new.csv -o predictions.csv
  fastmlp-train --dataset fashion-mnist --epochs 5 --save model.safetensors --onnx model.onnx
  fastmlp-train --resume model.safetensors --epochs 10 --save model.safetensors   (epochs 6 to 10)
  fastmlp-train --evaluate model.safetensors             (on the data it was trained on)
  fastmlp-train --epochs 50 --save model.safetensors --checkpoint-every 5
  fastmlp-train --convert old.fmlp model.safetensors     (a model file of fastmlp 0.1)
  mpiexec -n 4 fastmlp-train --distributed --hidden 512,512 --activation relu --batch-size 128
  fastmlp-train --compile-only                    compile the kernels once, so later runs start at once

exit codes: 0 success, 2 usage error or bad input, 130 interrupted (after --save)
"""
# Architecture flags: defaults apply to a new model; with --resume the file decides.
ARCHITECTURE_DEFAULTS = {"hidden": "50", "activation": "sigmoid", "dtype": "float32",
                         "init": "normal", "init_scale": 0.01, "output": "softmax"}
OPTIMIZER_DEFAULTS = {"optimizer": "sgd", "lr": None, "momentum": 0.9, "nesterov": False,
                      "weight_decay": 0.0}
RUN_DEFAULTS = {"epochs": 10, "batch_size": 100}
# Where the lesson's settings learn nothing (digits' 1,437 rows give too few
# steps) or suit tables badly, a new model gets these instead, and the run's
# summary says so. Flags that are given always win.
DATA_DEFAULTS = {
    "digits": {"init": "xavier", "optimizer": "adam", "lr": 0.01, "batch_size": 32},
    "files": {"init": "xavier", "optimizer": "adam", "lr": 0.01, "batch_size": 32},
}
KIND_NAMES = {"files": "your data"}
DEFAULT_DATASET = "mnist"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it has none or its help states it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default: " in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """Bad flags or input: one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (--data is never --dataset), whose
    errors are one line, with a suggestion for a mistyped flag."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        match = re.match(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("-"):
            flag = match.group(1).split("=")[0]
            close = difflib.get_close_matches(flag, self._option_string_actions, n=1)
            if close:
                message = f"unrecognized argument {flag}; did you mean {close[0]}?"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = Parser(
        prog="fastmlp-train", description="Train a multi-layer perceptron with fastmlp on "
        "MNIST-style images or on your own table (CSV, NumPy, Parquet, Excel): model summary, "
        "Keras-style progress, test accuracy, optional history, plot and model file.",
        epilog=EXAMPLES, formatter_class=lambda prog: HelpFormatter(prog, width=100))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    data = parser.add_argument_group(
        "data (with --resume or --evaluate, the data recorded in the model unless given)")
    data.add_argument("--dataset", choices=datasets.NAMES, help="downloaded when not found "
                      "locally (digits ships with scikit-learn) (default: mnist)")
    data.add_argument("--data-dir", help="look for the dataset's four IDX files only here "
                      "(and in its subdirectory named after the dataset)")
    data.add_argument("--no-download", action="store_true", help="never download")
    data.add_argument("--data", metavar="FILE", help="train on your own table: .csv or .tsv "
                      "(with a header line; also .gz, .bz2, .xz; a .csv delimited by commas, "
                      "semicolons, tabs or |), .npz (arrays X and y), .npy, .parquet or .xlsx; "
                      "numeric features are standardized, columns of text one-hot encoded, "
                      "and labels may be numbers, strings or one-hot columns")
    data.add_argument("--target", help="--data's label column (default: 'target' or 'label' "
                      "if there is one, else the last column; for .npy, a column index)")
    data.add_argument("--ignore", metavar="COLUMNS", help="--data columns that are no "
                      "features (identifiers, names, free text), comma separated")
    data.add_argument("--test", metavar="FILE", help="a test table like --data, to report on")
    data.add_argument("--validation-split", type=float, metavar="FRACTION",
                      help="with --data and no --test, the share of rows held out to report "
                      "on (default: 0.1)")
    data.add_argument("--missing", choices=tabular.MISSING, help="what to do with empty or "
                      "NaN feature cells in --data: error, drop their rows, or fill in the "
                      "column's mean (default: error)")
    model = parser.add_argument_group("model (taken from the file with --resume)")
    model.add_argument("--hidden", help="hidden layer widths, comma separated ('' for none) "
                       f"(default: {ARCHITECTURE_DEFAULTS['hidden']})")
    model.add_argument("--activation", choices=list(ACTIVATIONS),
                       help="of the hidden layers; identity makes the network linear "
                       f"(default: {ARCHITECTURE_DEFAULTS['activation']})")
    model.add_argument("--dtype", choices=["float32", "float64", "bfloat16"],
                       help="bfloat16: float32 weights and updates, products of values "
                       "rounded to bfloat16 (emulated in float32: bfloat16's results, "
                       "float32's speed) "
                       f"(default: {ARCHITECTURE_DEFAULTS['dtype']})")
    model.add_argument("--init", choices=["normal", "xavier", "he"],
                       help=f"(default: {ARCHITECTURE_DEFAULTS['init']}; xavier for digits "
                       "and --data)")
    model.add_argument("--init-scale", type=float,
                       help=f"std of --init normal (default: {ARCHITECTURE_DEFAULTS['init_scale']})")
    model.add_argument("--output", choices=sorted(HEADS), help="softmax: classes; linear: "
                       "regression (mean squared error, one or more numeric --target "
                       "columns); sigmoid: multi-label (0/1 --target columns, comma "
                       "separated); poisson: counts or rates >= 0 (Poisson deviance, "
                       "predicting exp of the last layer) (default: softmax)")
    train = parser.add_argument_group("training")
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                       help=f"(default: {OPTIMIZER_DEFAULTS['optimizer']}; adam for digits and "
                       "--data; with --resume, the file's)")
    train.add_argument("--lr", type=float, help="learning rate (default: 0.1 for sgd, as in the "
                       f"lesson; {DEFAULT_LR['momentum']} for momentum; {DEFAULT_LR['adam']} "
                       "for adam, 0.01 for digits and --data; with --resume, the file's)")
    train.add_argument("--lr-schedule", choices=["constant", "step", "cosine", "plateau"],
                       help="constant; step: times --lr-factor every --lr-step-every "
                       "epochs; cosine: per step down to --lr-min over the run's --epochs; "
                       "plateau: times --lr-factor (not below --lr-min) once --monitor has not "
                       "improved for --lr-patience epochs, as Keras's ReduceLROnPlateau "
                       "(default: constant; with --resume, the file's)")
    train.add_argument("--lr-factor", "--lr-step-factor", dest="lr_step_factor", type=float,
                       default=0.1, metavar="FACTOR", help="for --lr-schedule step and plateau")
    train.add_argument("--lr-step-every", type=int, default=10, metavar="EPOCHS",
                       help="for --lr-schedule step")
    train.add_argument("--lr-patience", type=int, default=10, metavar="EPOCHS",
                       help="for --lr-schedule plateau")
    train.add_argument("--lr-min", type=float, default=0.0, metavar="LR",
                       help="for --lr-schedule cosine and plateau")
    train.add_argument("--momentum", type=float,
                       help=f"(default: {OPTIMIZER_DEFAULTS['momentum']}; with --resume, the file's)")
    train.add_argument("--nesterov", action="store_const", const=True,
                       help="Nesterov momentum (with --resume, the file's)")
    train.add_argument("--weight-decay", type=float, help="L2 on weights "
                       f"(default: {OPTIMIZER_DEFAULTS['weight_decay']}; with --resume, the file's)")
    train.add_argument("--class-weight", choices=["balanced", "none"],
                       help="balanced: each row weighs n / (classes x its class's rows) in "
                       "the loss, so that every class counts alike whatever its share of the "
                       "rows (default: none; with --resume, the file's)")
    train.add_argument("--epochs", type=int, help="epochs to train; with --resume, the total "
                       f"to reach (default: {RUN_DEFAULTS['epochs']})")
    train.add_argument("--batch-size", type=int, help="rows per step (default: "
                       f"{RUN_DEFAULTS['batch_size']}; 32 for digits and --data)")
    train.add_argument("--sampling", default="epoch", choices=SAMPLINGS,
                       help="epoch: a permutation per epoch; replacement: rows drawn with replacement")
    train.add_argument("--no-shuffle", action="store_true", help="take rows in order")
    train.add_argument("--seed", type=int, default=0,
                       help="initialisation, shuffling and --validation-split seed")
    train.add_argument("--threads", type=int, help="threads (default: the fastest in a short "
                       "probe of all cores and the powers of two below; with --distributed, "
                       "the cores each rank has to itself)")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training over MPI: start with mpiexec -n N; each "
                       "rank trains its shard of every batch (--batch-size is the global "
                       "batch) and rank 0 alone prints and writes files (needs "
                       "pip install 'fastmlp[mpi]')")
    train.add_argument("--patience", type=int, help="early stopping: stop after this many "
                       "epochs without improvement of --monitor (default: off)")
    train.add_argument("--monitor", choices=MONITORS,
                       help="the metric --patience and --lr-schedule plateau watch, on the "
                       "training rows or (val_*) on the test or held-out rows; accuracy for "
                       "classes, r2 for --output linear or poisson (default: val_loss, or loss "
                       "with no rows to report on)")
    train.add_argument("--min-delta", type=float, default=0.0,
                       help="for --patience: the least change that counts as an improvement")
    train.add_argument("--no-restore-best", action="store_true",
                       help="keep the last epoch's parameters, not the best epoch's")
    out = parser.add_argument_group("output")
    out.add_argument("--history", metavar="FILE", help="per-epoch metrics as .csv or .json")
    out.add_argument("--plot", metavar="FILE.png",
                     help="accuracy and loss curves (needs matplotlib: pip install 'fastmlp[plot]')")
    out.add_argument("--save", metavar="FILE", help="write the trained model as safetensors "
                     "(also on Ctrl-C, SIGTERM or divergence)")
    out.add_argument("--onnx", metavar="FILE", help="also write the model as an ONNX graph "
                     "that takes raw rows as the data files hold them (pixel values 0-255, "
                     "or your columns, scaled in the graph) and answers in the target's "
                     "units (needs pip install 'fastmlp[onnx]')")
    out.add_argument("--convert", nargs=2, metavar=("OLD", "NEW"),
                     help="rewrite a model file of fastmlp 0.1 (.fmlp) as safetensors, and exit")
    out.add_argument("--checkpoint-every", metavar="N", type=int,
                     help="also write --save every N epochs, atomically, to resume from")
    out.add_argument("--resume", metavar="FILE", help="continue training a saved model")
    out.add_argument("--evaluate", metavar="FILE",
                     help="only report the test loss and accuracy of a saved model")
    out.add_argument("--compile-only", action="store_true", help="compile the kernels for this "
                     "CPU into Numba's cache and exit (the first run otherwise does it)")
    out.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    return parser


def parse_hidden(text):
    if not text.strip():
        return []
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--hidden takes comma-separated integers, got {text!r}") from None
    if any(width < 1 for width in widths):
        raise UsageError(f"--hidden widths must be >= 1, got {text!r}")
    return widths


def check_args(parser, args):
    if args.convert and (args.evaluate or args.resume or args.save or args.compile_only):
        parser.error("--convert OLD NEW only rewrites a model file")
    if args.onnx:
        try:
            import onnx  # noqa: F401  (only whether it is there)
        except ImportError:
            parser.error("--onnx needs onnx: pip install 'fastmlp[onnx]'")
    if args.evaluate and (args.resume or args.save or args.distributed):
        parser.error("--evaluate only reads a model: it takes no --resume, --save or "
                     "--distributed")
    if args.resume:
        given = [f"--{key.replace('_', '-')}" for key in ARCHITECTURE_DEFAULTS
                 if getattr(args, key) is not None]
        if given:
            parser.error(f"{', '.join(given)} cannot change a resumed model (the file decides)")
    if args.hidden is not None:
        try:
            parse_hidden(args.hidden)
        except UsageError as exc:
            parser.error(str(exc))
    if args.class_weight == "balanced" and args.output not in (None, "softmax"):
        parser.error("--class-weight balanced weighs classes: it goes with --output softmax")
    if args.output not in (None, "softmax") and not args.data:
        parser.error(f"--output {args.output} needs your own numeric targets: --data FILE")
    if args.lr_step_factor <= 0 or args.lr_step_every < 1 or args.lr_min < 0 \
            or args.lr_patience < 1:
        parser.error("--lr-factor must be > 0, --lr-step-every and --lr-patience >= 1, "
                     "--lr-min >= 0")
    if args.lr_schedule == "plateau" and args.lr_step_factor >= 1:
        parser.error("--lr-schedule plateau lowers the rate: --lr-factor must be < 1")
    if args.data and (args.dataset or args.data_dir):
        parser.error("--data is your own file: it takes no --dataset or --data-dir")
    for flag in ("target", "ignore", "test", "validation_split", "missing"):
        if getattr(args, flag) is not None and not args.data:
            parser.error(f"--{flag.replace('_', '-')} goes with --data FILE")
    if args.test and args.validation_split is not None:
        parser.error("--test and --validation-split both say what to report on: give one")
    if args.validation_split is not None and not 0 <= args.validation_split < 1:
        parser.error("--validation-split must be >= 0 and < 1")
    if args.checkpoint_every is not None and (args.checkpoint_every < 1 or not args.save):
        parser.error("--checkpoint-every N needs N >= 1 and --save FILE")
    if args.history and os.path.splitext(args.history)[1].lower() not in (".csv", ".json"):
        parser.error("--history FILE must end in .csv or .json")
    for flag in ("save", "onnx", "history", "plot"):
        path = getattr(args, flag)
        directory = os.path.dirname(os.path.abspath(path)) if path else None
        if path and not os.path.isdir(directory):
            parser.error(f"--{flag} {path}: there is no directory {directory}")
        if path and not os.access(directory, os.W_OK):
            parser.error(f"--{flag} {path}: the directory {directory} is not writable")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (whether it is there at all)
            from matplotlib.backend_bases import FigureCanvasBase
            formats = FigureCanvasBase.get_supported_filetypes()
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fastmlp[plot]'")
        kind = os.path.splitext(args.plot)[1][1:].lower()
        if kind and kind not in formats:
            parser.error(f"--plot {args.plot}: .{kind} is not a format matplotlib writes; it "
                         f"writes .{', .'.join(sorted(formats))}")
    if args.patience is not None and args.patience < 1:
        parser.error("--patience must be >= 1")
    if args.monitor is not None and args.patience is None and args.lr_schedule != "plateau":
        parser.error("--monitor says what --patience or --lr-schedule plateau watch: it goes "
                     "with one of them")
    if args.min_delta != 0.0 and args.patience is None:
        parser.error("--min-delta is for early stopping: it goes with --patience N")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    for flag in ("lr", "momentum", "weight_decay", "min_delta"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    if (args.epochs is not None and args.epochs < 0) or (args.batch_size is not None
                                                         and args.batch_size < 1):
        parser.error("--epochs must be >= 0 and --batch-size >= 1")


def plot_history(history, path, held_out="test"):
    """--plot: History.plot without a screen, its rows named as reported."""
    import matplotlib
    matplotlib.use("Agg")
    history.plot(path, held_out)


def main(argv=None):
    if argv is None:  # run as fastmlp-train: a process of its own
        jit.numba_without_scipy_linalg()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.compile_only:
        return compile_only(args)
    if args.convert:
        return convert(*args.convert)
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
        saved = read_model(args, comm)
        source, note = choose_source(args, saved)
        kind = data_kind(source)
        precision = saved.precision if saved is not None else args.dtype or "float32"
        output = saved.output if saved is not None else args.output or "softmax"
        data = load_data(args, source, saved, check_dtype(precision, bfloat16=True), output,
                         comm)
        if saved is None and args.output is None and kind == "files":
            check_labels_are_classes(data)
        if note:
            out.write(note + "\n")
        if args.evaluate:
            evaluate(saved, data, args.evaluate, out)
            if args.onnx:
                saved.to_onnx(args.onnx, preprocessing=True)
                out.write(f"Wrote {args.onnx}\n")
            return 0
        chosen = apply_defaults(args, kind, saved)
        model = saved if saved is not None else new_model(args, data)
        model.source, model.preprocessing = data.source, data.preprocessing
        if model.training_state is None:
            from .state import TrainingState
            model.training_state = TrainingState(args.seed)
        epochs = args.epochs - model.training_state.epoch if args.resume else args.epochs
        if args.resume and epochs <= 0:
            raise UsageError(f"{args.resume} has trained {plural(model.training_state.epoch, 'epoch')} "
                             f"already; --epochs is the total to reach, ask for more")
        weights = row_weights(args, model, data)
        announce(args, model, data, kind, chosen, comm, out)
        validation = (data.x_test, data.y_test) if data.x_test is not None else None
        args.monitor = args.monitor or ("val_loss" if validation else "loss")
        watching = args.patience or args.lr_schedule == "plateau"
        if watching and args.monitor not in monitors(model.metric):
            raise UsageError(f"--monitor {args.monitor} is not a metric of this model: its "
                             f"output is {model.output}, whose metric is {model.metric}")
        if watching and args.monitor.startswith("val_") and validation is None:
            raise UsageError(f"--monitor {args.monitor} watches held-out rows, and there are "
                             "none: give --test FILE or --validation-split > 0, or --monitor "
                             f"{args.monitor[4:]}")
        settings = optimizer_settings(args, model)
        started = time.perf_counter()
        history = fit(model, data.x_train, data.y_train, epochs=epochs,
                      batch_size=args.batch_size, **settings, shuffle=not args.no_shuffle,
                      sampling=args.sampling, validation_data=validation, threads=args.threads,
                      seed=None if args.resume else args.seed,
                      patience=args.patience, monitor=args.monitor, min_delta=args.min_delta,
                      restore_best_weights=not args.no_restore_best, sample_weight=weights,
                      callbacks=callbacks(args, model, out) if leader else (), comm=comm)
        elapsed = time.perf_counter() - started - history.compile_time
        if leader:
            report(args, model, data, history, settings, elapsed, comm, out)
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
        if leader and isinstance(exc, TrainingInterrupted) and exc.history.epoch:
            write_curves(args, exc.history, data.held_out)  # the epochs completed
        # TrainingInterrupted stops every MPI rank at the same step; any
        # other interrupt may have hit one rank only
        return 130 if isinstance(exc, TrainingInterrupted) else abort_ranks(comm, 130)
    except (UsageError, ValueError, OSError) as exc:
        rank = f"rank {comm.rank}: " if comm is not None and comm.size > 1 else ""
        message = str(exc)
        if isinstance(exc, datasets.DatasetNotFound):
            message += available_datasets()
        sys.stderr.write(f"fastmlp-train: error: {rank}{message}\n")
        return abort_ranks(comm, 2)
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def announce(args, model, data, kind, chosen, comm, out):
    """Before training: the model, its data and the settings chosen for
    that kind of data; with MPI, once every rank is ready."""
    out.write(model.summary())
    out.write(f"Data: {data.description}\n")
    if chosen:
        out.write(f"Settings for {KIND_NAMES.get(kind, kind)}: {' '.join(chosen)} "
                  "(flags override them)\n")
    if model.source.get("class_weight") == "balanced":
        out.write(f"Class weights (balanced): {class_weights_text(model, data)}\n")
    if comm is not None:
        comm.Barrier()  # every rank has its data and model: training starts
        out.write(f"Distributed over {comm.size} MPI ranks: {args.batch_size} rows per step "
                  f"in all\n")


def report(args, model, data, history, settings, elapsed, comm, out):
    """After training, on rank 0: the held-out figures, the speed, early
    stopping and any warning, then the files asked for."""
    if data.x_test is not None:
        loss, score = model.evaluate(data.x_test, data.y_test)
        on = data.held_out
        rmse = target_rmse(model, data.x_test, data.y_test)
        balanced = balanced_accuracy(model, data.x_test, data.y_test)
        out.write(f"{on.capitalize()} loss: {loss:.4f} - {on} {model.metric}: {score:.4f}"
                  + (f" - {on} RMSE: {rmse}" if rmse else "")
                  + (f" - {on} balanced accuracy: {balanced:.4f}" if balanced else "") + "\n")
    trained = sum(history.history["epoch_time"])
    if history.epoch:
        out.write(f"Trained {plural(len(history.epoch), 'epoch')} in {elapsed:.2f}s "
                  f"({len(history.epoch) / trained:.2f} epochs/s in the training loop)\n")
    if comm is not None and history.allreduce_steps:
        per_step = history.allreduce_time / history.allreduce_steps
        out.write(f"Allreduce: {per_step * 1e6:.0f}us per step, "
                  f"{history.allreduce_time / trained:.0%} of the training loop\n")
    if history.stopped_epoch is not None:
        out.write(f"Early stopping after epoch {history.stopped_epoch + 1}: no "
                  f"{args.monitor} improvement for {plural(args.patience, 'epoch')}")
        out.write(f"; restored epoch {history.best_epoch + 1}\n" if not args.no_restore_best
                  else "\n")
    schedule = model.optimizer_state.schedule
    if isinstance(schedule, Plateau) and schedule.scale != 1.0:
        rates = history.history["lr"]
        steps = [f"{rates[i]:.4g} from epoch {history.epoch[i] + 1}"
                 for i in range(1, len(rates)) if rates[i] != rates[i - 1]]
        following = schedule.epoch_lr(settings["lr"], None)
        if rates and following != rates[-1]:
            steps.append(f"{following:.4g} for the next epoch")
        if steps:
            out.write(f"Learning rate lowered on plateaus of {schedule.monitor} "
                      f"({plural(schedule.patience, 'epoch')} without improvement): "
                      f"{', '.join(steps)}\n")
    warning = training_trouble(history, model, settings)
    if warning:
        sys.stderr.write(f"fastmlp-train: warning: {warning}\n")
    if args.save:  # the model first: nothing after it can lose it
        model.save(args.save)
        out.write(f"Saved {args.save}\n")
    if args.onnx:
        model.to_onnx(args.onnx, preprocessing=True)
        out.write(f"Wrote {args.onnx}\n")
    write_curves(args, history, data.held_out)


def write_curves(args, history, held_out):
    """--history and --plot, of the epochs history holds."""
    if args.history:
        history.save(args.history)
    if args.plot:
        plot_history(history, args.plot, held_out)


def convert(old, new):
    """Rewrites a model file (of either format) as safetensors."""
    try:
        load_model(old).save(new)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"fastmlp-train: error: {exc}\n")
        return 2
    print(f"Wrote {new} (safetensors) from {old}")
    return 0


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "s")


def chance_level(model):
    """(loss, what it is) of a model that learnt nothing: guessing every class
    alike (log K; log 2 per label), or predicting the mean of standardized
    targets (1); (inf, None) for targets of unknown scale."""
    if model.output in VALUE_HEADS:
        if sources.output_scaling(model) is not None:
            return 1.0, "the loss of predicting the mean, 1 on standardized targets"
        return math.inf, None
    n_classes = model.n_outputs if model.output == "softmax" else 2
    return math.log(n_classes), f"chance level (log {n_classes} = {math.log(n_classes):.4f})"


def training_trouble(history, model, settings):
    """A warning when the training loss went the wrong way: an epoch ending
    above this run's first epoch, or above chance level (chance_level) after
    the model's first epoch. None when training looks sane."""
    losses = history.history["loss"]
    chance, chance_name = chance_level(model)
    worse = [e for e, loss in zip(history.epoch[1:], losses[1:]) if loss > losses[0]]
    guessing = [e for e, loss in zip(history.epoch, losses) if e >= 1 and loss > chance]
    if not worse and not guessing:
        return None
    epoch = min(worse + guessing)
    what = (f"ended above the first epoch's ({losses[0]:.4f})" if epoch in worse
            else f"is above {chance_name}")
    loss = losses[history.epoch.index(epoch)]
    return (f"the training loss after epoch {epoch + 1} ({loss:.4f}) {what}: training is "
            f"not converging. Try a smaller learning rate than {settings['optimizer']} "
            f"--lr {settings['lr']:g}.")


def compile_only(args):
    """Compiles (or loads from the cache) the kernels the common runs need:
    8-bit images and float tables into a model of --dtype."""
    import numpy as np

    from .model import MLP
    precision = args.dtype or "float32"
    started = time.perf_counter()
    for x in (np.zeros((4, 3), np.uint8), np.zeros((4, 3), check_dtype(precision, True))):
        model = MLP([3, 2, 2], dtype=precision)
        fit(model, x, np.array([0, 1, 0, 1]), epochs=1, batch_size=2,
            callbacks=[ProgressPrinter(sys.stdout, epochs=False)])
        model.evaluate(x, np.array([0, 1, 0, 1]))
    print(f"Kernels ready for this CPU ({precision}): {time.perf_counter() - started:.1f}s")
    return 0


def abort_ranks(comm, code):
    """Returns code; with other MPI ranks, which may be waiting for this one
    in a collective call, ends them all first (MPI_Abort)."""
    if comm is not None and comm.size > 1:
        sys.stderr.flush()
        sys.stdout.flush()
        # MPICH's launcher forwards a rank's output while the rank lives:
        # aborting at once lost the error message now and then (the exit
        # code came through, stderr empty; once in a full test run)
        time.sleep(ABORT_GRACE_SECONDS)
        comm.Abort(code)
    return code


ABORT_GRACE_SECONDS = 0.5


def read_model(args, comm):
    """The model of --evaluate or --resume, or None. With MPI, rank 0 reads
    the file and sends its bytes to the others."""
    path = args.evaluate or args.resume
    if path is None:
        return None
    if comm is None:
        return load_model(path)
    data = None
    if comm.rank == 0:
        with open(path, "rb") as f:
            data = f.read()
    return load_model_bytes(comm.bcast(data, root=0), path)


def choose_source(args, saved):
    """(source, note): the data the flags name, else those the model file
    records, else MNIST; the note tells the user when that is not plain."""
    recorded = saved.source if saved is not None else None
    path = args.evaluate or args.resume
    if args.data:
        split = args.validation_split if args.validation_split is not None else 0.1
        source = sources.files_source(args.data, args.target, args.test, split, args.seed,
                                      args.missing or "error", args.ignore)
    elif args.dataset:
        source = sources.dataset_source(args.dataset, args.data_dir)
    elif recorded is not None and "dataset" in recorded and args.data_dir:
        source = sources.dataset_source(recorded["dataset"], args.data_dir)
    elif recorded is not None:
        return recorded, None
    else:
        source = sources.dataset_source(DEFAULT_DATASET, args.data_dir)
        if saved is not None:
            return source, (f"{path} records no training data (an older file); using "
                            f"--dataset {DEFAULT_DATASET}")
        return source, None
    if recorded is not None and sources.describe(source) != sources.describe(recorded):
        return source, (f"Using {sources.describe(source)}, not the data {path} was trained on "
                        f"({sources.describe(recorded)})")
    return source, None


def check_labels_are_classes(data):
    """A numeric target of many thin classes (over 20, under 5 rows each on
    average) is more likely a quantity: the softmax output, the default,
    then needs saying."""
    classes = data.preprocessing["classes"]
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in classes)
    rows = len(data.y_train) + (len(data.y_test) if data.y_test is not None else 0)
    if numeric and len(classes) > 20 and rows < 5 * len(classes):
        raise UsageError(
            f"{data.source['data']}: the target {data.preprocessing['target']!r} holds "
            f"{len(classes)} different numbers in {rows} rows, more like a quantity than classes: "
            f"--output linear fits it as numbers, --output softmax trains {len(classes)} "
            "classes anyway")


def data_kind(source):
    return "files" if "data" in source else source["dataset"]


def load_data(args, source, saved, dtype, output, comm):
    """The run's Data; with MPI, rank 0 loads (and downloads) them first, so
    that ranks sharing a file system find them in the cache."""
    recorded = saved is not None and source is saved.source
    preprocessing = saved.preprocessing if saved is not None and "data" in source else None

    def load():
        return sources.load(source, preprocessing, download=not args.no_download,
                            check_files=recorded, dtype=dtype, output=output)

    if comm is None:
        return load()
    data = load() if comm.rank == 0 else None
    comm.Barrier()
    return data if comm.rank == 0 else load()


def available_datasets():
    """Lines naming the datasets this machine has right now, with their commands."""
    found = datasets.available()
    width = max((len(name) for name, _ in found), default=0)
    lines = [f"  fastmlp-train --dataset {name:<{width}}   ({where})" for name, where in found]
    if not lines:
        return ""
    return "\navailable now:\n" + "\n".join(lines)


def evaluate(model, data, path, out):
    x, y, on = data.x_test, data.y_test, data.held_out
    if x is None:
        x, y, on = data.x_train, data.y_train, "training"
    if not model.prediction_ready():
        out.write(f"{PREDICT_COMPILE_NOTICE}...\n")
    loss, score = model.evaluate(x, y)
    rmse = target_rmse(model, x, y)
    balanced = balanced_accuracy(model, x, y)
    out.write(f"{path}: {on} loss {loss:.4f} - {on} {model.metric} {score:.4f} "
              + (f"- {on} RMSE {rmse} " if rmse else "")
              + (f"- {on} balanced accuracy {balanced:.4f} " if balanced else "")
              + f"({len(y)} {on} rows of {data.name})\n")


def balanced_accuracy(model, x, y):
    """The mean over the classes in y of the share of their rows predicted
    right, for a model trained with --class-weight balanced (whose plain
    accuracy a common class dominates); None for other models."""
    if (model.source or {}).get("class_weight") != "balanced":
        return None
    predicted = model.predict(x)
    return float(np.mean([np.mean(predicted[y == c] == c) for c in np.unique(y)]))


def target_rmse(model, x, y):
    """The root mean squared error of each target in its own units, as
    "name value, ...", for a linear model trained on standardized targets
    (whose loss is on that scale); None for other models."""
    scaling = sources.output_scaling(model)
    if scaling is None:
        return None
    errors = model.predict(x).reshape(len(x), -1) - np.reshape(y, (len(y), -1))
    rmse = np.sqrt(np.mean(errors ** 2, axis=0)) * np.array(scaling[1])
    names = model.preprocessing["target"].split(",")
    return ", ".join(f"{name} {value:.6g}" for name, value in zip(names, rmse))


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


def row_weights(args, model, data):
    """fit's sample_weight for --class-weight (or, resuming, the file's
    choice, which the model then records): None, or each row's weight of
    its class (training.balanced_class_weights)."""
    choice = args.class_weight or model.source.get("class_weight") or "none"
    model.source = {key: value for key, value in model.source.items() if key != "class_weight"}
    if choice == "none":
        return None
    if model.output != "softmax":
        raise UsageError(f"--class-weight {choice} weighs classes: this model's output is "
                         f"{model.output}")
    model.source["class_weight"] = choice
    return balanced_class_weights(data.y_train, model.n_outputs)[data.y_train]


def class_weights_text(model, data):
    """'setosa 0.98, versicolor 1.02, ...': the classes' weights, 10 at most."""
    weights = balanced_class_weights(data.y_train, model.n_outputs)
    classes = (model.preprocessing or {}).get("classes") or list(range(model.n_outputs))
    parts = [f"{classes[c]} {weights[c]:.3g}" for c in np.flatnonzero(weights)]
    return ", ".join(parts[:10]) + (", ..." if len(parts) > 10 else "")


def apply_defaults(args, kind, saved):
    """Fills the flags left unset: a resumed model's batch size, the data's
    own settings (for a new model), then the lesson's. Returns the data's
    settings it used, as flags."""
    resumed = saved is not None
    if resumed and args.batch_size is None and saved.training_state is not None:
        args.batch_size = saved.training_state.batch_size
    chosen = []
    own_optimizer = args.optimizer is not None  # then its own default lr
    for key, value in DATA_DEFAULTS.get(kind, {}).items():
        new_only = key != "batch_size"  # a resumed model keeps its own
        if key == "lr" and own_optimizer:
            continue
        if getattr(args, key) is None and not (resumed and new_only):
            setattr(args, key, value)
            chosen.append(f"--{key.replace('_', '-')} {value}")
    for key, value in RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    if settings["lr"] is None:
        settings["lr"] = 0.1 if settings["optimizer"] == "sgd" else DEFAULT_LR[settings["optimizer"]]
    settings["lr_schedule"] = args.lr_schedule  # None: the file's, if any
    if args.lr_schedule == "step":
        settings["lr_schedule"] = Step(args.lr_step_factor, args.lr_step_every)
    elif args.lr_schedule == "cosine":
        settings["lr_schedule"] = Cosine(max(args.epochs, 1), args.lr_min)
    elif args.lr_schedule == "plateau":
        settings["lr_schedule"] = Plateau(args.lr_step_factor, args.lr_patience, args.monitor,
                                          cooldown=0, min_lr=args.lr_min)
    return settings


def new_model(args, data):
    """A new model shaped by the flags and the data."""
    settings = {key: getattr(args, key) if getattr(args, key) is not None else default
                for key, default in ARCHITECTURE_DEFAULTS.items()}
    if settings["output"] != "softmax":
        n_outputs = 1 if data.y_train.ndim == 1 else data.y_train.shape[1]
    elif data.preprocessing is not None:
        n_outputs = len(data.preprocessing["classes"])
    else:
        labels = [data.y_train] + ([data.y_test] if data.y_test is not None else [])
        n_outputs = max(2, max(int(y.max()) for y in labels) + 1)
    sizes = [data.x_train.shape[1]] + parse_hidden(settings["hidden"]) + [n_outputs]
    return MLP(sizes, activation=settings["activation"], dtype=settings["dtype"],
               init=settings["init"], init_scale=settings["init_scale"], seed=args.seed,
               output=settings["output"])


if __name__ == "__main__":
    sys.exit(main())
