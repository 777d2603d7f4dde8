"""Embeddings on a local Ray cluster (``ray.init(num_cpus=2)``, a small object store): every image's
row equals ``Encoder.embed`` on it, bad images carry their error, no row lost or twice, whatever Ray
read the images from; an actor killed mid-job is restarted and its batch retried; ``embed --ray``
writes what the in-process ``embed`` writes, and ``--resume`` redoes only missing partitions."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

import nvclip_fast as nf  # noqa: E402
from nvclip_fast import cli  # noqa: E402
from nvclip_fast import ray as nf_ray  # noqa: E402
from nvclip_fast.collection import Collection  # noqa: E402
from nvclip_fast.outputs import read_output, read_provenance  # noqa: E402
from nvclip_fast.provenance import PARQUET_KEY, Provenance, ProvenanceError  # noqa: E402
from tar_shards import write_tar  # noqa: E402

pytestmark = pytest.mark.ray

# Rows of one image through Ray and through Encoder.embed run the same graph on the same input; ONNX
# Runtime may pick other kernels for other batch sizes: float32 rounding only.
ROW_ATOL = 1e-6
OBJECT_STORE_BYTES = 200 * 1024 * 1024
BATCH = 4
KILL_MARK = "kill-here"  # the image whose batch kills its actor (once)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local Ray cluster for this module's tests; the Embedder subclass below is sent to the
    workers by value (they cannot import this test module)."""
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder(tiny):
    with nf.Encoder(tiny[1], device="cpu") as enc:
        yield enc


def _png(rng, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rng, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# {name: bytes} of the test images; the bad ones map to the reason their error must hold.
BAD = {"broken.png": "cannot decode", "empty.jpg": "empty file", "text.jpg": "not an image"}


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = {f"{k:02d}.png": _png(rng, 20 + 3 * k, 40 - k) for k in range(7)}
    good |= {f"{k:02d}.jpg": _jpeg(rng, 30, 25 + k) for k in range(7, 10)}
    good[f"{KILL_MARK}.png"] = _png(rng, 33, 33)
    whole = _png(rng, 40, 40)
    bad = {"broken.png": whole[: len(whole) // 2], "empty.jpg": b"", "text.jpg": b"not an image at all"}
    return good | bad


@pytest.fixture(scope="module")
def folder(images, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, data in images.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """A webdataset shard: keys with a .jpg image and a .txt caption; key 000003's image is not one."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("shards") / "shard-000000.tar"
    members = []
    for key in ("000001", "000002", "000003", "000004"):
        image = b"garbage, not a JPEG" if key == "000003" else _jpeg(rng, 24, 36)
        members += [(f"{key}.jpg", image), (f"{key}.txt", f"caption {key}".encode())]
    return write_tar(path, members)


def _check_rows(table: pa.Table, encoder, data_of, id_column: str) -> None:
    """Each row's embedding equals Encoder.embed on its bytes, or it has an error and no embedding."""
    ids = table.column(id_column).to_pylist()
    assert len(set(ids)) == len(ids)  # no row twice
    rows = table.to_pylist()
    bad = 0
    for image_id, row in zip(ids, rows, strict=True):
        data = data_of(image_id)
        want = encoder.embed([data], on_error="nan")[0]
        if np.isnan(want).any():
            assert row["embedding"] is None, image_id
            assert row["width"] is None, image_id
            assert row["error"], image_id
            bad += 1
        else:
            assert row["error"] is None, (image_id, row["error"])
            np.testing.assert_allclose(row["embedding"], want, atol=ROW_ATOL, err_msg=image_id)
            assert (row["width"], row["height"]) == Image.open(io.BytesIO(data)).size
    assert bad >= 1  # the inputs hold bad images: their rows were checked too


def test_binary_files_rows_equal_encoder_embed_and_bad_images_carry_their_error(
    tiny, encoder, folder, images
):
    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    out = nf_ray.embed_dataset(ds, tiny[1], batch_size=BATCH, num_cpus=1).to_arrow_refs()
    table = pa.concat_tables(ray.get(out))
    assert table.num_rows == len(images)  # nothing lost
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), encoder.dim)
    _check_rows(table, encoder, lambda p: images[Path(p).name], "path")
    errors = dict(zip(table.column("path").to_pylist(), table.column("error").to_pylist(), strict=True))
    for name, reason in BAD.items():
        assert reason in errors[str(folder / name)], errors[str(folder / name)]
        assert "\n" not in errors[str(folder / name)]  # one line


def test_a_webdataset_shard(tiny, encoder, shard):
    ds = ray.data.read_webdataset(str(shard), decoder=None)
    table = nf_ray.embed_dataset(ds, tiny[1], image_column="jpg", id_column="__key__", batch_size=BATCH)
    table = pa.concat_tables(ray.get(table.to_arrow_refs()))
    assert sorted(table.column("__key__").to_pylist()) == ["000001", "000002", "000003", "000004"]
    assert "txt" in table.column_names  # the sample's other members stay in the row
    with tarfile.open(shard) as tar:
        data = {m.name.split(".")[0]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")}
    _check_rows(table, encoder, data.__getitem__, "__key__")
    error = table.filter(pa.compute.equal(table.column("__key__"), "000003")).column("error")[0].as_py()
    assert "'000003'" in error  # named by its id


def test_parquet_with_image_bytes_and_paths_and_provenance_in_the_written_parts(
    tiny, encoder, folder, images, tmp_path
):
    names = sorted(images)
    pq.write_table(
        pa.table(
            {"key": names, "image": [images[n] for n in names], "file": [str(folder / n) for n in names]}
        ),
        tmp_path / "in.parquet",
    )
    for column in ("image", "file"):  # bytes, then paths read by the actors
        ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
        out = tmp_path / f"out-{column}"
        nf_ray.embed_dataset(
            ds, tiny[1], image_column=column, id_column="key", batch_size=BATCH
        ).write_parquet(str(out))
        parts = sorted(out.glob("*.parquet"))
        assert parts
        table = pa.concat_tables([pq.read_table(p) for p in parts])
        assert sorted(table.column("key").to_pylist()) == names
        _check_rows(table, encoder, images.__getitem__, "key")
        for part in parts:
            stored = Provenance.from_json(pq.read_schema(part).metadata[PARQUET_KEY])
            assert stored.mismatch(encoder.provenance(), also=("dtype",)) is None
            assert stored.source == encoder.source  # how to open the model again


class KillOnce(nf_ray.Embedder):
    """Exits its process (as a crash or an OOM kill would) in the first batch holding the marked
    image, once: the flag file says it happened."""

    def __init__(self, *args, flag: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.flag = Path(flag)

    def __call__(self, batch):
        if any(KILL_MARK in p for p in batch.column("path").to_pylist()) and not self.flag.exists():
            self.flag.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_an_actor_killed_mid_job_is_restarted_and_no_row_is_lost_or_twice(
    tiny, encoder, folder, images, tmp_path
):
    flag = tmp_path / "killed"
    ds = ray.data.read_binary_files(str(folder), include_paths=True)
    out = nf_ray.embed_dataset(ds, tiny[1], batch_size=BATCH, embedder=KillOnce, flag=str(flag))
    table = pa.concat_tables(ray.get(out.to_arrow_refs()))
    assert flag.exists()  # the actor did die
    assert sorted(table.column("path").to_pylist()) == sorted(str(folder / n) for n in images)
    _check_rows(table, encoder, lambda p: images[Path(p).name], "path")


# --- nvclip-fast embed --ray -----------------------------------------------------------------------


def _parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def test_cli_ray_writes_what_embed_writes_and_resume_redoes_only_missing_partitions(
    tiny, folder, shard, tmp_path, capsys
):
    # 00.png twice (a duplicate), and a path that is not there (an error of the listing)
    inputs = [str(folder), str(shard), str(folder / "00.png"), str(tmp_path / "missing.jpg")]
    reference = tmp_path / "in-process.parquet"
    assert cli.main(["embed", *inputs, "-m", str(tiny[1]), "-o", str(reference), "--no-progress"]) == 1
    out = tmp_path / "emb"
    argv = ["embed", *inputs, "-m", str(tiny[1]), "-o", str(out), "--no-progress", "--partition-images", "5"]
    assert cli.main([*argv, "--ray"]) == cli.EXIT_SOME_FAILED
    parts = _parts(out)
    assert len(parts) == 5  # 14 files in partitions of 5 (5, 5, 4), the shard's own, the missing file

    def check_same_as_in_process() -> None:
        want = read_output(reference)
        with Collection.open(out) as collection:
            assert collection.provenance.mismatch(read_provenance(reference), also=("dtype",)) is None
        got = pa.concat_tables([pq.read_table(p) for p in _parts(out)])
        assert got.column("path").to_pylist() == want.ids  # the same rows, in input order
        np.testing.assert_allclose(
            np.array(got.column("embedding").to_pylist()), want.embeddings, atol=ROW_ATOL
        )
        assert got.column("width").to_pylist() == want.widths.tolist()
        assert got.column("height").to_pylist() == want.heights.tolist()
        errors = Path(f"{out}.errors.jsonl").read_text()
        assert errors == Path(f"{reference}.errors.jsonl").read_text()  # the same failures, in order
        assert '"duplicate"' in errors
        assert "no such file or directory" in errors

    check_same_as_in_process()
    capsys.readouterr()
    assert cli.main([*argv, "--ray"]) == cli.EXIT_USAGE  # neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err

    # A partition that was not written (interrupted): --resume writes it and leaves the others alone.
    kept = {p: p.stat().st_mtime_ns for p in parts if p != parts[1]}
    parts[1].unlink()
    assert cli.main([*argv, "--ray", "--resume"]) == cli.EXIT_SOME_FAILED
    assert "already done (resumed)" in capsys.readouterr().err
    assert _parts(out) == parts
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    check_same_as_in_process()

    # Another cut of the same inputs: the parts of the old one hold its ids and go; no row twice.
    argv[argv.index("--partition-images") + 1] = "7"
    assert cli.main([*argv, "--ray", "--resume"]) == cli.EXIT_SOME_FAILED
    assert not set(_parts(out)) & set(parts)
    assert len(_parts(out)) == 4  # 7 + 7, the shard's, the missing file
    check_same_as_in_process()


def test_cli_ray_float16_and_resume_refuses_rows_of_another_model(
    tiny, tiny_clip_bundles, folder, tmp_path, capsys
):
    out = tmp_path / "emb"
    argv = ["embed", str(folder), "-o", str(out), "--no-progress", "--partition-images", "8", "--ray"]
    assert cli.main([*argv, "-m", str(tiny[1]), "--dtype", "float16"]) == cli.EXIT_SOME_FAILED
    first = _parts(out)
    schema = pq.read_schema(first[0])
    assert schema.field("embedding").type.value_type == pa.float16()
    assert Provenance.from_json(schema.metadata[PARQUET_KEY]).dtype == "float16"
    first[0].unlink()
    capsys.readouterr()
    argv += ["--dtype", "float16"]
    assert cli.main([*argv, "-m", str(tiny_clip_bundles[0]), "--resume"]) == cli.EXIT_USAGE
    assert "weights_sha256 differs" in capsys.readouterr().err
    assert _parts(out) == first[1:]  # nothing written, nothing removed


def _rows(out: Path) -> dict[str, tuple[list[float] | None, Path]]:
    """Every row of the folder's parts: {id: (embedding, its part)}; no id twice."""
    rows: dict[str, tuple[list[float] | None, Path]] = {}
    for part in _parts(out):
        table = pq.read_table(part)
        ids, embeddings = (table.column(c).to_pylist() for c in ("path", "embedding"))
        for image_id, embedding in zip(ids, embeddings, strict=True):
            assert image_id not in rows, image_id
            rows[image_id] = (embedding, part)
    return rows


def test_cli_ray_resume_on_fewer_inputs_keeps_the_others_rows_and_checks_the_model_first(
    tiny, tiny_clip_bundles, images, tmp_path, monkeypatch, capsys
):
    a, b = tmp_path / "A", tmp_path / "B"
    b_files = {"b1.png": "03.png", "b2.png": "broken.png", "b3.png": "04.png"}  # name: image
    for folder, files in ((a, {n: n for n in ("00.png", "01.png", "02.png")}), (b, b_files)):
        folder.mkdir()
        for name, image in files.items():
            (folder / name).write_bytes(images[image])
    out = tmp_path / "emb"
    out.mkdir()
    monkeypatch.chdir(out)  # -o .: the folder it is run in, its errors file beside it
    argv = ["-o", ".", "--no-progress", "--partition-images", "5", "--ray"]
    model = ["-m", str(tiny[1])]
    # part 0: A's three, B/b1.png and B/b2.png (a broken image); part 1: B/b3.png
    assert cli.main(["embed", str(a), str(b), *argv, *model]) == cli.EXIT_SOME_FAILED
    assert "cannot decode" in Path(f"{out}.errors.jsonl").read_text()
    first = _rows(out)
    old_part0, b_part = first[str(b / "b1.png")][1], first[str(b / "b3.png")][1]
    assert old_part0 != b_part

    # Only A, resumed: old part 0 loses A's rows (embedded again in this listing's part) and keeps
    # B's row and failure; the part of B alone stays as it was.
    kept = b_part.stat().st_mtime_ns
    assert cli.main(["embed", str(a), *argv, *model, "--resume"]) == cli.EXIT_OK
    rows = _rows(out)
    assert sorted(rows) == sorted(first)  # every row still there, each once
    assert rows[str(b / "b1.png")] == first[str(b / "b1.png")]
    assert b_part.stat().st_mtime_ns == kept
    assert {rows[str(a / n)][1] for n in ("00.png", "01.png", "02.png")}.isdisjoint({old_part0, b_part})
    trimmed = pq.read_schema(old_part0).metadata
    assert [e["path"] for e in json.loads(trimmed[nf_ray.ERRORS_KEY])] == [str(b / "b2.png")]
    assert Provenance.from_json(trimmed[PARQUET_KEY]).dtype == "float32"
    assert not Path(f"{out}.errors.jsonl").exists()  # this listing had no failure

    # Everything done: the dtype and the model are still checked, here, and no Ray job is started.
    def no_job(*args, **kwargs):
        raise AssertionError("a Ray job was started")

    monkeypatch.setattr(ray.data, "from_items", no_job)
    before = {p: p.stat().st_mtime_ns for p in _parts(out)}
    capsys.readouterr()
    assert cli.main(["embed", str(a), *argv, *model, "--resume", "--dtype", "float16"]) == cli.EXIT_USAGE
    assert "dtype differs" in capsys.readouterr().err
    assert cli.main(["embed", str(a), *argv, "-m", str(tiny_clip_bundles[0]), "--resume"]) == cli.EXIT_USAGE
    assert "weights_sha256 differs" in capsys.readouterr().err
    assert cli.main(["embed", str(a), *argv, *model, "--resume"]) == cli.EXIT_OK
    assert "already done (resumed)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in _parts(out)} == before


def test_cli_ray_a_model_failing_on_the_actors_is_one_error_line_and_overwrite_keeps_the_parts(
    tiny, images, tmp_path, capsys
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("00.png", "01.png"):
        (folder / name).write_bytes(images[name])
    out = tmp_path / "emb"
    argv = ["embed", str(folder), "-o", str(out), "--no-progress", "--ray"]
    assert cli.main([*argv, "-m", str(tiny[1])]) == cli.EXIT_OK
    before = {p: p.stat().st_mtime_ns for p in _parts(out)}
    # A bundle the driver finds (its files are there) that no actor can open: its ONNX is garbage.
    broken = tmp_path / "broken"
    shutil.copytree(tiny[1].parent, broken, ignore=shutil.ignore_patterns("*.pt"))
    (broken / tiny[1].name).write_bytes(b"not an ONNX model")
    capsys.readouterr()
    assert cli.main([*argv, "-m", str(broken / tiny[1].name), "--overwrite"]) == cli.EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("nvclip-fast embed: error: on Ray: ")
    assert "Error: " in lines[0]  # the error the actor raised, by its type
    assert f"{broken / tiny[1].name}" in lines[0]  # naming the file it could not load
    assert "Traceback" not in lines[0]
    assert {p: p.stat().st_mtime_ns for p in _parts(out)} == before  # the old output is intact


def test_every_batch_must_be_of_the_first_batchs_model(encoder, tmp_path):
    def batch(provenance: Provenance) -> pa.Table:
        return pa.table({"path": ["x"]}).replace_schema_metadata({PARQUET_KEY: provenance.to_json()})

    made = encoder.provenance()
    writer = nf_ray._Writer(tmp_path, [], "float32", None, nf_ray._Old({}, [], set(), overwrite=False))
    writer.check(batch(made))
    writer.check(batch(made.replace(created="another actor, another time")))  # the same model
    with pytest.raises(ProvenanceError, match=r"actors opened different models \(weights_sha256 differs"):
        writer.check(batch(made.replace(weights_sha256="0" * 64)))


def test_the_output_folder_is_made_absolute_and_the_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert nf_ray.check_ray_output(".", resume=False, overwrite=False) == tmp_path
    with pytest.raises(ValueError, match="root folder"):
        nf_ray.check_ray_output("/", resume=True, overwrite=False)


@pytest.mark.parametrize(
    ("gpus", "options", "expected"),
    [
        (4, {}, (4, 1)),  # one actor per GPU
        (4, {"num_gpus": 2}, (2, 2)),
        (0, {}, (1, None)),  # no GPU: one CPU actor
        (4, {"device": "cpu"}, (1, None)),  # the CPU on a GPU cluster: no GPU reserved
        (4, {"device": "cpu", "actors": 3}, (3, None)),
        (4, {"device": ["cpu", "cpu"]}, (1, None)),
    ],
)
def test_the_actor_pool_takes_gpus_unless_on_the_cpu(gpus, options, expected):
    assert nf_ray.actor_pool(gpus, **options) == expected


def test_the_actor_pool_refuses_gpus_on_the_cpu():
    with pytest.raises(ValueError, match="device cpu takes no GPU"):
        nf_ray.actor_pool(4, device="cpu", num_gpus=1)


# The command in a process of its own: it starts a local Ray (in RAY_TMPDIR) and stops it.
CLI_ON_ITS_OWN_RAY = """
import json, sys
import ray
from nvclip_fast import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "ray_running": ray.is_initialized()}))
"""


def test_cli_ray_starts_its_own_local_ray_and_shuts_it_down(tiny, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("00.png", "01.png"):
        (folder / name).write_bytes(images[name])
    out = tmp_path / "emb"
    # A short temporary folder of its own (Ray's socket paths must stay short): its processes are
    # told apart from every other Ray on this machine by it.
    ray_tmp = tempfile.mkdtemp(prefix="nvr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    argv = ["embed", str(folder), "-m", str(tiny[1]), "-o", str(out), "--no-progress", "--ray"]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CLI_ON_ITS_OWN_RAY, *argv, "--threads", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == {"code": cli.EXIT_OK, "ray_running": False}
        assert sorted(pq.read_table(_parts(out)[0]).column("path").to_pylist()) == sorted(
            str(folder / n) for n in ("00.png", "01.png")
        )
        left = [
            p.name for p in Path("/proc").iterdir() if p.name.isdigit() and ray_tmp.encode() in _cmdline(p)
        ]
        assert left == []  # no process of its Ray outlives it
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return b""


# --- without a cluster -----------------------------------------------------------------------------


class _Recorder:
    """A stand-in Dataset that records how map_batches was called."""

    def map_batches(self, fn, **kwargs):
        self.fn, self.kwargs = fn, kwargs
        return self


@pytest.mark.parametrize(("version", "expected"), [("2.60.0", "compute"), ("2.50.1", "concurrency")])
def test_the_actor_pool_is_compute_since_ray_2_51_and_concurrency_before(
    tiny, monkeypatch, version, expected
):
    monkeypatch.setattr(ray, "__version__", version)
    ds = nf_ray.embed_dataset(_Recorder(), tiny[1], num_gpus=1, num_cpus=4, actors=(2, 8), batch_size=64)
    assert ds.fn is nf_ray.Embedder
    assert (ds.kwargs["num_gpus"], ds.kwargs["num_cpus"], ds.kwargs["batch_size"]) == (1, 4, 64)
    assert ds.kwargs["fn_constructor_kwargs"]["threads"] == 4  # the actor's CPUs are its threads
    if expected == "compute":
        pool = ds.kwargs["compute"]
        assert isinstance(pool, ray.data.ActorPoolStrategy)
        assert (pool.min_size, pool.max_size) == (2, 8)
        assert "concurrency" not in ds.kwargs
    else:
        assert ds.kwargs["concurrency"] == (2, 8)
        assert "compute" not in ds.kwargs


def test_without_ray_the_error_names_the_extra(tiny, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as where it is not installed
    with pytest.raises(ImportError, match=r"Ray Data jobs needs the 'ray' extra \(ray is not installed\)"):
        nf_ray.embed_dataset(_Recorder(), tiny[1])
    argv = ["embed", str(folder), "-m", str(tiny[1]), "-o", str(tmp_path / "emb"), "--ray"]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "'ray' extra" in capsys.readouterr().err
