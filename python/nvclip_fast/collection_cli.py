"""The collection commands of ``nvclip-fast``: ``search``, ``index``, ``dedup``, ``cluster``, ``probe``.

Each opens what ``embed`` wrote (a Parquet file or folder, or ``.npy`` + ids) as a
:class:`~nvclip_fast.collection.Collection`. Exit codes: 0 done, 2 the command could not run (bad
arguments, a missing extra, a model or index that does not match the collection).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack

import numpy as np

from .collection import Collection, CollectionError, encoder_provenance
from .commands import add_command
from .dedup import DEFAULT_NEIGHBORS, DEFAULT_THRESHOLD
from .probe import DEFAULT_C, DEFAULT_HOLDOUT, LinearProbe, labelled_embeddings
from .provenance import ProvenanceError
from .search import TARGET_RECALL

EXIT_OK = 0
EXIT_USAGE = 2  # as for embed and classify: the command could not run
DEFAULT_K = 10
DEFAULT_CLUSTERS = 100
COLLECTION_HELP = "what embed wrote: OUT.parquet, a folder of .parquet parts, or OUT.npy (+ ids)"
# Errors that mean "this command cannot run as asked": reported in one line, exit 2.
_USAGE_ERRORS = (ValueError, OSError, ImportError, IndexError, CollectionError, ProvenanceError)


def _fail(command: str, e: BaseException) -> int:
    print(f"nvclip-fast {command}: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def _open_model(stack: ExitStack, model: str | None, device: str):
    if model is None:
        return None
    from .encoder import Encoder

    return stack.enter_context(Encoder(model, device=device))


def _cmd_search(args: argparse.Namespace) -> int:
    try:
        with ExitStack() as stack:
            collection = stack.enter_context(Collection.open(args.collection))
            encoder = _open_model(stack, args.model, args.device)
            if encoder is None and collection.provenance is not None:
                encoder = collection.encoder(args.device)
            hits = collection.search(
                text=args.text, image=args.image, k=args.k, encoder=encoder, index=args.index
            )
    except _USAGE_ERRORS as e:
        return _fail("search", e)
    if args.json:
        print(json.dumps([{"id": h.id, "score": h.score, "row": h.row} for h in hits]))
    else:
        for h in hits:
            print(f"{h.score:.4f}\t{h.id}")
    return EXIT_OK


def _cmd_index(args: argparse.Namespace) -> int:
    from .search import Index

    try:
        with Collection.open(args.collection) as collection:
            index = Index.build(collection, factory=args.factory, target_recall=args.target_recall)
            index.save(args.output)
    except _USAGE_ERRORS as e:
        return _fail("index", e)
    info = index.info
    probe = f", {info.nprobe} lists probed" if info.nprobe is not None else ""
    print(
        f"{info.factory} over {info.rows} rows: recall@10 {info.recall_at_10:.3f} against exact search on "
        f"{info.recall_queries} held-out queries{probe}; built in {info.build_seconds:.1f} s -> {args.output}"
    )
    return EXIT_OK


def _cmd_dedup(args: argparse.Namespace) -> int:
    try:
        with Collection.open(args.collection) as collection:
            groups = collection.near_duplicates(args.threshold, neighbors=args.neighbors)
            groups.write(args.output, collection.provenance)
            if args.drop_list:
                groups.write_drop_list(args.drop_list)
    except _USAGE_ERRORS as e:
        return _fail("dedup", e)
    print(f"{groups.summary()} -> {args.output}")
    return EXIT_OK


def _cmd_cluster(args: argparse.Namespace) -> int:
    try:
        with Collection.open(args.collection) as collection:
            clusters = collection.kmeans(args.k, iterations=args.iterations, seed=args.seed)
            table, centroids = clusters.write(args.output, collection, collection.provenance)
    except _USAGE_ERRORS as e:
        return _fail("cluster", e)
    sizes = clusters.sizes
    print(
        f"{len(sizes)} clusters of {len(clusters.assignment)} rows (sizes {sizes.min()} to {sizes.max()}, "
        f"median {int(np.median(sizes))}) -> {table}, {centroids}"
    )
    return EXIT_OK


def _cmd_probe_train(args: argparse.Namespace) -> int:
    from .encoder import Encoder

    try:
        with Encoder(args.model, device=args.device) as encoder:
            embeddings, labels, failed = labelled_embeddings(args.folder, encoder)
            provenance = encoder_provenance(encoder)
        probe = LinearProbe.fit(embeddings, labels, provenance=provenance, holdout=args.holdout, C=args.C)
        probe.save(args.output)
    except _USAGE_ERRORS as e:
        return _fail("probe train", e)
    for item, reason in failed:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    accuracy = (
        f"held-out accuracy {probe.holdout_accuracy:.3f} ({args.holdout:.0%} of the examples)"
        if probe.holdout_accuracy is not None
        else "no held-out accuracy (holdout 0)"
    )
    print(f"{len(probe.classes)} classes, {probe.examples} examples: {accuracy} -> {args.output}")
    return EXIT_OK


def add_collection_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``search``, ``index``, ``dedup``, ``cluster`` and ``probe`` on ``sub``."""
    s = add_command(
        sub,
        "search",
        help="the images of a collection most similar to a text or an image",
        description=[
            "Embed the query with the collection's model (from its provenance, or -m MODEL, which must be "
            "the same model) and print the k most similar images, best first: cosine and id. Exact search "
            "over every row unless --index is given."
        ],
        example_lines=[
            'nvclip-fast search photos.parquet --text "a dog on a beach" -k 5',
            "nvclip-fast search photos.parquet --image query.jpg --json",
            'nvclip-fast search photos.parquet --text "a red car" --index photos.faiss',
        ],
    )
    s.add_argument("collection", help=COLLECTION_HELP)
    query = s.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image query: a file, or a <shard.tar>::<member> id")
    s.add_argument("-k", type=int, default=DEFAULT_K, help=f"results (default {DEFAULT_K})")
    s.add_argument("--json", action="store_true", help="print a JSON array of {id, score, row}")
    s.add_argument(
        "--index", metavar="INDEX", help="search this index (nvclip-fast index) instead of every row"
    )
    s.add_argument(
        "-m", "--model", help="the query model (default: the one the collection's provenance names)"
    )
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    s.set_defaults(run=_cmd_search)

    i = add_command(
        sub,
        "index",
        help="build a FAISS index of a collection for fast approximate search, recall measured",
        description=[
            "Build a FAISS index whose kind follows the collection's size (Flat, IVF, IVF+HNSW+PQ), measure "
            "its recall@10 against exact search on held-out queries and print it. Needs the search extra."
        ],
        example_lines=[
            "nvclip-fast index photos.parquet -o photos.faiss",
            'nvclip-fast index photos.parquet -o photos.faiss --factory "IVF1024,Flat" --target-recall 0.99',
        ],
    )
    i.add_argument("collection", help=COLLECTION_HELP)
    i.add_argument(
        "-o", "--output", required=True, help="INDEX (FAISS file; INDEX.json is written beside it)"
    )
    i.add_argument("--factory", help="a FAISS index factory string instead of the size's default")
    i.add_argument(
        "--target-recall",
        type=float,
        default=TARGET_RECALL,
        help=f"probe the fewest lists that reach this recall@10 (default {TARGET_RECALL})",
    )
    i.set_defaults(run=_cmd_index)

    d = add_command(
        sub,
        "dedup",
        help="groups of near-duplicate images, one kept per group",
        description=[
            "Group rows whose cosine similarity reaches the threshold (connected groups; rows equal up to "
            "float rounding always grouped). The kept row of a group has the most pixels (then the earliest "
            "row). Writes Parquet: group, path, row, keep, similarity, width, height. Needs the search extra."
        ],
        example_lines=[
            "nvclip-fast dedup photos.parquet --threshold 0.95 -o groups.parquet --drop-list drop.jsonl"
        ],
    )
    d.add_argument("collection", help=COLLECTION_HELP)
    d.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"cosine similarity (default {DEFAULT_THRESHOLD})",
    )
    d.add_argument("-o", "--output", required=True, help="groups.parquet")
    d.add_argument("--drop-list", metavar="FILE", help="also write the ids to drop, one JSON string per line")
    d.add_argument(
        "--neighbors",
        type=int,
        default=DEFAULT_NEIGHBORS,
        help=f"nearest neighbours linked per row (default {DEFAULT_NEIGHBORS})",
    )
    d.set_defaults(run=_cmd_dedup)

    c = add_command(
        sub,
        "cluster",
        help="k-means clusters of a collection",
        description=[
            "Spherical k-means (FAISS). Writes OUT.parquet (path, row, cluster, similarity) and "
            "OUT.centroids.npy. Needs the search extra."
        ],
        example_lines=["nvclip-fast cluster photos.parquet -k 100 -o clusters.parquet"],
    )
    c.add_argument("collection", help=COLLECTION_HELP)
    c.add_argument("-k", type=int, default=DEFAULT_CLUSTERS, help=f"clusters (default {DEFAULT_CLUSTERS})")
    c.add_argument("-o", "--output", required=True, help="clusters.parquet")
    c.add_argument("--iterations", type=int, default=20, help="k-means iterations (default 20)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=_cmd_cluster)

    probe_examples = [
        "nvclip-fast probe train labelled/ -m vith -o probe.npz   # labelled/<class>/*.jpg",
        "nvclip-fast classify ./photos -m vith --probe probe.npz --top-k 1",
    ]
    p = add_command(
        sub,
        "probe",
        help="linear probes: a classifier trained on a few labelled images",
        description=["Linear probes: 'probe train' fits one; 'classify --probe' applies it."],
        example_lines=probe_examples,
    )
    probe_sub = p.add_subparsers(dest="probe_command", required=True)
    t = add_command(
        probe_sub,
        "train",
        help="train a logistic-regression probe on FOLDER/<class>/* images",
        description=[
            "Embed the images of each sub-folder (the class name), train a logistic regression "
            "(scikit-learn) and print its accuracy on a held-out share. The probe file keeps the model's "
            "provenance: classify --probe refuses another model. Needs the probe extra."
        ],
        example_lines=probe_examples,
    )
    t.add_argument("folder", help="one sub-folder of images per class")
    t.add_argument(
        "-m", "--model", required=True, help="exported bundle: MODEL.plan, MODEL.onnx or MODEL.json"
    )
    t.add_argument("-o", "--output", required=True, help="probe.npz")
    t.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help=f"share held out to measure accuracy (default {DEFAULT_HOLDOUT}; 0 to skip)",
    )
    t.add_argument(
        "--C", type=float, default=DEFAULT_C, help=f"inverse regularization strength (default {DEFAULT_C})"
    )
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    t.set_defaults(run=_cmd_probe_train)
