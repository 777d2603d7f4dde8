"""The ``nvclip-fast`` command line (``nvclip-fast COMMAND --help`` shows each command with examples)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _C, __version__, build_info, cache, extras, metadata, server
from .collection_cli import add_collection_parsers
from .commands import PROG, add_command, add_model_options, encoder_loader, examples, help_text
from .embed_files import (
    CHECKPOINT_ROWS,
    DTYPES,
    check_inputs,
    check_job_output,
    classify_files,
    embed_files,
    write_predictions,
)
from .outputs import Checkpoint, check_output_path
from .probe import LinearProbe
from .ray import DEFAULT_PARTITION_IMAGES  # the ray extra is imported only when a job uses it

# Exit codes of `nvclip-fast export` (argparse itself exits 2 on malformed arguments).
EXIT_OK = 0
EXIT_ERROR = 1  # the export failed (bad weights, unknown model, download impossible, export error)
EXIT_USAGE = 2  # refused: no weights given (or several), an unusable weights file, or no export extra
EXIT_NO_TENSORRT = 3  # ONNX files and sidecar written, TensorRT engines not built
EXIT_PARITY = 4  # an exported tower misses the parity gate (files kept for inspection)
# `nvclip-fast embed` / `classify` / `embed-text`: 0 every input embedded, 1 some failed (the rest
# still written), 2 the job could not run (bad arguments, no model); 130 interrupted (Ctrl-C), as
# shells report SIGINT.
EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130
# Why a job could not run: bad arguments or files (ValueError, OSError), a missing extra
# (ImportError), and the runtime's and exporter's own errors (EngineError, ExportError, a tokenizer or
# pretrained weights not to be had offline, ...: all RuntimeErrors).
JOB_ERRORS = (ValueError, OSError, ImportError, RuntimeError)

DESCRIPTION = help_text(
    "CLIP embeddings of images and text, with exactly open_clip's numbers: NVIDIA's NVCLIP and any "
    "open_clip model, on TensorRT (GPU) or ONNX Runtime (GPU or CPU).",
    "A model is an exported bundle (nvclip-fast export) or a model name with its weights: the bundle is "
    "then built once into the cache and reused.",
)
EXAMPLES = examples(
    "nvclip-fast embed ./photos -m ViT-B-32 --pretrained laion2b_s34b_b79k -o photos.parquet",
    'nvclip-fast classify ./photos -m ViT-B-32 --pretrained laion2b_s34b_b79k --labels "cat,dog,car"',
    'nvclip-fast embed-text "a photo of a cat" @prompts.txt -m ViT-B-32 --pretrained laion2b_s34b_b79k '
    "-o texts.parquet",
    "nvclip-fast models ViT-B",
)


def _fail(command: str, error: BaseException | str, code: int = EXIT_USAGE) -> int:
    print(f"{PROG} {command}: error: {error}", file=sys.stderr)
    return code


# --- info, models, cache --------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    info = build_info()
    info["version"] = __version__
    info["cuda_devices"] = _C.cuda_device_count()
    if info["cuda_devices"] == 0:
        info["cuda_unavailable"] = _C.cuda_unavailable_reason()
    info["cache"] = str(cache.cache_dir())
    print(json.dumps(info, indent=2))
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    try:
        from .models import NVCLIP_WEIGHTS, architectures
    except ImportError as e:
        return _fail("models", extras.missing_extra(extras.EXPORT, "listing the models", e))
    found = architectures(args.contains or "")
    if not found:
        return _fail("models", f"no model name contains {args.contains!r}")
    width = max(len(a.name) for a in found)
    print(f"{'MODEL':<{width}}  {'DIM':>5}  {'SIZE':>4}  PRETRAINED")
    for a in found:
        tags = f"NVCLIP: {NVCLIP_WEIGHTS}" if a.nvclip else ", ".join(a.pretrained) or "-"
        print(f"{a.name:<{width}}  {a.embed_dim:>5}  {a.image_size:>4}  {tags}")
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    root = cache.cache_dir()
    if args.action == "clear":
        removed = cache.clear(args.name)
        what = f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
        print(f"removed {what}{f' of {args.name}' if args.name else ''} from {root}")
        return EXIT_OK
    found = cache.entries()
    print(f"{root}: {len(found)} entr{'y' if len(found) == 1 else 'ies'}")
    for entry in found:
        print(f"{entry.size() / (1 << 20):9.1f} MiB  {entry.describe()}\n               {entry.path}")
    return EXIT_OK


# --- export ---------------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        # The exporter pulls in torch, open_clip and onnx (the export extra), which no other command needs.
        from .exporter import ExportError, ParityError, bundle_paths, export
        from .models import (
            CheckpointError,
            PretrainedUnavailableError,
            TokenizerUnavailableError,
            WeightsRequiredError,
        )
        from .trt_build import TensorRTBuildError, TensorRTUnavailableError
    except ImportError as e:
        return _fail("export", extras.missing_extra(extras.EXPORT, "exporting", e))

    try:
        export(
            args.model,
            args.output,
            weights=args.weights,
            pretrained=args.pretrained,
            random_weights=args.random_weights,
            image_size=args.image_size,
            precision=args.precision,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            text=args.text,
            verify=args.verify,
            timing_cache=args.timing_cache,
            version_compatible=args.version_compatible,
        )
    except WeightsRequiredError as e:
        return _fail("export", f"{e}. Refusing to export random embeddings by accident.", EXIT_USAGE)
    except CheckpointError as e:  # the weights file is unreadable or does not fit the model
        return _fail("export", e, EXIT_USAGE)
    except TensorRTUnavailableError as e:
        paths = bundle_paths(args.output)
        print(
            f"{PROG} export: error: {e}\nThe ONNX files and {paths.sidecar} were written; build the "
            "engines where TensorRT runs with:",
            file=sys.stderr,
        )
        for command in e.commands:
            print(shlex.join(command))
        stem = paths.directory / paths.stem
        plans = " and ".join(p.name for t, p in paths.plan.items() if t == "image" or args.text)
        print(
            f"Next: on this machine, embed with the ONNX towers (ONNX Runtime): "
            f"{PROG} embed PHOTOS -m {stem}; or run the commands above where TensorRT is installed "
            f"(they write {plans} beside "
            f"{paths.sidecar.name}), then: {PROG} embed PHOTOS -m {args.output}",
            file=sys.stderr,
        )
        return EXIT_NO_TENSORRT
    except ParityError as e:
        return _fail("export", e, EXIT_PARITY)
    # ValueError covers bad arguments and the models' UnknownModelError / CheckpointError.
    except (
        ValueError,
        FileNotFoundError,
        PretrainedUnavailableError,
        TokenizerUnavailableError,
        ExportError,
        TensorRTBuildError,
    ) as e:
        return _fail("export", e, EXIT_ERROR)
    print(bundle_paths(args.output).sidecar)
    return EXIT_OK


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        help="open_clip weights -> ONNX towers (+ TensorRT plans) + sidecar, checked against open_clip",
        description=[
            "Export an open_clip (or NVCLIP) model's image and text towers to ONNX and, for a .plan output, "
            "TensorRT engines; write the metadata sidecar; check the outputs against open_clip. Needs the "
            "export extra (torch, open_clip, onnx). The text tower needs its tokenizer from local files "
            "(a Hugging Face tokenizer in the local Hugging Face cache), which are saved into the bundle; "
            "--no-text exports the image tower alone.",
            f"Exit codes: {EXIT_OK} ok, {EXIT_ERROR} failed, {EXIT_USAGE} no weights, an unusable weights "
            f"file or no export extra, {EXIT_NO_TENSORRT} ONNX written but no TensorRT (the trtexec "
            f"commands are printed), {EXIT_PARITY} parity gate failed.",
        ],
        example_lines=[
            "nvclip-fast export ViT-B-32 --pretrained laion2b_s34b_b79k -o vitb32.onnx",
            "nvclip-fast export ViT-H-14-SigLIP-CLIPA-224 --weights nvclip_vith.ckpt --precision fp16 "
            "-o vith.plan",
            "nvclip-fast embed ./photos -m vith -o photos.parquet   # then: the bundle by its stem",
        ],
    )
    p.add_argument(
        "model", help="open_clip model name (e.g. ViT-H-14) or NVCLIP name (e.g. ViT-H-14-SigLIP-CLIPA-224)"
    )
    p.add_argument(
        "-o", "--output", required=True, help="OUT.onnx (ONNX + sidecar) or OUT.plan (also TensorRT engines)"
    )
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="FILE", help="checkpoint: .pt/.pth/.bin/.ckpt/.safetensors")
    weights.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (downloaded)")
    weights.add_argument(
        "--random-weights", action="store_true", help="seeded random weights (the same every time): for tests"
    )
    p.add_argument("--image-size", type=int, metavar="N", help="image size (default: the checkpoint's)")
    p.add_argument("--precision", choices=metadata.PRECISIONS, default="fp32", help="(default fp32)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=metadata.DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"largest batch of the engines ({metadata.DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--opt-batch", type=int, metavar="N", help="batch TensorRT tunes for (default: --max-batch)"
    )
    p.add_argument("--no-text", dest="text", action="store_false", help="export the image tower only")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    p.add_argument(
        "--timing-cache", metavar="FILE", help="TensorRT timing cache, read if present and updated"
    )
    p.add_argument(
        "--version-compatible",
        action="store_true",
        help="build plans that later TensorRT versions (same major) and the lean/dispatch runtimes run",
    )
    p.set_defaults(run=_cmd_export)


# --- the jobs: embed, classify, embed-text --------------------------------------------------------


def _engine(encoder: Any) -> str:
    return f"{encoder.model} on {encoder.engine} {encoder.precision}, {encoder.device}"


def _cmd_embed(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _cmd_embed_ray(args)
    try:
        # Before a model is opened (perhaps exported) for nothing.
        check_job_output(args.output, resume=args.resume, overwrite=args.overwrite)
        check_inputs(args.inputs)
        load = encoder_loader(args, text=None, max_batch=args.batch)
        with load() as encoder:
            summary = embed_files(
                args.inputs,
                encoder,
                args.output,
                batch=args.batch,
                workers=args.workers,
                dtype=args.dtype,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=False if args.no_progress else None,
                checkpoint_rows=args.checkpoint_rows,
            )
    except KeyboardInterrupt:
        checkpoint = Checkpoint(Path(args.output))
        saved = checkpoint.rows() if checkpoint.exists() else 0
        print(
            f"{PROG} embed: interrupted; the output was not written; {saved} finished rows are saved in "
            f"{checkpoint.dir} (rerun with --resume to finish)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except JOB_ERRORS as e:
        return _fail("embed", e)
    print(f"{summary.line()} ({_engine(encoder)})", file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _cmd_embed_ray(args: argparse.Namespace) -> int:
    from . import ray

    try:
        if args.workers is not None:
            raise ValueError(
                "--workers is for the in-process embed: with --ray, each actor decodes on its --threads"
            )
        ray.check_ray_output(args.output, resume=args.resume, overwrite=args.overwrite)
        if not (args.pretrained or args.weights or args.random_weights):
            args.model = os.path.abspath(args.model)  # the actors' working directory is not this one
        if args.weights:
            args.weights = os.path.abspath(args.weights)
        cpus = args.threads or 1
        summary = ray.embed_with_ray(
            args.inputs,
            encoder_loader(args, text=None, max_batch=args.batch, threads=cpus),
            args.output,
            address=args.ray or None,
            batch_size=max(ray.DEFAULT_BATCH_SIZE, args.batch or 0),
            actors=args.actors,
            num_gpus=args.gpus_per_actor,
            num_cpus=cpus,
            device=args.device,  # the loader opens the model on it; device cpu: no GPU for the actors
            dtype=args.dtype,
            partition_images=args.partition_images,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except KeyboardInterrupt:
        print(
            f"{PROG} embed: interrupted; the partitions written so far are kept in {args.output} (rerun "
            "with --resume to finish)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except ray.job_errors() as e:  # a worker's error, wrapped by Ray with its traceback
        return _fail("embed", f"on Ray: {ray.error_line(e)}")
    except JOB_ERRORS as e:
        return _fail("embed", e)
    print(f"{summary.line()} (Ray)", file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _labels(text: str) -> list[str]:
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"labels file {text[1:]!r} is not UTF-8 text: {e}") from e
    return [label.strip() for label in text.split(",") if label.strip()]


def _cmd_classify(args: argparse.Namespace) -> int:
    try:
        labels = _labels(args.labels) if args.labels else None
        probe = LinearProbe.load(args.probe) if args.probe else None
        check_inputs(args.inputs)
        load = encoder_loader(args, text=probe is None, max_batch=args.batch)
        with load() as encoder:
            predictions, summary = classify_files(
                args.inputs,
                encoder,
                labels,
                templates=args.template,
                top_k=args.top_k,
                batch=args.batch,
                workers=args.workers,
                progress=False if args.no_progress else None,
                probe=probe,
            )
        if args.output:
            write_predictions(args.output, predictions)
    except KeyboardInterrupt:
        print(f"{PROG} classify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JOB_ERRORS as e:
        return _fail("classify", e)
    if not args.output:
        for p in predictions:
            shown = (
                p.error
                if p.error
                else ", ".join(f"{label} {prob:.4f}" for label, prob in zip(p.labels, p.probs, strict=True))
            )
            print(f"{p.id}\t{shown}")
    print(f"{summary.line()} ({_engine(encoder)})", file=sys.stderr)
    return EXIT_OK if summary.ok else EXIT_SOME_FAILED


def _cmd_embed_text(args: argparse.Namespace) -> int:
    from .embed_text import embed_texts, read_texts

    try:
        texts = read_texts(args.texts)
        check_output_path(args.output)
        with encoder_loader(args, text=True)() as encoder:
            out = embed_texts(
                encoder, texts, args.output, dtype=args.dtype, progress=False if args.no_progress else None
            )
    except KeyboardInterrupt:
        print(f"{PROG} embed-text: interrupted; the output was not written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JOB_ERRORS as e:
        return _fail("embed-text", e)
    print(f"embedded {len(texts)} texts -> {out} ({_engine(encoder)})", file=sys.stderr)
    return EXIT_OK


def _add_image_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (recursive), @list.txt (one path per line), .tar shards (webdataset)",
    )
    add_model_options(p)
    p.add_argument("--batch", type=int, metavar="N", help="images per engine batch (default: the engine's)")
    p.add_argument("--workers", type=int, metavar="N", help="decoding threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line stays)")


def _add_job_parsers(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "embed",
        help="embed images (files, folders, @lists, tar shards) into Parquet or .npy, rows in input order",
        description=[
            "Embed every image named by the inputs into OUT.parquet (columns path, embedding, width, "
            "height) or OUT.npy (with OUT.npy.ids.jsonl, one JSON string per line); both record the "
            "provenance (model, weights sha256, preprocessing, dtype). Bad inputs are skipped and listed "
            "with their reason in OUT.parquet.errors.jsonl (OUT.npy.errors.jsonl), written only when one "
            "failed. An existing output is refused unless --overwrite or --resume is given. With a model "
            f"name, the bundle is built once into the cache ({cache.CACHE_ENV}, default "
            "~/.cache/nvclip-fast) and reused by later runs.",
            f"Exit codes: {EXIT_OK} all embedded, {EXIT_SOME_FAILED} some failed, {EXIT_USAGE} the job could "
            "not run (no images found, an existing output, an unusable model or sidecar, a --resume of "
            f"another job), {EXIT_INTERRUPTED} interrupted (rerun with --resume).",
        ],
        example_lines=[
            "nvclip-fast embed ./photos -m ViT-B-32 --pretrained laion2b_s34b_b79k -o photos.parquet",
            "nvclip-fast embed shards/*.tar @more_files.txt -m vith -o photos.npy --dtype float16",
            "nvclip-fast embed ./photos -m vith.plan -o photos.parquet --resume   # after an interruption",
            "nvclip-fast embed /shared/photos -m /shared/vith -o /shared/photos.emb --ray auto --threads 8",
        ],
    )
    _add_image_job_options(p)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="OUT.parquet, or OUT.npy (+ OUT.npy.ids.jsonl and OUT.npy.provenance.json)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help="stored embedding type")
    replace = p.add_mutually_exclusive_group()
    replace.add_argument(
        "--resume",
        action="store_true",
        help="add what is missing to OUT: skip images already in it or saved by an interrupted run "
        "(refused when those rows are of another model, preprocessing or dtype)",
    )
    replace.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--checkpoint-rows",
        type=int,
        default=CHECKPOINT_ROWS,
        metavar="N",
        help=f"save finished rows for --resume once N are waiting, as each batch comes back (default "
        f"{CHECKPOINT_ROWS}; also on Ctrl-C; with --ray each partition's part is saved whole instead)",
    )
    cluster = p.add_argument_group(
        "Ray (the ray extra)",
        "-o names a folder of Parquet part files, one per partition of the inputs; its failures are "
        "listed in OUT.errors.jsonl; --resume skips the partitions already written",
    )
    cluster.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="embed on Ray Data: ray.init(address=ADDRESS), e.g. auto or ray://head:10001; without ADDRESS "
        "the cluster of $RAY_ADDRESS or of the last `ray start` here, else a local one for this job",
    )
    cluster.add_argument(
        "--actors",
        type=int,
        metavar="N",
        help="Encoders (actors) in the pool (default: one per GPU, else 1; 1 with --device cpu)",
    )
    cluster.add_argument(
        "--gpus-per-actor",
        type=float,
        metavar="G",
        help="GPUs per actor (default 1 on a cluster with GPUs; none with --device cpu)",
    )
    cluster.add_argument(
        "--partition-images",
        type=int,
        default=DEFAULT_PARTITION_IMAGES,
        metavar="N",
        help=f"inputs per part file, the unit of --resume (default {DEFAULT_PARTITION_IMAGES}; a tar shard "
        "starts a new one)",
    )
    p.set_defaults(run=_cmd_embed)

    c = add_command(
        sub,
        "classify",
        help="zero-shot classification of images against text labels",
        description=[
            "Prompt-ensembled zero-shot classification: each label's templates are embedded, averaged "
            "and renormalized; probabilities are the softmax of logit_scale x cosine. With --probe, a "
            "linear probe's classes instead (nvclip-fast probe train; refused for another model). Prints "
            "the top-k labels of each image, or writes JSON lines with -o."
        ],
        example_lines=[
            'nvclip-fast classify ./photos -m ViT-B-32 --pretrained laion2b_s34b_b79k --labels "cat,dog,car"',
            'nvclip-fast classify ./photos -m vith --labels @labels.txt --template "a photo of a {}." '
            '--template "a close-up photo of a {}." --top-k 3 -o predictions.jsonl',
            "nvclip-fast classify ./photos -m vith --probe probe.npz --top-k 1",
        ],
    )
    _add_image_job_options(c)
    classes = c.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", help='comma-separated labels ("cat,dog,car") or @labels.txt')
    classes.add_argument(
        "--probe",
        metavar="PROBE",
        help="a linear probe (nvclip-fast probe train) instead of zero-shot labels",
    )
    c.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help='prompt template with {} for the label (repeat to ensemble; default "a photo of a {}.")',
    )
    c.add_argument("--top-k", type=int, default=5, metavar="K", help="labels shown per image (default 5)")
    c.add_argument("-o", "--output", help="write JSON lines {path, labels, probs} instead of printing")
    c.set_defaults(run=_cmd_classify)

    t = add_command(
        sub,
        "embed-text",
        help="embed texts (arguments, @files of one text per line) into Parquet or .npy",
        description=[
            "Embed texts with the model's text tower, for prompt banks and text-to-image retrieval. Each "
            "argument is a text, or @FILE for the lines of FILE (UTF-8, blank lines skipped). Writes "
            "OUT.parquet (columns text, embedding; the provenance in the file's metadata) or OUT.npy (with "
            "OUT.npy.texts.jsonl and OUT.npy.provenance.json), rows in the order given."
        ],
        example_lines=[
            'nvclip-fast embed-text "a photo of a cat" @prompts.txt -m ViT-B-32 '
            "--pretrained laion2b_s34b_b79k -o texts.parquet",
            "nvclip-fast embed-text @captions.txt -m vith -o captions.npy --dtype float16",
        ],
    )
    t.add_argument("texts", nargs="+", metavar="TEXT", help="a text, or @FILE (one text per line)")
    add_model_options(t)
    t.add_argument("-o", "--output", required=True, help="OUT.parquet or OUT.npy")
    t.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help="stored embedding type")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=_cmd_embed_text)


def _add_info_parsers(sub: argparse._SubParsersAction) -> None:
    info = add_command(
        sub,
        "info",
        help="print what this build supports (CUDA, TensorRT, SIMD) and the GPUs it sees, as JSON",
        description=[
            "What this build of nvclip-fast was compiled with (CUDA, TensorRT headers, CPU SIMD), how many "
            "CUDA devices it can use (and why none, if none), and where the bundle cache is."
        ],
        example_lines=["nvclip-fast info"],
    )
    info.set_defaults(run=_cmd_info)

    models = add_command(
        sub,
        "models",
        help="list the model names (open_clip's and NVCLIP's) and their pretrained tags",
        description=[
            "The model names -m accepts with --pretrained, --weights or --random-weights: every open_clip "
            "architecture with its embedding size, image size and pretrained tags (downloaded on first "
            "use), and NVIDIA's NVCLIP architectures, whose weights come from NVIDIA NGC "
            "(--weights FILE). Needs the export extra."
        ],
        example_lines=["nvclip-fast models", "nvclip-fast models SigLIP-CLIPA   # the NVCLIP architectures"],
    )
    models.add_argument("contains", nargs="?", metavar="TEXT", help="only names containing TEXT (any case)")
    models.set_defaults(run=_cmd_models)

    c = add_command(
        sub,
        "cache",
        help="list or clear the bundles built from model names",
        description=[
            "Bundles built from a model name and its weights are kept in the cache "
            f"(${cache.CACHE_ENV}, else $XDG_CACHE_HOME/nvclip-fast, else ~/.cache/nvclip-fast), one entry "
            "per model, weights, image size, precision, engine, GPU and package versions."
        ],
        example_lines=[
            "nvclip-fast cache list",
            "nvclip-fast cache clear ViT-B-32",
            "nvclip-fast cache clear",
        ],
    )
    c.add_argument("action", choices=("list", "clear"), help="list the entries, or remove them")
    c.add_argument("name", nargs="?", metavar="MODEL", help="clear: only the entries of this model name")
    c.set_defaults(run=_cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_parsers(sub)
    server.add_parser(sub)
    add_collection_parsers(sub)
    _add_export_parser(sub)
    _add_info_parsers(sub)
    return parser


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _console() -> Iterator[None]:
    """For one command: each warning as one plain line on stderr, and this package's progress messages
    (the bundle cache's: built, reused, waiting) on stderr too, prefixed with the program's name."""
    logger = logging.getLogger("nvclip_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _console():
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
