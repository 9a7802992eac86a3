#!/usr/bin/env python3
"""Generate real Apache Flink checkpoints and run real Flink restore experiments, for keystate's tests.

Runs small Java DataStream jobs on a local MiniCluster inside PyFlink's gateway JVM: the user functions
are in KeystateFixtureOps.java (compiled here with javac against the running PyFlink's jars), the job
graphs are assembled below through py4j so every variant is visible in one place. Checkpoints are
written to a scratch directory (--work) and the chosen ones copied into the fixtures directory with
Flink's own view of each (flink-dump.json, via flink_dump.py) and the topology of the job that wrote it
(job-topology.json, via export_topology.py). See README.md beside this file.

    python flink_fixtures.py checkpoints [--only NAME ...]     # fixtures for the running Flink version
    python flink_fixtures.py experiments [--only VARIANT ...]  # restore experiments (Flink 2.x)
    python flink_fixtures.py dump PATH/_metadata               # flink-dump.json of any _metadata

Run it with the Python of a venv that has apache-flink installed (2.3.0, or 1.20.x for format 4);
needs a JDK with javac (17). Each job runs seconds; a job that does not reach its goal in --timeout
seconds is cancelled and the command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parents[2]):  # the sibling flink_dump, and this checkout's keystate package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
# loaded by name so the script runs from any directory and from any venv (the Flink venv needs keystate's
# dependencies: pip install -e <this repository>)
_export: Any = importlib.import_module("keystate.tools.flink_topology")
_dump: Any = importlib.import_module("flink_dump")
describe_stream_graph: Callable[..., dict[str, Any]] = _export.describe_stream_graph
topology_from_description: Callable[[dict[str, Any]], dict[str, Any]] = _export.topology_from_description
dump_metadata: Callable[..., dict[str, Any]] = _dump.dump_metadata
operator_status: Callable[[dict[str, Any]], str] = _dump.operator_status

DEFAULT_OUT = HERE.parent / "fixtures"
BOUNDED_RECORDS = 1000
UNBOUNDED_TO = 10**12

# --------------------------------------------------------------------------------------------------
# Flink in the gateway JVM


class Flink:
    """PyFlink's gateway JVM with the fixture functions loaded."""

    def __init__(self, work: Path) -> None:
        pyflink = importlib.import_module("pyflink")
        self.work = work
        lib = Path(str(pyflink.__file__)).parent / "lib"
        self.version = next(lib.glob("flink-dist-*.jar")).name.removeprefix("flink-dist-").removesuffix(".jar")
        self.major = int(self.version.split(".")[0])
        self.jar = self._compile(lib)
        # The gateway JVM takes its classpath from FLINK_LIB_DIR: PyFlink's jars plus ours, so the fixture
        # functions are on the system classpath (no per-thread context class loader to lose).
        libdir = work / f"lib-{self.version}"
        shutil.rmtree(libdir, ignore_errors=True)
        libdir.mkdir(parents=True)
        for j in [*lib.glob("*.jar"), self.jar]:
            (libdir / j.name).symlink_to(j.resolve())
        os.environ["FLINK_HOME"] = str(lib.parent)  # else PyFlink resets FLINK_LIB_DIR
        os.environ["FLINK_LIB_DIR"] = str(libdir)
        self.gateway: Any = importlib.import_module("pyflink.java_gateway").get_gateway()
        self.jvm = self.gateway.jvm
        running = str(self.jvm.org.apache.flink.runtime.util.EnvironmentInformation.getVersion())
        if running != self.version:
            raise RuntimeError(f"gateway runs Flink {running}, expected {self.version}")

    def _compile(self, lib: Path) -> Path:
        classes = self.work / f"classes-{self.version}"
        jar = self.work / f"keystate-fixture-ops-{self.version}.jar"
        shutil.rmtree(classes, ignore_errors=True)
        classes.mkdir(parents=True)
        cp = os.pathsep.join(str(p) for p in sorted(lib.glob("*.jar")))
        subprocess.run(
            [
                "javac",
                "--release",
                "11",
                "-nowarn",
                "-d",
                str(classes),
                "-cp",
                cp,
                str(HERE / "KeystateFixtureOps.java"),
            ],
            check=True,
        )
        with zipfile.ZipFile(jar, "w") as z:
            for f in sorted(classes.rglob("*.class")):
                z.write(f, f.relative_to(classes).as_posix())
        return jar

    def settings(
        self,
        ckdir: Path,
        backend: str = "hashmap",
        incremental: bool = False,
        restore: Path | None = None,
        allow_non_restored: bool = False,
    ) -> dict[str, str]:
        """Configuration for one job; the key names differ between Flink 1.20 and 2.x."""
        new = self.major >= 2
        s = {
            "execution.checkpointing.interval": "1 s",
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
            ("execution.checkpointing.dir" if new else "state.checkpoints.dir"): ckdir.resolve().as_uri(),
            ("execution.checkpointing.num-retained" if new else "state.checkpoints.num-retained"): "1000",
            ("execution.checkpointing.incremental" if new else "state.backend.incremental"): "true"
            if incremental
            else "false",
            "state.backend.type": backend,
            # RocksDB writes its log directory into every OPTIONS file it checkpoints: keep it neutral
            "state.backend.rocksdb.log.dir": str((self.work / "rocksdb-log").resolve()),
            "restart-strategy.type": "none",
        }
        if restore is not None:
            s["execution.state-recovery.path" if new else "execution.savepoint.path"] = restore.resolve().as_uri()
            s[
                "execution.state-recovery.ignore-unclaimed-state"
                if new
                else "execution.savepoint.ignore-unclaimed-state"
            ] = "true" if allow_non_restored else "false"
        return s

    def env(self, settings: dict[str, str], parallelism: int) -> Any:
        """A new PyFlink StreamExecutionEnvironment with these settings."""
        conf = importlib.import_module("pyflink.common").Configuration()
        for k, v in settings.items():
            conf.set_string(k, v)
        env = importlib.import_module("pyflink.datastream").StreamExecutionEnvironment.get_execution_environment(conf)
        env.set_parallelism(parallelism)
        return env

    @property
    def ops(self) -> Any:
        return self.jvm.keystate.flinkgen.KeystateFixtureOps


# --------------------------------------------------------------------------------------------------
# The jobs


def build_fin(
    flink: Flink,
    j_env: Any,
    *,
    new_upstream: str | None = None,
    new_downstream: str | None = None,
    drop: tuple[str, ...] = (),
    max_par: dict[str, int | None] | None = None,
    par: dict[str, int] | None = None,
    unchain: tuple[str, ...] = (),
    sleep_bounded: int = 10,
    sleep_unbounded: int = 5,
) -> None:
    """The main fixture job (defaults) and its restore variants (keyword arguments).

    bounded-source -> bounded-map -hash-> bounded-sum -> bounded-tag ---\\
                                                                          union -> sink (DiscardingSink)
    unbounded-source -> unbounded-map -hash-> unbounded-count -> unbounded-tag /

    Chains (JobVertices): [bounded-source, bounded-map], [bounded-sum, bounded-tag],
    [unbounded-source, unbounded-map], [unbounded-count, unbounded-tag], [sink]. bounded-source reads
    1000 numbers (2 splits at parallelism 2) at one record per 10 ms and reader, so the bounded branch
    finishes after ~5 s; unbounded-source's readers emit one record per 5 ms. The maps are identities.
    bounded-sum and unbounded-count keep a ValueState ("sum", "count"); unbounded-count has an explicit
    max parallelism of 8, everything else derives it (128).

    new_upstream: "separate" puts new-map (own vertex) between bounded-map and bounded-sum; "chained"
    puts it between bounded-source and bounded-map in their vertex. new_downstream: new-after after
    bounded-tag, "separate" or "chained" into [bounded-sum, bounded-tag]. drop: uids to leave out
    (bounded-sum, unbounded-count). max_par: uid -> explicit max parallelism (None = not set) over the
    default {"unbounded-count": 8}. par: uid -> parallelism. unchain: uids of maps to give their own
    vertex (disableChaining).
    """
    ops = flink.ops
    mp: dict[str, int | None] = {"unbounded-count": 8}
    mp.update(max_par or {})
    par = par or {}

    def tune(stream: Any, uid: str) -> Any:
        if uid in unchain:
            stream.disableChaining()
        if uid in par:
            stream.setParallelism(par[uid])
        if mp.get(uid) is not None:
            stream.setMaxParallelism(mp[uid])
        return stream

    b = tune(ops.source(j_env, "bounded-source", 0, BOUNDED_RECORDS, 0, sleep_bounded), "bounded-source")
    if new_upstream == "chained":
        b = ops.map(b, "new-map", 0)
    b = tune(ops.map(b, "bounded-map", 0), "bounded-map")
    if new_upstream == "separate":
        b = ops.map(b, "new-map", 0).disableChaining()
    if "bounded-sum" not in drop:
        b = tune(ops.keyed(ops.keyBy(b, 10), "bounded-sum", "sum"), "bounded-sum")
    b = tune(ops.map(b, "bounded-tag", 0), "bounded-tag")
    if new_downstream == "separate":
        b = ops.map(b, "new-after", 0).disableChaining()
    elif new_downstream == "chained":
        b = ops.map(b, "new-after", 0)
    u = tune(ops.source(j_env, "unbounded-source", 0, UNBOUNDED_TO, 0, sleep_unbounded), "unbounded-source")
    u = tune(ops.map(u, "unbounded-map", 0), "unbounded-map")
    if "unbounded-count" not in drop:
        u = tune(ops.keyed(ops.keyBy(u, 5), "unbounded-count", "count"), "unbounded-count")
    if "unbounded-tag" not in drop:
        u = tune(ops.map(u, "unbounded-tag", 0), "unbounded-tag")
    tune(ops.discard(ops.union(b, u), "sink"), "sink")


def build_pf(flink: Flink, j_env: Any, *, variant: str = "same") -> None:
    """A partially finished source: pf-source runs at parallelism 3 over only 2 splits, so one reader
    finishes at once and the other two keep reading (FixedSplitsSource, one record per 5 ms and reader).

    pf-source -> pf-map -hash-> pf-count -> pf-sink      chains [pf-source, pf-map], [pf-count, pf-sink]

    variant: "same"; "unchained" (pf-map its own vertex, forward from pf-source); "rebalance" (pf-map its
    own vertex, rebalance from pf-source); "new-between" (new-map, own vertex, between pf-source and an
    unchained pf-map, both edges forward); "rescale" (parallelism 4 everywhere).
    """
    ops = flink.ops
    s = ops.source(j_env, "pf-source", 0, UNBOUNDED_TO, 2, 5)
    if variant == "rebalance":
        s = s.rebalance()
    if variant == "new-between":
        s = ops.map(s, "new-map", 0).disableChaining()
    m = ops.map(s, "pf-map", 0)
    if variant in ("unchained", "new-between"):
        m.disableChaining()
    c = ops.keyed(ops.keyBy(m, 5), "pf-count", "count")
    ops.discard(c, "pf-sink")


# --------------------------------------------------------------------------------------------------
# Running a job


def _py4j_error() -> type[Exception]:
    err: type[Exception] = importlib.import_module("py4j.protocol").Py4JJavaError
    return err


def job_status(j_client: Any) -> str:
    """The job's status name; "GONE" once its per-job MiniCluster has shut down."""
    Py4JJavaError = _py4j_error()
    try:
        return str(j_client.getJobStatus().get().name())
    except Py4JJavaError:
        return "GONE"


def java_cause_chain(java_exc: Any) -> list[dict[str, str | None]]:
    chain: list[dict[str, str | None]] = []
    seen: set[int] = set()
    e = java_exc
    while e is not None and id(e) not in seen and len(chain) < 20:
        seen.add(id(e))
        msg = e.getMessage()
        chain.append({"class": str(e.getClass().getName()), "message": str(msg) if msg is not None else None})
        e = e.getCause()
    return chain


def completed_checkpoints(ckdir: Path, job_id: str) -> list[Path]:
    root = ckdir / job_id
    if not root.is_dir():
        return []
    out = [p for p in root.glob("chk-*") if (p / "_metadata").is_file()]
    return sorted(out, key=lambda p: int(p.name.split("-")[1]))


class Run:
    """One submitted job: waits for checkpoints that satisfy a predicate, then cancels."""

    def __init__(self, flink: Flink, env: Any, ckdir: Path, job_name: str) -> None:
        self.flink = flink
        self.ckdir = ckdir
        self.j_stream_graph = env._generate_stream_graph(clear_transformations=False, job_name=job_name)
        self.description = describe_stream_graph(self.j_stream_graph)
        self.topology = topology_from_description(self.description)
        self.j_client = env._j_stream_execution_environment.executeAsync(self.j_stream_graph)
        self.job_id = str(self.j_client.getJobID().toHexString())
        self.seen: dict[int, dict[str, Any]] = {}
        print(f"  submitted {job_name} as {self.job_id}", flush=True)

    def dumps(self) -> dict[int, dict[str, Any]]:
        """Flink's dump of every completed checkpoint seen so far (id -> dump)."""
        for chk in completed_checkpoints(self.ckdir, self.job_id):
            cid = int(chk.name.split("-")[1])
            if cid in self.seen or time.time() - (chk / "_metadata").stat().st_mtime < 0.3:
                continue
            try:
                self.seen[cid] = dump_metadata(chk / "_metadata")
            except Exception as exc:  # a file still being written (py4j error); retry next round
                print(f"  (chk-{cid} not readable yet: {exc.__class__.__name__}: {str(exc)[:200]})", flush=True)
        return self.seen

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, after: int = 0) -> int:
        """Id of the first completed checkpoint with id > after whose dump satisfies pred."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for cid, d in sorted(self.dumps().items()):
                if cid > after and pred(d):
                    return cid
            st = job_status(self.j_client)
            if st in ("FAILED", "CANCELED", "FINISHED", "GONE"):
                raise RuntimeError(f"job {self.job_id} is {st} while waiting")
            time.sleep(0.5)
        raise TimeoutError(f"no matching checkpoint of job {self.job_id} within {timeout} s")

    def savepoint(self, target: Path, native: bool, timeout: float) -> Path:
        fmt = self.flink.jvm.org.apache.flink.core.execution.SavepointFormatType
        fut = self.j_client.triggerSavepoint(target.resolve().as_uri(), fmt.NATIVE if native else fmt.CANONICAL)
        path = str(fut.get(int(timeout), self.flink.jvm.java.util.concurrent.TimeUnit.SECONDS))
        return Path(path.removeprefix("file:"))

    def cancel(self) -> None:
        try:
            self.j_client.cancel().get()
        except Exception as exc:  # already terminal
            print(f"  cancel: {exc.__class__.__name__}", flush=True)
        deadline = time.time() + 30
        while time.time() < deadline and job_status(self.j_client) not in ("CANCELED", "FAILED", "FINISHED", "GONE"):
            time.sleep(0.2)


def status_by_uid(dump: dict[str, Any], topology: dict[str, Any]) -> dict[str, str]:
    by_id = {op["operator_id"]: op["uid"] for op in topology["operators"]}
    return {by_id.get(o["operatorID"], o["operatorID"]): operator_status(o) for o in dump["operators"]}


# --------------------------------------------------------------------------------------------------
# Copying a checkpoint into the fixtures


def normalizer(root: Path, placeholder: str) -> Callable[[str], str]:
    """Replace the absolute URI or path of ``root`` by ``placeholder``, anywhere in a string."""
    root_s = str(root.resolve())
    prefixes = [f"file://{root_s}", f"file:{root_s}", root_s]

    def norm(s: str) -> str:
        for p in prefixes:
            s = s.replace(p, placeholder)
        return s

    return norm


def copy_checkpoint(ckdir: Path, job_id: str, cid: int, dest: Path) -> Path:
    """Copy chk-<cid> and the shared/ files its _metadata names by absolute path; returns the _metadata."""
    src = ckdir / job_id / f"chk-{cid}"
    dst = dest / job_id / f"chk-{cid}"
    shutil.copytree(src, dst)
    d = dump_metadata(dst / "_metadata", normalizer(ckdir, "<checkpoint-root>"))
    for op in d["operators"]:
        for st in op["subtasks"].values():
            for h in st["managedKeyed"]:
                for f in h.get("files", []):
                    path = f.get("filePath", "")
                    if f["type"] == "FileStateHandle" and path.startswith(f"<checkpoint-root>/{job_id}/shared/"):
                        rel = path.removeprefix("<checkpoint-root>/")
                        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(ckdir / rel, dest / rel)
    return dst / "_metadata"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class FixtureWriter:
    def __init__(self, flink: Flink, out: Path):
        self.flink = flink
        self.base = out / f"generated-flink-{flink.version}"
        self.index_path = self.base / "fixtures.json"
        self.index: dict[str, Any] = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}

    def add_checkpoint(self, name: str, run: Run, cid: int, covers: list[str], **info: Any) -> None:
        dest = self.base / name
        shutil.rmtree(dest, ignore_errors=True)
        md = copy_checkpoint(run.ckdir, run.job_id, cid, dest)
        self._finish(name, dest, md, normalizer(run.ckdir, "<checkpoint-root>"), run, covers, kind="checkpoint", **info)

    def add_savepoint(self, name: str, run: Run, sp_path: Path, sp_root: Path, covers: list[str], **info: Any) -> None:
        dest = self.base / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(sp_path, dest / sp_path.name)
        self._finish(
            name,
            dest,
            dest / sp_path.name / "_metadata",
            normalizer(sp_root, "<savepoint-root>"),
            run,
            covers,
            kind="savepoint",
            **info,
        )

    def _finish(
        self,
        name: str,
        dest: Path,
        md: Path,
        norm: Callable[[str], str],
        run: Run,
        covers: list[str],
        kind: str,
        **info: Any,
    ) -> None:
        dump = dump_metadata(md, norm)
        write_json(dest / "flink-dump.json", dump)
        write_json(dest / "job-topology.json", run.topology)
        write_json(dest / "job-graph-description.json", run.description)
        statuses = status_by_uid(dump, run.topology)
        entry = {
            "metadata": md.relative_to(self.base).as_posix(),
            "kind": kind,
            "flink_version": self.flink.version,
            "metadata_version": dump["metadataVersion"],
            "checkpoint_id": dump["checkpointId"],
            "job_id": run.job_id,
            **info,
            "covers": covers,
            "operator_status": statuses,
            "bytes": tree_size(dest),
        }
        self.index[name] = entry
        write_json(self.index_path, dict(sorted(self.index.items())))
        print(
            f"  wrote {name}: {kind} {dump['checkpointId']}, format {dump['metadataVersion']}, "
            f"{entry['bytes']} bytes, {statuses}",
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# checkpoints


BOUNDED_UIDS = ("bounded-source", "bounded-map", "bounded-sum", "bounded-tag")


def ids_of(topology: dict[str, Any], uids: tuple[str, ...]) -> set[str]:
    return {op["operator_id"] for op in topology["operators"] if op["uid"] in uids}


Pred = Callable[[dict[str, Any]], bool]


def pred_all_running(run: Run) -> Pred:
    def pred(d: dict[str, Any]) -> bool:
        return all(operator_status(o) == "running" for o in d["operators"]) and len(d["operators"]) >= 5

    return pred


def pred_bounded_finished(run: Run) -> Pred:
    bounded = ids_of(run.topology, BOUNDED_UIDS)

    def pred(d: dict[str, Any]) -> bool:
        ff = {o["operatorID"] for o in d["operators"] if o["fullyFinished"]}
        return bounded <= ff and not (ff - bounded)

    return pred


def pred_partial(run: Run) -> Pred:
    src = ids_of(run.topology, ("pf-source",))

    def pred(d: dict[str, Any]) -> bool:
        return any(o["operatorID"] in src and operator_status(o) == "partially_finished" for o in d["operators"])

    return pred


def gen_fin(
    flink: Flink,
    w: FixtureWriter,
    work: Path,
    backend: str,
    incremental: bool,
    timeout: float,
    prefix: str,
    all_running: bool,
    savepoints: tuple[str, ...],
) -> None:
    tag = f"{prefix}-{'incremental' if incremental else 'full'}" if backend == "rocksdb" else prefix
    ckdir = work / f"ck-{tag}"
    shutil.rmtree(ckdir, ignore_errors=True)
    env = flink.env(flink.settings(ckdir, backend, incremental), 2)
    build_fin(flink, env._j_stream_execution_environment)
    run = Run(flink, env, ckdir, f"keystate-fixture-{tag}")
    info = {"backend": backend, "incremental": incremental, "job": "fin (build_fin, parallelism 2)"}
    try:
        if all_running:
            cid = run.wait_for(pred_all_running(run), timeout)
            w.add_checkpoint(
                f"{tag}-all-running",
                run,
                cid,
                [
                    "all operators running",
                    "chained operators (5 vertices, 9 operators)",
                    "explicit max parallelism 8 on unbounded-count (key groups [0,3] [4,7])",
                ],
                **info,
            )
        cid = run.wait_for(pred_bounded_finished(run), timeout)
        if incremental:  # one more, so that it shares files with an earlier incremental checkpoint
            cid = run.wait_for(pred_bounded_finished(run), timeout, after=cid)
        covers = [
            "fully finished operators (the bounded branch: 2 vertices, 4 operators)",
            "running unbounded branch",
            "chained operators (5 vertices, 9 operators)",
            "explicit max parallelism 8 on unbounded-count (key groups [0,3] [4,7])",
        ]
        if backend == "rocksdb":
            covers.append("RocksDB keyed state, " + ("incremental (files in shared/)" if incremental else "full"))
        else:
            covers.append("hashmap keyed state, all inline")
        w.add_checkpoint(f"{tag}-fully-finished", run, cid, covers, **info)
        for fmt in savepoints:
            sp_root = work / f"sp-{tag}-{fmt}"
            shutil.rmtree(sp_root, ignore_errors=True)
            sp = run.savepoint(sp_root, native=(fmt == "native"), timeout=timeout)
            w.add_savepoint(
                f"{tag}-savepoint-{fmt}",
                run,
                sp,
                sp_root,
                [f"{fmt} savepoint ({backend})", "fully finished operators in a savepoint", "chained operators"],
                **{**info, "savepoint_format": fmt},
            )
    finally:
        run.cancel()


def gen_pf(flink: Flink, w: FixtureWriter, work: Path, timeout: float) -> None:
    ckdir = work / "ck-pf"
    shutil.rmtree(ckdir, ignore_errors=True)
    env = flink.env(flink.settings(ckdir), 3)
    build_pf(flink, env._j_stream_execution_environment)
    run = Run(flink, env, ckdir, "keystate-fixture-partially-finished")
    try:
        cid = run.wait_for(pred_partial(run), timeout)
        w.add_checkpoint(
            "hashmap-partially-finished-source",
            run,
            cid,
            [
                "partially finished source: parallelism 3, 2 splits, one reader finished at start",
                "a partially finished chain [pf-source, pf-map]",
                "hashmap keyed state at parallelism 3",
            ],
            backend="hashmap",
            incremental=False,
            job="pf (build_pf, parallelism 3)",
        )
    finally:
        run.cancel()


def cmd_checkpoints(a: argparse.Namespace) -> int:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    flink = Flink(work)
    w = FixtureWriter(flink, Path(a.out))
    print(f"Flink {flink.version}; fixtures in {w.base}", flush=True)
    todo = a.only or ["hashmap", "rocksdb-full", "rocksdb-incremental", "partial"]
    if "hashmap" in todo:
        gen_fin(flink, w, work, "hashmap", False, a.timeout, "hashmap", all_running=True, savepoints=("canonical",))
    if "rocksdb-full" in todo:
        gen_fin(
            flink,
            w,
            work,
            "rocksdb",
            False,
            a.timeout,
            "rocksdb",
            all_running=False,
            savepoints=("native", "canonical"),
        )
    if "rocksdb-incremental" in todo:
        gen_fin(flink, w, work, "rocksdb", True, a.timeout, "rocksdb", all_running=False, savepoints=())
    if "partial" in todo:
        gen_pf(flink, w, work, a.timeout)
    return 0


# --------------------------------------------------------------------------------------------------
# experiments

RULES = [
    ("mixed-finished-chain", "which contain mixed operator finished state"),
    (
        "finished-predecessor",
        "Cannot run a program with fully finished vertices predeceased with the ones not fully finished",
    ),
    ("partial-all-to-all-predecessor", "connected via the ALL_TO_ALL edges"),
    ("partial-running-pointwise-predecessor", "partially finished vertices predeceased with all running ones"),
    ("non-restored-state", "Cannot map checkpoint/savepoint state for operator"),
    ("non-restored-state", "There is no operator for the state"),
    ("max-parallelism-mismatch", "Max parallelism mismatch between checkpoint/savepoint state and new program"),
    ("max-parallelism-mismatch", "and the current maximum parallelism"),
    ("parallelism-exceeds-max", "is lower than the configured parallelism"),
]


def classify(message: str | None) -> str | None:
    for rule, needle in RULES:
        if message and needle in message:
            return rule
    return None


# (name, job, checkpoint fixture, build kwargs, allow_non_restored, description)
Variant = tuple[str, str, str, dict[str, Any], bool, str]


def operators_in_message(message: str | None, known: dict[str, str]) -> tuple[list[str], list[str]]:
    """The operator / vertex IDs (32 hex) a Flink message names, and their uids (``known``: ID -> uid);
    other 32-hex strings (the job ID in a path) are left out. A vertex ID is its head operator's ID."""
    ids = [i for i in re.findall(r"\b[0-9a-f]{32}\b", message or "") if i in known]
    return ids, [known[i] for i in ids]


FIN = "hashmap-fully-finished"
PF = "hashmap-partially-finished-source"
SP = "hashmap-savepoint-canonical"
VARIANTS: list[Variant] = [
    ("same-job", "fin", FIN, {}, False, "the job that wrote the checkpoint, unchanged"),
    (
        "new-upstream-of-finished-separate",
        "fin",
        FIN,
        {"new_upstream": "separate"},
        False,
        "new-map (own vertex, forward from bounded-map) before the fully finished bounded-sum",
    ),
    (
        "new-upstream-of-finished-chained",
        "fin",
        FIN,
        {"new_upstream": "chained"},
        False,
        "new-map chained between bounded-source and bounded-map, in their fully finished vertex",
    ),
    (
        "new-downstream-of-finished-separate",
        "fin",
        FIN,
        {"new_downstream": "separate"},
        False,
        "new-after (own vertex, forward from bounded-tag) after the fully finished bounded branch",
    ),
    (
        "new-downstream-of-finished-chained",
        "fin",
        FIN,
        {"new_downstream": "chained"},
        False,
        "new-after chained after bounded-tag, into the fully finished vertex [bounded-sum, bounded-tag]",
    ),
    (
        "remove-running-stateful",
        "fin",
        FIN,
        {"drop": ("unbounded-count",)},
        False,
        "unbounded-count (running, keyed state) removed; unbounded-tag now chained to unbounded-map",
    ),
    (
        "remove-running-stateful-allow-non-restored",
        "fin",
        FIN,
        {"drop": ("unbounded-count",)},
        True,
        "as remove-running-stateful, with allowNonRestoredState",
    ),
    (
        "remove-running-stateless",
        "fin",
        FIN,
        {"drop": ("unbounded-tag",)},
        False,
        "unbounded-tag (running, no state: subtask entries without handles) removed",
    ),
    (
        "remove-finished",
        "fin",
        FIN,
        {"drop": ("bounded-sum",)},
        False,
        "bounded-sum (fully finished, had keyed state) removed; bounded-tag now chained to bounded-map",
    ),
    (
        "max-parallelism-changed-running",
        "fin",
        FIN,
        {"max_par": {"unbounded-count": 16}},
        False,
        "unbounded-count (running) max parallelism 8 -> 16 (explicit)",
    ),
    (
        "max-parallelism-unset-running",
        "fin",
        FIN,
        {"max_par": {"unbounded-count": None}},
        False,
        "unbounded-count (running) max parallelism 8 (explicit) -> not set (derived 128 by default)",
    ),
    (
        "max-parallelism-changed-finished",
        "fin",
        FIN,
        {"max_par": {"bounded-sum": 256}},
        False,
        "bounded-sum (fully finished) max parallelism 128 (derived) -> 256 (explicit)",
    ),
    (
        "max-parallelism-same-explicit-finished",
        "fin",
        FIN,
        {"max_par": {"bounded-sum": 128}},
        False,
        "bounded-sum (fully finished) max parallelism 128 (derived) -> 128 (explicit)",
    ),
    (
        "rescale-all",
        "fin",
        FIN,
        {
            "par": dict.fromkeys(
                (
                    "bounded-source",
                    "bounded-map",
                    "bounded-sum",
                    "bounded-tag",
                    "unbounded-source",
                    "unbounded-map",
                    "unbounded-count",
                    "unbounded-tag",
                    "sink",
                ),
                3,
            )
        },
        False,
        "every operator parallelism 2 -> 3 (chains unchanged)",
    ),
    (
        "rescale-finished",
        "fin",
        FIN,
        {"par": {"bounded-sum": 3, "bounded-tag": 3}},
        False,
        "the fully finished vertex [bounded-sum, bounded-tag] parallelism 2 -> 3",
    ),
    (
        "rescale-running-keyed",
        "fin",
        FIN,
        {"par": {"unbounded-count": 4, "unbounded-tag": 4}},
        False,
        "the running keyed vertex [unbounded-count, unbounded-tag] parallelism 2 -> 4 (max parallelism 8)",
    ),
    (
        "parallelism-exceeds-max",
        "fin",
        FIN,
        {"par": {"unbounded-count": 9, "unbounded-tag": 9}, "max_par": {"unbounded-count": None}},
        False,
        "unbounded-count parallelism 2 -> 9 with max parallelism not set (the checkpoint's is 8)",
    ),
    (
        "rechain-finished",
        "fin",
        FIN,
        {"unchain": ("bounded-map",)},
        False,
        "bounded-map (fully finished) moved out of [bounded-source, bounded-map] into its own vertex",
    ),
    (
        "rechain-running",
        "fin",
        FIN,
        {"unchain": ("unbounded-map",)},
        False,
        "unbounded-map (running) moved out of [unbounded-source, unbounded-map] into its own vertex",
    ),
    (
        "same-job-from-canonical-savepoint",
        "fin",
        SP,
        {},
        False,
        "the job unchanged, restored from the canonical savepoint taken after the bounded branch finished",
    ),
    (
        "new-upstream-of-finished-chained-from-savepoint",
        "fin",
        SP,
        {"new_upstream": "chained"},
        False,
        "as new-upstream-of-finished-chained, restored from the canonical savepoint",
    ),
    ("pf-same-job", "pf", PF, {"variant": "same"}, False, "the partially finished job, unchanged"),
    (
        "pf-unchained-forward",
        "pf",
        PF,
        {"variant": "unchained"},
        False,
        "pf-map in its own vertex, forward (pointwise) from the partially finished pf-source",
    ),
    (
        "pf-rebalance",
        "pf",
        PF,
        {"variant": "rebalance"},
        False,
        "pf-map in its own vertex, rebalance (all-to-all) from the partially finished pf-source",
    ),
    (
        "pf-new-running-pointwise-predecessor",
        "pf",
        PF,
        {"variant": "new-between"},
        False,
        "new-map (own vertex) between pf-source and an unchained pf-map, forward edges",
    ),
    ("pf-rescale", "pf", PF, {"variant": "rescale"}, False, "the partially finished job at parallelism 4"),
]


def run_variant(flink: Flink, out: Path, work: Path, v: Variant, timeout: float) -> dict[str, Any]:
    name, job, fixture, kwargs, allow, text = v
    base = out / f"generated-flink-{flink.version}"
    index = json.loads((base / "fixtures.json").read_text())
    md = base / index[fixture]["metadata"]
    restored_id = index[fixture]["checkpoint_id"]
    ckdir = work / f"exp-{name}"
    shutil.rmtree(ckdir, ignore_errors=True)
    parallelism = 3 if job == "pf" else 2
    if job == "pf" and kwargs.get("variant") == "rescale":
        parallelism = 4
    env = flink.env(flink.settings(ckdir, restore=md.parent, allow_non_restored=allow), parallelism)
    j_env = env._j_stream_execution_environment
    if job == "fin":
        build_fin(flink, j_env, **kwargs)
    else:
        build_pf(flink, j_env, **kwargs)
    j_sg = env._generate_stream_graph(clear_transformations=True, job_name=f"keystate-restore-{name}")
    desc = describe_stream_graph(j_sg)
    topology = topology_from_description(desc)
    result: dict[str, Any] = {
        "variant": name,
        "description": text,
        "checkpoint": f"{base.name}/{fixture}",
        "metadata": f"{base.name}/{index[fixture]['metadata']}",
        "allow_non_restored_state": allow,
        "topology": topology,
        "job_graph": desc,
    }
    flink_result: dict[str, Any] = {
        "accepted": None,
        "exception_class": None,
        "message": None,
        "rule": None,
        "cause_chain": [],
    }
    Py4JJavaError: Any = _py4j_error()
    print(f"- {name}", flush=True)
    try:
        j_client = j_env.executeAsync(j_sg)
    except Py4JJavaError as exc:
        j_client = None
        chain = java_cause_chain(exc.java_exception)
        flink_result.update(accepted=False, failed_at="submission", cause_chain=chain)
    if j_client is not None:
        job_id = str(j_client.getJobID().toHexString())
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = job_status(j_client)
            if st in ("FAILED", "GONE"):
                try:
                    j_client.getJobExecutionResult().get()
                except Py4JJavaError as exc:
                    flink_result["cause_chain"] = java_cause_chain(exc.java_exception)
                flink_result.update(accepted=False, failed_at="job start")
                break
            done = [
                c
                for c in completed_checkpoints(ckdir, job_id)
                if int(c.name.split("-")[1]) > restored_id and time.time() - (c / "_metadata").stat().st_mtime > 0.3
            ]
            if st == "RUNNING" and done:
                d = dump_metadata(done[0] / "_metadata")
                flink_result.update(
                    accepted=True,
                    first_checkpoint_after_restore=d["checkpointId"],
                    status_after_restore=dict(sorted(status_by_uid(d, topology).items())),
                )
                break
            time.sleep(0.3)
        else:
            flink_result.update(accepted=None, failed_at="timeout: neither failed nor checkpointed")
        with contextlib.suppress(Exception):  # already terminal
            j_client.cancel().get()
    paths = normalizer(out, "<fixtures>"), normalizer(work, "<work>")
    for c in flink_result["cause_chain"]:
        for norm in paths:
            c["message"] = norm(c["message"]) if c["message"] else c["message"]
    if flink_result["accepted"] is False and flink_result["cause_chain"]:
        root = flink_result["cause_chain"][-1]
        flink_result["exception_class"] = root["class"]
        flink_result["message"] = root["message"]
        flink_result["rule"] = classify(root["message"])
        known = {op["operator_id"]: op["uid"] for op in topology["operators"]}
        for op in json.loads((base / fixture / "job-topology.json").read_text())["operators"]:
            known.setdefault(op["operator_id"], op["uid"])
        ids, uids = operators_in_message(root["message"], known)
        flink_result["operator_ids_in_message"] = ids
        flink_result["operators_in_message"] = uids
    result["flink"] = flink_result
    print(
        f"  accepted={flink_result['accepted']} rule={flink_result['rule']} "
        f"{flink_result['exception_class'] or ''}: {(flink_result['message'] or '')[:160]}",
        flush=True,
    )
    return result


def cmd_experiments(a: argparse.Namespace) -> int:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    flink = Flink(work)
    out = Path(a.out)
    target = out / "restore-experiments.json"
    doc = json.loads(target.read_text()) if target.exists() else {"experiments": []}
    results = {(e["flink_version"], e["variant"]): e for e in doc.get("experiments", [])}
    for v in VARIANTS:
        if a.only and v[0] not in a.only:
            continue
        results[(flink.version, v[0])] = {"flink_version": flink.version, **run_variant(flink, out, work, v, a.timeout)}
    order = {v[0]: i for i, v in enumerate(VARIANTS)}
    versions = sorted({k[0] for k in results}, key=lambda x: [int(p) for p in x.split(".")], reverse=True)
    doc = {
        "schema_version": 1,
        "flink_versions": versions,
        "generated_by": "tests/flink/generate/flink_fixtures.py experiments",
        "experiments": [
            results[k] for k in sorted(results, key=lambda k: (versions.index(k[0]), order.get(k[1], 999)))
        ],
    }
    write_json(target, doc)
    print(f"wrote {target}", flush=True)
    return 0


def cmd_dump(a: argparse.Namespace) -> int:
    Flink(Path(a.work))
    print(json.dumps(dump_metadata(a.metadata), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "keystate-flink-gen"),
        help="scratch directory for checkpoints (default: <tmp>/keystate-flink-gen); the URIs "
        "inside the generated _metadata files name it",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="fixtures directory (default: ../fixtures)")
    p.add_argument("--timeout", type=float, default=60, help="seconds one wait may take (default 60)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoints", help="write checkpoint and savepoint fixtures")
    c.add_argument("--only", nargs="*", choices=["hashmap", "rocksdb-full", "rocksdb-incremental", "partial"])
    e = sub.add_parser("experiments", help="run the restore experiments")
    e.add_argument("--only", nargs="*", choices=[v[0] for v in VARIANTS])
    d = sub.add_parser("dump", help="print Flink's view of a _metadata file")
    d.add_argument("metadata")
    a = p.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "checkpoints": cmd_checkpoints,
        "experiments": cmd_experiments,
        "dump": cmd_dump,
    }
    return commands[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
