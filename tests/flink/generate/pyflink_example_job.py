"""A PyFlink job with Python functions, for exercising export_topology.py on a real PyFlink graph.

The same shape as the job of the PyFlink generator of the shared Flink fixtures: a bounded and an unbounded
keyed branch with Python maps and KeyedProcessFunctions, unioned into a filter without uid and a print
sink. Nothing is executed; ``build()`` only defines the pipeline:

    python -m keystate.tools.flink_topology --pyflink-module pyflink_example_job.py -o topology.json

PyFlink fuses each Python map with the following key_by into one Python operator (with the map's uid)
chained to its source, and chains the uid-less Python filter to nothing it can: the exported topology
shows what Flink really runs, which is not the operator list of the Python program.
"""

from __future__ import annotations

import importlib
from typing import Any


def build() -> Any:
    """A StreamExecutionEnvironment (parallelism 2) with the pipeline defined, not executed."""
    common = importlib.import_module("pyflink.common")
    ds = importlib.import_module("pyflink.datastream")
    functions = importlib.import_module("pyflink.datastream.functions")
    number_seq = importlib.import_module("pyflink.datastream.connectors.number_seq")
    state = importlib.import_module("pyflink.datastream.state")
    types = common.Types

    class Acc(functions.KeyedProcessFunction):  # type: ignore[name-defined,misc]
        def __init__(self, name: str) -> None:
            self.name = name

        def open(self, ctx: Any) -> None:
            self.state = ctx.get_state(state.ValueStateDescriptor(self.name, types.LONG()))

        def process_element(self, v: int, ctx: Any) -> Any:
            s = (self.state.value() or 0) + 1
            self.state.update(s)
            yield s

    env = ds.StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(2)
    no_wm = common.WatermarkStrategy.no_watermarks()
    bounded = env.from_source(number_seq.NumberSequenceSource(0, 999), no_wm, "bounded-source").uid("bounded-source")
    bsum = (
        bounded.map(lambda v: v, output_type=types.LONG())
        .uid("bounded-map")
        .key_by(lambda v: v % 10, key_type=types.LONG())
        .process(Acc("sum"), output_type=types.LONG())
        .uid("bounded-keyed-sum")
        .name("bounded-keyed-sum")
    )
    unbounded = env.from_source(number_seq.NumberSequenceSource(0, 10**12), no_wm, "unbounded-source").uid(
        "unbounded-source"
    )
    ucnt = (
        unbounded.map(lambda v: v, output_type=types.LONG())
        .uid("unbounded-slow")
        .key_by(lambda v: v % 5, key_type=types.LONG())
        .process(Acc("count"), output_type=types.LONG())
        .uid("unbounded-keyed-count")
        .name("unbounded-keyed-count")
    )
    bsum.union(ucnt).filter(lambda v: False).print().uid("sink").name("sink")
    return env
