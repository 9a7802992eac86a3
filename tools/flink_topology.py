"""Write keystate's topology file (the `check-restore --topology` file) for an Apache Flink job, read from Flink itself.

Two halves, so that the logic can be tested without a JVM:

* :func:`topology_from_description` (pure Python, no Flink, no py4j) turns a plain, JSON-safe description
  of a Flink job graph into the topology file dict. Unit-test it with hand-written descriptions.
* :func:`describe_stream_graph` (py4j) walks a Flink ``StreamGraph`` and the ``JobGraph`` Flink derives
  from it inside PyFlink's gateway JVM and returns that plain description. :func:`describe_environment`
  does the same for a PyFlink or Java ``StreamExecutionEnvironment`` whose pipeline is defined but not
  executed. :func:`export_topology` = describe + convert.

The description (``"description_version": 1``)::

    {"description_version": 1, "flink_version": "2.3.0", "job_name": "...",
     "nodes": [                       # StreamGraph nodes (operators), by node id
       {"node_id": 3,                 # StreamNode id (only used to reference inputs)
        "name": "bounded-sum",        # operator name
        "uid": "bounded-sum",         # transformation uid, or null when the operator has none
        "user_hash": null,            # setUidHash(...) value (32 hex), or null
        "generated_id": "3dabe40e...",# Flink's generated operator ID (StreamGraphHasherV2; = murmur3(uid))
        "parallelism": 2,
        "max_parallelism": -1,        # as configured on the operator; -1 = not configured (derived)
        "inputs": [{"from_node": 2, "partitioner": "KeyGroupStreamPartitioner", "pointwise": false}]}],
     "vertices": [                    # JobGraph vertices (operator chains), topological order
       {"vertex_id": "3dabe40e...", "name": "bounded-sum -> bounded-tag",
        "parallelism": 2, "max_parallelism": -1,   # -1 = not configured
        "operator_ids": ["...", "..."]}]}          # generated IDs, in JobVertex.getOperatorIDs() order

The conversion rules (:func:`topology_from_description`):

* ``uid``: the operator's uid; an operator without one gets its operator ID (32 hex) as a stand-in uid
  (its ID is a hash of its position in the graph and changes with the graph; no uid to match by).
* ``operator_id``: the user hash when set (``setUidHash``; Flink matches state by it), else the generated
  ID. Always written, so a checker never has to re-derive it.
* ``parallelism``: the vertex's parallelism (equal to the node's).
* ``max_parallelism``: written only when configured (operator ``setMaxParallelism``,
  ``env.setMaxParallelism``, ``pipeline.max-parallelism``), as the vertex's value: Flink checks and
  records max parallelism per JobVertex, so a chained operator takes its chain's value.
* ``inputs``: one per StreamGraph edge, ``from`` = the upstream operator's topology uid, partitioning by the
  edge's partitioner class: Forward -> forward, Rescale -> rescale, KeyGroupStream -> hash,
  Rebalance -> rebalance, Broadcast -> broadcast; any other (Shuffle, Global, custom, ...) by its
  ``isPointwise()``: pointwise -> rescale, all-to-all -> rebalance (same rule class in Flink's checks).
* ``chains``: every JobVertex as a list of topology uids, head (the operator whose ID is the vertex ID)
  first, then the rest in topological order.

CLI::

    # a PyFlink script: a module with a function that defines a pipeline on a new environment and returns it
    python -m keystate.tools.flink_topology --pyflink-module my_job.py --function build -o topology.json
    # a Java job: a jar and a class with `public static void build(StreamExecutionEnvironment env)`
    python -m keystate.tools.flink_topology --jar job.jar --java-class com.example.Job -o topology.json
    # no JVM: convert a description (JSON) written earlier with --description-out
    python -m keystate.tools.flink_topology --from-description description.json -o topology.json

``--description-out FILE`` also writes the intermediate description. The first two need PyFlink (and a
JDK) in the running interpreter; the third needs only the standard library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from keystate.storage.errors import KeystateError, TopologyError

__all__ = [
    "DESCRIPTION_VERSION",
    "PARTITIONER_MODES",
    "describe_environment",
    "describe_stream_graph",
    "export_topology",
    "partitioning_of",
    "topology_from_description",
]

DESCRIPTION_VERSION = 1
TOPOLOGY_FORMAT_VERSION = 1

PARTITIONER_MODES = {
    "ForwardPartitioner": "forward",
    "RescalePartitioner": "rescale",
    "KeyGroupStreamPartitioner": "hash",
    "RebalancePartitioner": "rebalance",
    "BroadcastPartitioner": "broadcast",
}
"""Flink StreamPartitioner simple class name -> keystate partitioning."""


# --------------------------------------------------------------------------------------------------
# Pure part: description -> topology file (no JVM)


def partitioning_of(partitioner: str, pointwise: bool) -> str:
    """keystate partitioning of a Flink edge, from its partitioner's class name and ``isPointwise()``."""
    mode = PARTITIONER_MODES.get(partitioner)
    if mode is not None:
        return mode
    return "rescale" if pointwise else "rebalance"


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise TopologyError(f"invalid Flink job graph description: {msg}")


def topology_from_description(desc: dict[str, Any]) -> dict[str, Any]:
    """The keystate topology file (a dict, ``format_version`` 1 with ``operator_id`` and ``chains``).

    Raises:
        TopologyError: the description is malformed (unknown version, dangling references, an operator in
            no vertex or in two, a vertex without its head operator, duplicate uids).
    """
    _require(
        desc.get("description_version") == DESCRIPTION_VERSION,
        f"description_version must be {DESCRIPTION_VERSION}, found {desc.get('description_version')!r}",
    )
    nodes = desc["nodes"]
    vertices = desc["vertices"]
    by_node = {n["node_id"]: n for n in nodes}
    _require(len(by_node) == len(nodes), "duplicate node_id")

    # vertex of each node, by generated operator ID
    vertex_of_gen: dict[str, dict[str, Any]] = {}
    for v in vertices:
        for oid in v["operator_ids"]:
            _require(oid not in vertex_of_gen, f"operator {oid} is in two vertices")
            vertex_of_gen[oid] = v
    for n in nodes:
        _require(n["generated_id"] in vertex_of_gen, f"operator {n['name']!r} ({n['generated_id']}) is in no vertex")
    _require(len(vertex_of_gen) == len(nodes), "a vertex lists an operator ID that no node has")

    def uid_of(n: dict[str, Any]) -> str:
        return str(n["uid"] if n.get("uid") else (n.get("user_hash") or n["generated_id"]))

    uids = [uid_of(n) for n in nodes]
    _require(len(set(uids)) == len(uids), f"duplicate uids: {sorted(u for u in uids if uids.count(u) > 1)}")

    for n in nodes:
        for e in n["inputs"]:
            _require(
                e["from_node"] in by_node, f"operator {n['name']!r} has an input from unknown node {e['from_node']}"
            )
    order = _topological(nodes)
    operators = []
    for n in order:
        v = vertex_of_gen[n["generated_id"]]
        op: dict[str, Any] = {
            "uid": uid_of(n),
            "operator_id": n.get("user_hash") or n["generated_id"],
            "parallelism": v["parallelism"],
        }
        if v["max_parallelism"] > 0:
            op["max_parallelism"] = v["max_parallelism"]
        inputs = []
        for e in n["inputs"]:
            _require(
                e["from_node"] in by_node, f"operator {n['name']!r} has an input from unknown node {e['from_node']}"
            )
            edge = {
                "from": uid_of(by_node[e["from_node"]]),
                "partitioning": partitioning_of(e["partitioner"], e["pointwise"]),
            }
            if edge not in inputs:
                inputs.append(edge)
        op["inputs"] = inputs
        operators.append(op)

    position = {n["node_id"]: i for i, n in enumerate(order)}
    gen_to_node = {n["generated_id"]: n for n in nodes}
    chains = []
    for v in sorted(vertices, key=lambda v: min(position[gen_to_node[o]["node_id"]] for o in v["operator_ids"])):
        members = [gen_to_node[o] for o in v["operator_ids"]]
        heads = [m for m in members if m["generated_id"] == v["vertex_id"]]
        _require(len(heads) == 1, f"vertex {v['name']!r} ({v['vertex_id']}) does not contain its head operator")
        rest = sorted((m for m in members if m is not heads[0]), key=lambda m: position[m["node_id"]])
        chains.append([uid_of(m) for m in heads + rest])
    return {"format_version": TOPOLOGY_FORMAT_VERSION, "operators": operators, "chains": chains}


def _topological(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done: set[int] = set()
    out: list[dict[str, Any]] = []
    pending = list(nodes)
    while pending:
        rest = [n for n in pending if not all(e["from_node"] in done for e in n["inputs"])]
        ready = [n for n in pending if n not in rest]
        _require(bool(ready), "the graph has a cycle")
        for n in ready:
            done.add(n["node_id"])
            out.append(n)
        pending = rest
    return out


# --------------------------------------------------------------------------------------------------
# py4j part: Flink StreamGraph/JobGraph -> description (needs PyFlink's gateway)


def _gateway() -> Any:
    """PyFlink's py4j gateway (imported lazily: the pure part needs no PyFlink)."""
    return importlib.import_module("pyflink.java_gateway").get_gateway()


def _hex(java_id: Any) -> str:
    return str(java_id.toHexString())


def describe_stream_graph(j_stream_graph: Any, j_job_graph: Any = None) -> dict[str, Any]:
    """The plain description of a Java ``StreamGraph`` (a py4j JavaObject) and of its ``JobGraph``.

    ``j_job_graph`` defaults to ``j_stream_graph.getJobGraph()`` (Flink's own StreamingJobGraphGenerator,
    so chaining is decided exactly as at submission). Operator IDs come from Flink's StreamGraphHasherV2,
    the hasher the JobGraph generator uses.
    """
    gw = _gateway()
    jvm = gw.jvm
    if j_job_graph is None:
        j_job_graph = j_stream_graph.getJobGraph()
    hashes = jvm.org.apache.flink.streaming.api.graph.StreamGraphHasherV2().traverseStreamGraphAndGenerateHashes(
        j_stream_graph
    )
    OperatorID = jvm.org.apache.flink.runtime.jobgraph.OperatorID
    nodes = []
    # getStreamNodes() exists in every release (the sorted variant only from 2.0); a Collection, so toArray()
    for node in sorted(j_stream_graph.getStreamNodes().toArray(), key=lambda n: int(n.getId())):
        nid = int(node.getId())
        inputs = []
        for edge in node.getInEdges():
            part = edge.getPartitioner()
            inputs.append(
                {
                    "from_node": int(edge.getSourceId()),
                    "partitioner": str(part.getClass().getSimpleName()),
                    "pointwise": bool(part.isPointwise()),
                }
            )
        uid = node.getTransformationUID()
        user_hash = node.getUserHash()
        nodes.append(
            {
                "node_id": nid,
                "name": str(node.getOperatorName()),
                "uid": str(uid) if uid is not None else None,
                "user_hash": str(user_hash).lower() if user_hash is not None else None,
                "generated_id": _hex(OperatorID(hashes.get(nid))),
                "parallelism": int(node.getParallelism()),
                "max_parallelism": int(node.getMaxParallelism()),
                "inputs": inputs,
            }
        )
    vertices = []
    for v in j_job_graph.getVerticesSortedTopologicallyFromSources():
        vertices.append(
            {
                "vertex_id": _hex(v.getID()),
                "name": str(v.getName()),
                "parallelism": int(v.getParallelism()),
                "max_parallelism": int(v.getMaxParallelism()),
                "operator_ids": [_hex(p.getGeneratedOperatorID()) for p in v.getOperatorIDs()],
            }
        )
    return {
        "description_version": DESCRIPTION_VERSION,
        "flink_version": str(jvm.org.apache.flink.runtime.util.EnvironmentInformation.getVersion()),
        "job_name": str(j_stream_graph.getJobName()),
        "nodes": nodes,
        "vertices": vertices,
    }


def stream_graph_of(env: Any, clear_transformations: bool = False) -> Any:
    """The Java StreamGraph of a PyFlink ``StreamExecutionEnvironment`` (Python operators configured and
    chained as PyFlink's execute would) or of a Java one (py4j JavaObject)."""
    if hasattr(env, "_generate_stream_graph"):
        return env._generate_stream_graph(clear_transformations=clear_transformations)
    return env.getStreamGraph(clear_transformations)


def describe_environment(env: Any) -> dict[str, Any]:
    """The description of the pipeline defined on ``env`` (PyFlink or Java environment); not executed,
    and its transformations are kept, so ``env`` can still be executed afterwards."""
    return describe_stream_graph(stream_graph_of(env, clear_transformations=False))


def export_topology(env_or_stream_graph: Any) -> dict[str, Any]:
    """The keystate topology file (dict) of a PyFlink/Java environment or of a Java StreamGraph."""
    obj = env_or_stream_graph
    if hasattr(obj, "getStreamNodes"):
        return topology_from_description(describe_stream_graph(obj))
    return topology_from_description(describe_environment(obj))


# --------------------------------------------------------------------------------------------------
# CLI


def _load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write keystate's topology file for a Flink job (see module docstring).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pyflink-module", help="Python file whose FUNCTION() returns a StreamExecutionEnvironment")
    src.add_argument("--java-class", help="Java class with public static void build(StreamExecutionEnvironment)")
    src.add_argument("--from-description", help="a description JSON (no JVM needed)")
    p.add_argument("--function", default="build", help="function of --pyflink-module (default: build)")
    p.add_argument("--jar", action="append", default=[], help="jar(s) holding --java-class and its functions")
    p.add_argument("--parallelism", type=int, help="with --java-class: default parallelism of the environment")
    p.add_argument("--description-out", help="also write the intermediate description (JSON) here")
    p.add_argument("-o", "--output", help="topology file to write (default: stdout)")
    a = p.parse_args(argv)

    if a.from_description:
        desc = json.loads(Path(a.from_description).read_text())
    elif a.pyflink_module:
        env = getattr(_load_module(a.pyflink_module), a.function)()
        desc = describe_environment(env)
    else:
        env = importlib.import_module("pyflink.datastream").StreamExecutionEnvironment.get_execution_environment()
        if a.jar:
            env.add_jars(*[Path(j).resolve().as_uri() for j in a.jar])
        if a.parallelism:
            env.set_parallelism(a.parallelism)
        jvm = _gateway().jvm
        cls = jvm.Thread.currentThread().getContextClassLoader().loadClass(a.java_class)
        j_env_class = jvm.java.lang.Class.forName(
            "org.apache.flink.streaming.api.environment.StreamExecutionEnvironment",
            True,
            jvm.Thread.currentThread().getContextClassLoader(),
        )
        to_jarray = importlib.import_module("pyflink.util.java_utils").to_jarray
        method = cls.getMethod("build", to_jarray(jvm.java.lang.Class, [j_env_class]))
        method.invoke(None, to_jarray(jvm.java.lang.Object, [env._j_stream_execution_environment]))
        desc = describe_environment(env)
    if a.description_out:
        Path(a.description_out).write_text(json.dumps(desc, indent=2) + "\n")
    text = json.dumps(topology_from_description(desc), indent=2) + "\n"
    if a.output:
        Path(a.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def console_main() -> None:
    """``python -m keystate.tools.flink_topology``: bad input is one line on stderr and exit 2."""
    try:
        code = main()
    except (KeystateError, OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        sys.stderr.write(f"flink-topology: error: {exc}\n")
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    console_main()
