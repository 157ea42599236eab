"""--data URL against real servers on 127.0.0.1, each started and stopped by its test (ingest/remote.py):
Python's http.server serving a copy of the tiny dataset, and S3 through moto's server with s3fs.

Train from the URL, with the cached files' sha256 those of the manifest; a fetch killed with -9 midway resumes
to the same bytes, fetching only what it lacked; a file changed on the server is refused by its checksum; one
process per cache fetches while another waits saying for whom; a cache of another dataset is never used; a
missing client, a full disk and a read-only --publish target are one line each; `--publish` to s3:// then
training from it.
"""
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import train
from cli import UsageError
from files import one_writer, write_json
from ingest import build, layout, remote
from report.render import render

REPO = Path(train.__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = dict(net="resnet18", loader="resident", res=32, batch_size=16, epochs=1, lr=0.01, amp="off", workers=1,
             bootstrap=20, device="cpu")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """http.server on 127.0.0.1 in a thread, serving `folder`; logs the paths asked for. A path in `hold` is sent
    half, then waits for `release` (a download caught midway)."""

    def __init__(self, folder, hold=()):
        self.requests, self.hold, self.release = [], set(hold), threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def copyfile(self, source, outputfile):
                name = self.path.rsplit("/", 1)[-1]  # the file name: the dataset is served as tiny/
                server.requests.append(name)
                if name not in server.hold:
                    return super().copyfile(source, outputfile)
                data = source.read()
                outputfile.write(data[:len(data) // 2])
                outputfile.flush()
                server.release.wait(60)
                outputfile.write(data[len(data) // 2:])

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client was killed: expected here
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture
def served(ingested, tmp_path):
    """A copy of the tiny dataset that a test may change, as the server's folder."""
    folder = tmp_path / "served" / "tiny"
    shutil.copytree(ingested, folder, ignore=shutil.ignore_patterns(".*"))
    return folder


def cached_files(cache, manifest):
    return Path(cache) / manifest["fingerprint"]


def test_the_loader_bench_reads_a_dataset_from_a_url(served, tmp_path):
    from bench import loaders as loader_bench
    manifest, out = layout.read_manifest(served), tmp_path / "results"
    with Server(served.parent) as server:
        assert loader_bench.main(["--data", f"{server.url}/tiny", "--cache-dir", str(tmp_path / "cache"), "--backends",
                                  "folder", "--splits", "test", "--in-process", "--quick", "--res", "32",
                                  "--batch-size", "16", "--workers", "0", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    folder = [r for r in report["rows"] if r["backend"] == "folder"]
    assert len(folder) == 1 and "error" not in folder[0] and folder[0]["samples"] == manifest["splits"]["test"]["count"]
    assert json.loads((out / "config.json").read_text())["config"]["data"] == f"{server.url}/tiny"
    assert layout.file_sha256(cached_files(tmp_path / "cache", manifest) / "test.csv") == \
        manifest["files"]["test.csv"]["sha256"]


@pytest.mark.slow
def test_train_one_epoch_from_an_http_url(served, tmp_path):
    manifest = layout.read_manifest(served)
    with Server(served.parent) as server:
        summary = train.train(train.Config(**TRAIN, data=f"{server.url}/tiny", cache_dir=str(tmp_path / "cache"),
                                           runs_dir=str(tmp_path / "runs"), name="http"))
        drawn = render(summary["run_dir"], progress=False)  # what train.py's command line does next
    assert summary["epochs"] == 1 and "confusion.png" in drawn and "samples.png" in drawn
    folder = cached_files(tmp_path / "cache", manifest)
    for name, info in manifest["files"].items():
        assert layout.file_sha256(folder / name) == info["sha256"], name
    assert (folder / layout.MANIFEST).read_bytes() == (served / layout.MANIFEST).read_bytes()
    assert sorted(server.requests) == sorted([layout.MANIFEST] * 3 + list(manifest["files"])), \
        "each file fetched once; the manifest read by the train, by the test loader and by the report"


def fetch_in_child(url, cache, stderr=subprocess.PIPE):
    """`ingest.remote.local_folder(url, cache)` in a child process, which prints the folder."""
    code = "import sys; from ingest.remote import local_folder; print(local_folder(sys.argv[1], sys.argv[2]))"
    return subprocess.Popen([sys.executable, "-c", code, url, str(cache)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


@pytest.mark.slow
def test_a_fetch_killed_midway_resumes_to_the_same_bytes(served, tmp_path):
    manifest = layout.read_manifest(served)
    held = max(manifest["files"], key=lambda n: manifest["files"][n]["bytes"])  # caught in flight
    folder = cached_files(tmp_path / "cache", manifest)
    with Server(served.parent, hold=[held]) as server:
        child = fetch_in_child(f"{server.url}/tiny", tmp_path / "cache")
        try:
            others = [folder / n for n in manifest["files"] if n != held]
            deadline = time.monotonic() + 120
            while not (all(p.is_file() for p in others) and any(remote.temp_of(p.name) == held
                                                                 for p in folder.glob(".*"))):
                assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-2000:]
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert not (folder / held).exists() and not (folder / layout.MANIFEST).exists()
        server.release.set()
        server.requests.clear()
        assert remote.local_folder(f"{server.url}/tiny", tmp_path / "cache", progress=False) == folder
        assert sorted(server.requests) == sorted([layout.MANIFEST, held]), "only the file in flight is fetched again"
    assert not [p for p in folder.iterdir() if remote.temp_of(p.name)], "the killed fetch's temp file is gone"
    for name in manifest["files"]:
        assert (folder / name).read_bytes() == (served / name).read_bytes(), name


@pytest.mark.slow
def test_a_file_changed_on_the_server_is_refused_by_its_checksum(served, tmp_path):
    manifest = layout.read_manifest(served)
    tar = served / manifest["splits"]["train"]["shards"][0]["tar"]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    tar.write_bytes(bytes(data))
    with Server(served.parent) as server:
        with pytest.raises(UsageError, match=f"{tar.name} does not match its sha256"):
            train.train(train.Config(**TRAIN, data=f"{server.url}/tiny", cache_dir=str(tmp_path / "cache"),
                                     runs_dir=str(tmp_path / "runs"), name="changed"))
    folder = cached_files(tmp_path / "cache", manifest)
    assert not (folder / tar.name).exists() and not (folder / layout.MANIFEST).exists()
    run = tmp_path / "runs" / "changed"  # held (and marked) before the data is fetched; nothing trained in it
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists(), sorted(run.iterdir())


def test_one_process_fetches_while_another_waits_saying_for_whom(served, tmp_path):
    manifest = layout.read_manifest(served)
    folder, log = cached_files(tmp_path / "cache", manifest), tmp_path / "child.err"
    with Server(served.parent) as server, open(log, "w") as err:
        child = None
        try:
            with one_writer(folder):  # this test is the process that fetches
                child = fetch_in_child(f"{server.url}/tiny", tmp_path / "cache", stderr=err)
                deadline = time.monotonic() + 120
                while "waiting" not in log.read_text():
                    assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                    time.sleep(0.05)
                assert server.requests == [layout.MANIFEST], "it fetched while another process held the cache"
            out, _ = child.communicate(timeout=120)
        finally:
            if child is not None and child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == 0, log.read_text()[-2000:]
    said = log.read_text()
    assert f"{server.url}/tiny: another process fetches it into the cache; waiting" in said
    assert f"held by pid {os.getpid()}" in said
    assert Path(out.strip()) == folder
    assert sorted(server.requests) == sorted([layout.MANIFEST, *manifest["files"]]), "each file fetched once"


def test_a_cache_of_another_dataset_is_never_used(served, tmp_path):
    manifest = layout.read_manifest(served)
    folder = cached_files(tmp_path / "cache", manifest)
    write_json(folder / remote.CACHE_MARKER, {"fingerprint": "0" * 64, "url": "elsewhere"})
    with Server(served.parent) as server:
        with pytest.raises(UsageError, match="holds the files of dataset 000000000000, not"):
            remote.local_folder(f"{server.url}/tiny", tmp_path / "cache", progress=False)
        assert server.requests == [layout.MANIFEST]


def test_a_full_disk_is_one_line_with_the_space_needed(served, tmp_path, monkeypatch):
    manifest = layout.read_manifest(served)
    total = sum(f["bytes"] for f in manifest["files"].values())
    monkeypatch.setattr(remote.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with Server(served.parent) as server:
        with pytest.raises(UsageError, match=rf"needs {total / 1e6:,.1f} MB more .* 0\.0 MB is free"):
            remote.local_folder(f"{server.url}/tiny", tmp_path / "cache", progress=False)


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_a_missing_client_or_a_read_only_target_is_one_line(ingested, tmp_path):
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed here: no missing client to see")
    except ImportError:
        pass
    done = run_cli("train.py", "--data", "gs://bucket/tiny", "--runs-dir", tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: gs://bucket/tiny: gs:// needs the gcsfs package: pip install gcsfs"]
    done = run_cli("ingest/build.py", "--out", ingested, "--publish", "https://127.0.0.1:9/tiny")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "https:// is read-only here" in done.stderr


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on 127.0.0.1, empty, with credentials and the endpoint in the environment s3fs reads."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import urllib.request  # moto's state is the process's, not the server's: start from an empty store
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST")).close()
    for key, value in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                           AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}").items():
        monkeypatch.setenv(key, value)
    import fsspec
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # a cached client still speaks to an earlier server
    fsspec.filesystem("s3").mkdir("bucket")
    try:
        yield port
    finally:
        server.stop()
        fsspec.get_filesystem_class("s3").clear_instance_cache()


@pytest.mark.slow
def test_publish_to_s3_then_train_from_it(ingested, s3, tmp_path):
    assert build.main(["--out", str(ingested), "--publish", "s3://bucket/tiny", "--quiet"]) == 0
    manifest = layout.read_manifest(ingested)
    fs, root = remote.filesystem("s3://bucket/tiny")
    listed = {Path(p).name for p in fs.ls(root, refresh=True)}
    assert listed == {layout.MANIFEST, *manifest["files"]}
    summary = train.train(train.Config(**TRAIN, data="s3://bucket/tiny", cache_dir=str(tmp_path / "cache"),
                                       runs_dir=str(tmp_path / "runs"), name="s3"))
    assert summary["epochs"] == 1
    folder = cached_files(tmp_path / "cache", manifest)
    for name, info in manifest["files"].items():
        assert layout.file_sha256(folder / name) == info["sha256"], name


# ------------------------------------------------------------------ --publish: its target, its marker, its read-back

class Uploads:
    """The fsspec filesystem `--publish` gets, with its uploads seen: `on_put(local, remote)` runs before each file
    goes out; `truncate` names a file that arrives short (a transport that lost its tail)."""

    def __init__(self, fs, on_put=None, truncate=None):
        self.fs, self.on_put, self.truncate = fs, on_put, truncate

    def put_file(self, local, target, **kwargs):
        if self.on_put:
            self.on_put(local, target)
        if Path(local).name == self.truncate:
            return self.fs.pipe_file(target, Path(local).read_bytes()[:-100])
        return self.fs.put_file(local, target, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fs, name)


@pytest.fixture
def uploads(monkeypatch):
    """Make `--publish` upload through an `Uploads`; the test sets its hooks."""
    seen = Uploads(None)
    real = remote.filesystem

    def filesystem(url):
        fs, root = real(url)
        seen.fs = fs
        return seen, root

    monkeypatch.setattr(remote, "filesystem", filesystem)
    return seen


def publish(data, url):
    return build.main(["--out", str(data), "--publish", url, "--quiet"])


def test_publish_refuses_a_target_that_holds_something_else(ingested, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / layout.MANIFEST).write_text('{"name": "another tool"}')
    with pytest.raises(UsageError) as refused:
        publish(ingested, f"file://{target}")
    assert "\n" not in str(refused.value)
    assert "not a fastpix dataset" in str(refused.value) and "manifest.json, notes.txt" in str(refused.value)
    assert sorted(p.name for p in target.iterdir()) == [layout.MANIFEST, "notes.txt"], "nothing written there"
    assert (target / layout.MANIFEST).read_text() == '{"name": "another tool"}'


def test_publish_replaces_a_dataset_or_finishes_a_half_published_one(ingested, tmp_path):
    target = tmp_path / "target"
    # a dataset published before: its files, not the caches that tests beside this one leave in `ingested`
    shutil.copytree(ingested, target, ignore=shutil.ignore_patterns(".*", "resident-*"))
    assert publish(ingested, f"file://{target}") == 0
    (target / layout.MANIFEST).unlink()  # a publish killed before its manifest: the data files only
    assert publish(ingested, f"file://{target}") == 0
    assert (target / layout.MANIFEST).read_bytes() == (ingested / layout.MANIFEST).read_bytes()
    assert not (target / remote.PUBLISH_MARKER).exists(), "the marker is removed when the publish ends"


def test_publish_reads_the_sizes_back_before_it_writes_the_manifest(ingested, tmp_path, uploads):
    manifest = layout.read_manifest(ingested)
    short = sorted(manifest["files"])[0]
    uploads.truncate = short
    target = tmp_path / "target"
    with pytest.raises(UsageError) as refused:
        publish(ingested, f"file://{target}")
    size = manifest["files"][short]["bytes"]
    assert f"{short} has {size - 100} bytes there after the upload, the manifest says {size}" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (target / layout.MANIFEST).exists(), "no reader sees a dataset with a short file"
    uploads.truncate = None
    assert publish(ingested, f"file://{target}") == 0
    for name in manifest["files"]:
        assert (target / name).read_bytes() == (ingested / name).read_bytes(), name


def test_a_second_publish_to_the_same_target_is_refused_while_the_first_runs(ingested, s3, uploads):
    manifest = layout.read_manifest(ingested)
    started, release, results = threading.Event(), threading.Event(), []

    def hold(local, target):
        started.set()
        release.wait(60)

    uploads.on_put = hold
    def first_publish():
        try:
            results.append(publish(ingested, "s3://bucket/tiny"))
        except Exception as err:  # seen by the asserts below, not lost in the thread
            results.append(err)
            started.set()

    first = threading.Thread(target=first_publish)
    first.start()
    try:
        assert started.wait(60) and not results, f"the first publish never started uploading: {results}"
        uploads.on_put = None
        with pytest.raises(UsageError) as refused:
            publish(ingested, "s3://bucket/tiny")
    finally:
        release.set()
        first.join(120)
    said = str(refused.value)
    assert "\n" not in said and f"another publish writes there (pid {os.getpid()} on {socket.gethostname()}" in said
    assert f"delete s3://bucket/tiny/{remote.PUBLISH_MARKER}" in said
    assert results == [0], "the first publish ends as if alone"
    fs, root = remote.filesystem("s3://bucket/tiny")
    fs.invalidate_cache()
    assert {Path(p).name for p in fs.ls(root)} == {layout.MANIFEST, *manifest["files"]}, "its marker is gone"
    assert fs.cat_file(f"{root}/{layout.MANIFEST}") == (ingested / layout.MANIFEST).read_bytes()


def test_the_marker_of_a_publish_that_died_is_taken_over_saying_so(ingested, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "target"
    write_json(target / remote.PUBLISH_MARKER, {"pid": dead.pid, "host": socket.gethostname(),
                                                  "command": "python ingest/build.py", "since": "2026-12-06 09:00:00"})
    assert publish(ingested, f"file://{target}") == 0
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"--publish file://{target}: the marker of a publish that no longer runs (pid {dead.pid} on "
                    f"{socket.gethostname()}, since 2026-12-06 09:00:00) is removed"]
    assert not (target / remote.PUBLISH_MARKER).exists()
    assert (target / layout.MANIFEST).read_bytes() == (ingested / layout.MANIFEST).read_bytes()


def test_the_fetch_and_the_loaders_share_one_record_of_checked_files(served, tmp_path, monkeypatch):
    """What the fetch checked is not hashed again by the loaders' start-up check, nor by the next fetch: both
    read and write the one VERIFIED record (sealed, this dataset's), so each file is hashed once per version."""
    manifest = layout.read_manifest(served)
    folder = remote.local_folder(f"file://{served}", tmp_path / "cache", progress=False)
    monkeypatch.setattr(layout, "file_sha256", lambda path: pytest.fail(f"{path} hashed again"))
    assert remote.local_folder(f"file://{served}", tmp_path / "cache", progress=False) == folder
    layout.verify_digests(folder, manifest, [folder / name for name in manifest["files"]])
