"""The command lines: `python -m pneumo COMMAND` and the `pneumo-COMMAND` scripts, one parser and one
body per command, the same code under both names.

Exit codes, for scheduled jobs: 0 done; 2 a problem with the input (config, paths, images, arguments),
explained in one line on stderr; 3 the checkpoint cannot be used; 4 finished, but some files could
not be scored (pneumo-predict); 5 another run holds the output or run directory; 6 finished, but more
of the files scored than --fail-on-ood allows are out of the model's scope (pneumo-predict); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM); 1 a bug, with a traceback. Heavy modules (torch) are imported
inside the command bodies, so a bad argument or config is reported before paying for them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import yaml

from pneumo import __version__
from pneumo.core.config import load_config, to_dict
from pneumo.core.errors import PneumoError
from pneumo.core.fileio import require_apart
from pneumo.core.logs import log, logging_to, setup_logging
from pneumo.core.process import Terminated, idle_threads_sleep, sigterm_raises, tune_allocator
from pneumo.cpu import environment_setting

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_SOME_BAD, EXIT_OUT_OF_SCOPE = 0, 1, 2, 4, 6
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


@dataclass(frozen=True)
class Command:
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    epilog: str = ""
    # Keep freed memory in the process (`tune_allocator`): it pays where large activations are freed and
    # allocated again and again, as in training steps.
    keeps_freed_memory: bool = True


# --- pneumo train


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML experiment file, e.g. configs/quickstart.yaml")
    _set_option(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from this model's weights (sets train.init_from)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (overrides applied) and exit")


def _train(args) -> int | None:
    cfg = load_config(args.config, [*args.set, *([f"train.init_from={args.init}"] if args.init else [])])
    if args.print_config:
        return _print_yaml(to_dict(cfg))
    idle_threads_sleep()  # before torch loads
    from pneumo.train.run import train

    train(cfg, resume=args.resume)
    return None


# --- pneumo evaluate


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _checkpoint_option(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    _set_option(p)
    p.add_argument(
        "--out", help="folder for metrics.json, predictions.csv and the report (required unless --print-config)"
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "numpy"],
        help="torch, or the from-scratch NumPy network (float64, CPU, slower; same results)",
    )
    p.add_argument(
        "--bootstrap", type=RESAMPLES, default=1000, metavar="N", help="resamples for the 95%% intervals (0: none)"
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the bootstrap")
    p.add_argument(
        "--explain",
        type=whole(0, 10_000),
        default=0,
        metavar="N",
        help="Grad-CAM overlays for the N most confident errors",
    )
    p.add_argument(
        "--explain-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a Grad-CAM overlay for this image (repeatable)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the checkpoint's config (overrides applied) and exit"
    )


def _evaluate(args) -> int | None:
    if not args.out and not args.print_config:
        raise PneumoError("--out is required: the folder for metrics.json, predictions.csv and the report")
    from pneumo.evaluate.evaluation import EvalOptions, evaluate
    from pneumo.evaluate.metrics import format_table
    from pneumo.model.checkpoint import TrainedModel

    model = TrainedModel.load(_checkpoint(args), args.set)
    if args.print_config:
        return _print_yaml(to_dict(model.config))
    options = EvalOptions(args.backend, args.bootstrap, args.seed, args.explain, args.explain_file)
    metrics = evaluate(model, args.split, args.out, options)
    print(f"{args.split} split, {model.path}:")
    print(format_table(metrics))
    return None


# --- pneumo predict


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or CSV lists of paths"
    )
    _checkpoint_option(p, "a best.pt written by pneumo-train or pneumo-calibrate, or an export")
    p.add_argument("--out", required=True, help="the CSV to write or extend")
    p.add_argument(
        "--batch-size",
        type=whole(1, 4096),
        default=32,
        help="images scored at a time (bounds memory; files are decoded 8 batches at a time)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--log-file", help="also append the log lines to this file")
    p.add_argument(
        "--shard",
        default="1/1",
        metavar="K/N",
        help="score only the K-th of N shares of the inputs (by a hash of each path), for N jobs on N machines",
    )
    p.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="allow --checkpoint to be an exported TorchScript file (TorchScript is code: only files you trust)",
    )
    p.add_argument(
        "--fail-on-ood",
        type=share,
        metavar="FRACTION",
        help="exit 6 when more than this share of the files scored is out of the model's scope (ood = 1)",
    )


def _predict(args) -> int:
    idle_threads_sleep()  # before torch loads, as for training
    from pneumo.score.predict import InferenceModel, PredictOptions, Shard, run_predict

    fail_on_ood = args.fail_on_ood
    options = PredictOptions(args.batch_size, args.device, Shard.parse(args.shard))
    model = InferenceModel.load(_checkpoint(args), trust_torchscript=args.trust_torchscript)
    if fail_on_ood is not None and model.applicability is None:
        raise PneumoError(
            "--fail-on-ood: this model carries no applicability check (an export, or an older checkpoint)"
        )
    summary = run_predict(model, args.inputs, args.out, options)
    log.info("%s", summary.line(args.out))  # the log file gets the summary too
    print(f"pneumo-predict: {summary.line(args.out)}")
    if fail_on_ood is not None and summary.out_of_scope_share > fail_on_ood:
        return EXIT_OUT_OF_SCOPE
    return EXIT_SOME_BAD if summary.bad else EXIT_OK


# --- pneumo export


def _export_arguments(p: argparse.ArgumentParser) -> None:
    _checkpoint_option(p)
    p.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    p.add_argument("--out", required=True, help="the file to write (.pt for TorchScript, .onnx)")


def _export(args) -> None:
    from pneumo.model.checkpoint import TrainedModel
    from pneumo.score.export import export

    diff = export(TrainedModel.load(_checkpoint(args)), args.format, args.out)
    checked = f"largest difference from the checkpoint {diff:.1e}" if diff == diff else "not checked (no onnxruntime)"
    print(f"pneumo-export: wrote {args.out} ({args.format}); {checked}")


# --- pneumo calibrate


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "labelled",
        nargs="+",
        metavar="LABELLED",
        help="a folder with NORMAL/ and PNEUMONIA/ subfolders, or a CSV manifest path,label[,patient_id]",
    )
    _checkpoint_option(p)
    p.add_argument("--out", required=True, help="the calibrated checkpoint to write (the input is left as it is)")
    p.add_argument(
        "--method", default="platt", choices=["platt", "temperature"], help="how logits map to probabilities"
    )
    p.add_argument(
        "--adapt",
        default="auto",
        choices=["auto", "recalibrate", "fine-tune"],
        help="auto (default): whichever cross-validates best over the sample's patients",
    )
    p.add_argument(
        "--folds", type=whole(2, 100), default=5, metavar="K", help="cross-validation folds (whole patients)"
    )
    p.add_argument(
        "--steps", type=whole(1, 1_000_000), metavar="N", help="fine-tuning: optimizer steps (default: the recipe's)"
    )
    p.add_argument(
        "--bootstrap", type=RESAMPLES, default=1000, metavar="N", help="patient-level resamples for the 95%% intervals"
    )
    p.add_argument("--seed", type=SEED, default=0, help="seed of the folds, the fine-tuning and the bootstrap")
    _set_option(p)


def _calibrate(args) -> None:
    idle_threads_sleep()  # before torch loads, as for training
    from pneumo.model.checkpoint import TrainedModel, save_checkpoint
    from pneumo.site.adapt import Options, adapt, load_sample
    from pneumo.site.finetune import Recipe

    recipe = Recipe() if args.steps is None else Recipe(steps=args.steps)
    options = Options(args.method, args.adapt, args.folds, recipe, args.bootstrap, args.seed)
    model = TrainedModel.load(_checkpoint(args), args.set)
    sample = load_sample(args.labelled, model.config.data.image_size, model.config.data.max_pixels)
    require_apart({"--out": args.out}, {f"the sample's image {p}": p for p in sample.paths})
    result = adapt(model, sample, options)
    save_checkpoint(args.out, result.model.payload())
    print(adaptation_table(result, sample))
    if result.out_of_scope is not None:
        print(f"out of the model's scope (applicability check): {100 * result.out_of_scope:.1f}% of the sample")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(
        f"pneumo-calibrate: kept {result.kept}; wrote {args.out} (threshold {result.model.threshold:.4f}); "
        f"{model.path} is unchanged"
    )


def adaptation_table(result, sample) -> str:
    """The sample's figures with the model as it was and, cross-validated, with each candidate."""
    n_normal, n_pneumonia = int((sample.labels == 0).sum()), int(sample.labels.sum())
    head = (
        f"sample: {len(sample.labels)} images ({n_pneumonia} pneumonia, {n_normal} normal, "
        f"{len(set(sample.patients))} patients); 95% intervals over {result.before.get('bootstrap_unit', 'images')}"
    )
    columns = [("before", result.before)]
    columns += [(f"{name}, cross-validated", m) for name, m in result.cross_validated.items()]
    lines = [head, f"{'':12s}" + "".join(f"{name:>30s}" for name, _ in columns)]
    for key in ("auc", "accuracy", "sensitivity", "specificity", "ece", "threshold"):
        cells = []
        for _, m in columns:
            ci = m.get("ci95", {}).get(key)
            cells.append(f"{m[key]:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
        lines.append(f"{key:12s}" + "".join(f"{c:>30s}" for c in cells))
    return "\n".join(lines)


# --- pneumo download


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size", type=int, action="append", choices=[28, 64, 128, 224], help="image size (repeatable; default 224)"
    )
    p.add_argument("--out", default="data/medmnist", help="folder for the .npz files")
    p.add_argument("--base-url", help="a mirror of MedMNIST's Zenodo files (default: Zenodo)")


def _download(args) -> None:
    from pneumo.data.download import MEDMNIST_BASE_URL, download_pneumoniamnist

    for path in download_pneumoniamnist(args.size or [224], args.out, args.base_url or MEDMNIST_BASE_URL):
        print(path)


COMMANDS = {
    "train": Command("Train the pneumonia classifier as a config file says.", _train_arguments, _train),
    "evaluate": Command("Evaluate a trained model on one data split.", _evaluate_arguments, _evaluate),
    "predict": Command(
        "Score chest X-rays into a CSV (path, probability, label, model, error). Re-running skips "
        "files already scored.",
        _predict_arguments,
        _predict,
        "exit codes: 0 all scored; 2 bad arguments or inputs; 3 unusable checkpoint; 4 some files could not be scored "
        "(see the error column); 5 another run is writing OUT; 130 interrupted; 143 terminated",
        # Scoring with Winograd's convolutions ran as fast without, and its memory stays further below 1 GB.
        keeps_freed_memory=False,
    ),
    "calibrate": Command(
        "Adapt a trained model to a site from a labelled sample of its images: recalibrate it or fine-tune it, "
        "whichever cross-validates better over the sample's patients, and write a new checkpoint.",
        _calibrate_arguments,
        _calibrate,
    ),
    "export": Command(
        "Export a trained model to TorchScript or ONNX; the file is kept only if its outputs match "
        "the checkpoint within 1e-5.",
        _export_arguments,
        _export,
    ),
    "download": Command(
        "Download PneumoniaMNIST (MedMNIST, CC BY 4.0), md5-verified; an interrupted download resumes.",
        _download_arguments,
        _download,
    ),
}


def main(argv: list[str] | None = None) -> int:
    """`python -m pneumo COMMAND ...`"""
    parser = argparse.ArgumentParser(prog="pneumo", description="Chest X-ray pneumonia classifier pipeline.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.description, **_parser_style(command)))
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    return run_command(f"pneumo {args.command}", command.run, args, command.keeps_freed_memory)


def command_main(name: str, argv: list[str] | None = None) -> int:
    """`pneumo-NAME ...`: the same command as `python -m pneumo NAME ...`."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"pneumo-{name}", **_parser_style(command))
    command.add_arguments(parser)
    return run_command(parser.prog, command.run, parser.parse_args(argv), command.keeps_freed_memory)


def train_main(argv: list[str] | None = None) -> int:
    return command_main("train", argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    return command_main("evaluate", argv)


def predict_main(argv: list[str] | None = None) -> int:
    return command_main("predict", argv)


def calibrate_main(argv: list[str] | None = None) -> int:
    return command_main("calibrate", argv)


def export_main(argv: list[str] | None = None) -> int:
    return command_main("export", argv)


def download_main(argv: list[str] | None = None) -> int:
    return command_main("download", argv)


def run_command(prog: str, body, args, keeps_freed_memory: bool = True) -> int:
    """Call `body(args)`; its return value (None: 0) is the exit code, and user errors become one line
    and a documented code. `keeps_freed_memory`: see `Command`."""
    setup_logging()
    if keeps_freed_memory:
        tune_allocator()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # odd file names must not break a message
    log_file = None  # the log file once it is known to be none of the inputs: only then is it written
    stdout, sys.stdout = sys.stdout, ReaderMayLeave(sys.stdout)
    try:
        environment_setting()  # a bad PNEUMO_CPU_KERNELS stops the command before any work
        require_apart(*_named_files(args))  # before the log file is opened: it may be one of the inputs
        log_file = getattr(args, "log_file", None)
        with sigterm_raises(), _log_file(prog, log_file):
            return body(args) or EXIT_OK
    except PneumoError as e:
        return _fail(prog, str(e), e.exit_code, log_file)
    except OSError as e:
        # Disk full, permissions, a vanished folder: the environment, not a bug; say which file.
        message = f"{e.strerror or e} ({e.filename})" if e.filename else str(e)
        return _fail(prog, message, EXIT_INPUT, log_file)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        sys.stdout = stdout


def _named_files(args) -> tuple[dict, dict]:
    """(outputs, inputs) that the command line names, by option, for `require_apart`."""
    outputs = {"--out": getattr(args, "out", None), "--log-file": getattr(args, "log_file", None)}
    inputs = {}
    for option in ("--checkpoint", "--explain-file", "--config"):
        value = getattr(args, option[2:].replace("-", "_"), None)
        for path in value if isinstance(value, list) else [value]:
            inputs[f"{option} {path}" if isinstance(value, list) else option] = path
    for path in [*getattr(args, "inputs", []), *getattr(args, "labelled", [])]:
        inputs[f"the input {path}"] = path
    return outputs, inputs


class ReaderMayLeave:
    """Standard output that goes quiet, without an error, once its reader has gone (`| head`, `| true`):
    a command's work and exit code do not depend on whether anyone reads its summary."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._quiet()

    def _quiet(self) -> None:
        # The stream's descriptor now points at /dev/null, so later writes, and the interpreter's last
        # flush of the restored sys.stdout at exit, succeed there (as Python's notes on SIGPIPE advise).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _log_file(prog: str, path: str | None):
    if path is None:
        return logging_to(None)
    try:
        open(path, "a").close()
    except OSError as e:
        raise PneumoError(f"--log-file {path} cannot be written ({e.strerror})") from None
    return logging_to(path)


def _fail(prog: str, message: str, code: int, log_file: str | None) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    if log_file:  # jobs that read only their log file see why the run failed
        try:
            with open(log_file, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {message}\n")
        except OSError:
            pass  # already said on stderr
    return code


def _parser_style(command: Command) -> dict:
    return {
        "description": command.description,
        "epilog": command.epilog or None,
        "formatter_class": argparse.ArgumentDefaultsHelpFormatter,
    }


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def whole(lo: int, hi: int):
    """An argparse type: a whole number of ASCII digits from `lo` to `hi`. A value out of range is
    argparse's one-line error and exit code 2, before any work."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"-?[0-9]{1,12}", text.strip()) or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"expected a whole number from {lo} to {hi}, got {text[:40]!r}")
        return int(text)

    return parse


def share(text: str) -> float:
    """An argparse type: a share from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text[:40]!r}")
    return value


SEED = whole(0, 2**32 - 1)  # numpy's and torch's seeds are unsigned 32-bit numbers
RESAMPLES = whole(0, 1_000_000)


def _checkpoint_option(
    p: argparse.ArgumentParser, what: str = "a checkpoint written by pneumo-train or pneumo-calibrate"
) -> None:
    p.add_argument("--checkpoint", help=f"{what} (default: the bundled Kermany model)")


def _checkpoint(args):
    from pneumo.model.checkpoint import bundled_checkpoint

    return args.checkpoint or bundled_checkpoint()


def _print_yaml(raw: dict) -> int:
    print(yaml.safe_dump(raw, sort_keys=False), end="")
    return EXIT_OK


def version_line() -> str:
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"pneumo {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"
