"""Command lines `pneumo-train`, `pneumo-evaluate`, `pneumo-predict`, `pneumo-download`: parse, load
the config, call the library.

Exit codes, for scheduled jobs: 0 done; 2 a problem with the input (config, paths, images,
checkpoint, arguments), explained in one line on stderr; 130 interrupted; 1 a bug (with traceback).
pneumo-predict refines these: 3 the checkpoint cannot be used, 4 finished but some files could not
be scored (listed in the output with the reason), 5 another run is writing the same output.
"""

from __future__ import annotations

import argparse
import sys
import time

from pneumo.config import load_config
from pneumo.errors import CheckpointError, OutputLocked, PneumoError
from pneumo.progress import setup_logging

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CHECKPOINT, EXIT_SOME_BAD, EXIT_LOCKED = 3, 4, 5


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pneumo-train", description="Train the pneumonia classifier as a config file says.")
    parser.add_argument("--config", required=True, help="YAML experiment file, e.g. configs/quickstart.yaml")
    add_set_option(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    args = parser.parse_args(argv)

    def run():
        cfg = load_config(args.config, args.set)
        # torch takes seconds to import: a bad config is reported before paying for it.
        from pneumo.training import train

        train(cfg, resume=args.resume)

    return run_command(parser.prog, run)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pneumo-evaluate", description="Evaluate a trained checkpoint on one data split.")
    parser.add_argument("--checkpoint", help="a best.pt or last.pt written by pneumo-train (default: the bundled Kermany model)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default: test)")
    add_set_option(parser)
    parser.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    parser.add_argument(
        "--backend", default="torch", choices=["torch", "numpy"],
        help="torch (default), or the from-scratch NumPy network (float64, CPU, slower; same results)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="resamples for the 95%% intervals (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--explain", type=int, default=0, metavar="N", help="Grad-CAM overlays for the N most confident errors")
    parser.add_argument("--explain-file", action="append", default=[], metavar="PATH", help="a Grad-CAM overlay for this image (repeatable)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be 0 or more")

    def run():
        from pneumo.evaluation import evaluate
        from pneumo.metrics import format_table

        checkpoint = args.checkpoint or _bundled()
        metrics = evaluate(
            checkpoint, args.out, args.split, args.set, args.backend, args.bootstrap, args.seed, args.explain, args.explain_file
        )
        print(f"{args.split} split, {checkpoint}:")
        print(format_table(metrics))

    return run_command(parser.prog, run)


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumo-predict",
        description="Score chest X-rays into a CSV (path, probability, label, model, error). Re-running skips files already scored.",
        epilog="exit codes: 0 all scored; 2 bad arguments or inputs; 3 unusable checkpoint; "
        "4 some files could not be scored (see the error column); 5 another run is writing OUT; 130 interrupted",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or CSV lists of paths")
    parser.add_argument("--checkpoint", help="a best.pt written by pneumo-train, or an export (default: the bundled Kermany model)")
    parser.add_argument("--out", required=True, help="the CSV to write or extend")
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded and scored at a time (bounds memory)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--log-file", help="also append the log lines to this file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    def run():
        from pneumo.predict import run_predict

        from pneumo.progress import log

        summary = run_predict(args.checkpoint or _bundled(), args.inputs, args.out, args.batch_size, args.device)
        log.info("%s", summary.line(args.out))  # the log file gets the summary too
        print(f"pneumo-predict: {summary.line(args.out)}")
        return EXIT_SOME_BAD if summary.bad else EXIT_OK

    return run_command(parser.prog, run, log_file=args.log_file)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumo-export",
        description="Export a checkpoint to TorchScript or ONNX; the file is kept only if its outputs match the checkpoint within 1e-5.",
    )
    parser.add_argument("--checkpoint", help="a checkpoint written by pneumo-train (default: the bundled Kermany model)")
    parser.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    parser.add_argument("--out", required=True, help="the file to write (.pt for TorchScript, .onnx)")
    args = parser.parse_args(argv)

    def run():
        from pneumo.export import export

        diff = export(args.checkpoint or _bundled(), args.format, args.out)
        checked = f"largest difference from the checkpoint {diff:.1e}" if diff == diff else "not checked (no onnxruntime)"
        print(f"pneumo-export: wrote {args.out} ({args.format}); {checked}")

    return run_command(parser.prog, run)


def download_main(argv: list[str] | None = None) -> int:
    from pneumo.data.download import MEDMNIST_BASE_URL, PNEUMONIAMNIST

    parser = argparse.ArgumentParser(
        prog="pneumo-download",
        description="Download PneumoniaMNIST (MedMNIST, CC BY 4.0) from Zenodo, md5-verified; an interrupted download resumes.",
    )
    parser.add_argument("--size", type=int, action="append", choices=sorted(PNEUMONIAMNIST), help="image size (repeatable; default 224)")
    parser.add_argument("--out", default="data/medmnist", help="folder for the .npz files (default: data/medmnist)")
    parser.add_argument("--base-url", default=MEDMNIST_BASE_URL, help="a mirror of MedMNIST's Zenodo files")
    args = parser.parse_args(argv)

    def run():
        from pneumo.data.download import download_pneumoniamnist

        for path in download_pneumoniamnist(args.size or [224], args.out, args.base_url):
            print(path)

    return run_command(parser.prog, run)


def _bundled():
    from pneumo.checkpoint import bundled_checkpoint

    return bundled_checkpoint()


def _exit_code(error: PneumoError) -> int:
    return EXIT_CHECKPOINT if isinstance(error, CheckpointError) else EXIT_LOCKED if isinstance(error, OutputLocked) else EXIT_INPUT


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3 (repeatable)",
    )


def run_command(prog: str, body, log_file: str | None = None) -> int:
    """Call `body`; its return value (None: 0) is the exit code, and user errors become one line and a code."""
    setup_logging(log_file)
    try:
        return body() or EXIT_OK
    except PneumoError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        if log_file:  # jobs that read only their log file see why the run failed
            with open(log_file, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {e}\n")
        return _exit_code(e)
    except OSError as e:
        # Disk full, permissions, a vanished folder: the environment, not a bug; say which file.
        print(f"{prog}: error: {e.strerror or e} ({e.filename})" if e.filename else f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
