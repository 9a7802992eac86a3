"""(a) ``_metadata``: arbitrary bytes and JSON, mutations of the golden documents, truncations and flips."""

from __future__ import annotations

import json

import pytest

from keystate.storage import MetadataError, OperatorStateEntry
from keystate.storage.format import parse_metadata
from keystate.storage.format.metadata import DistributionMode
from tests.fuzz.document_properties import WHERE, check_metadata_bytes
from tests.fuzz.harness import FuzzContext, Property, run_property
from tests.fuzz.properties import PROPERTIES
from tests.fuzz.samples import golden_documents


@pytest.mark.parametrize("prop", [p for p in PROPERTIES if p.target == "metadata"], ids=lambda p: p.name)
def test_property(prop: Property, fuzz_context: FuzzContext) -> None:
    assert run_property(prop, fuzz_context) >= prop.ci_examples // 2


def test_the_golden_documents_are_accepted(fuzz_context: FuzzContext) -> None:
    for data in golden_documents().values():
        check_metadata_bytes(fuzz_context, data)
        parse_metadata(data, WHERE)


@pytest.mark.parametrize("field", ["name", "serializer"])
@pytest.mark.parametrize("text", ["\ud800", "ok\udfff", "\udcff\udcff"])
def test_lone_surrogate_in_a_state_name_is_a_metadata_error(field: str, text: str) -> None:
    """Regression: a state (or serializer) name with a lone surrogate parsed, then could not be written
    back (``UnicodeEncodeError`` from ``dump_metadata``, e.g. when the runtime re-commits metadata)."""
    doc = json.loads(golden_documents()["metadata_v1_checkpoint"])
    doc["operators"][1]["subtasks"][1]["operator"][0]["states"][0][field] = text
    data = json.dumps(doc).encode()  # ASCII: the surrogate travels as a \\u escape, as valid JSON allows
    with pytest.raises(MetadataError, match=r"operators\[1\].*lone surrogate") as caught:
        parse_metadata(data, WHERE)
    assert str(caught.value).startswith(WHERE + ":")


def test_the_model_refuses_what_it_could_not_write() -> None:
    with pytest.raises(MetadataError, match="lone surrogate"):
        OperatorStateEntry("\ud800", DistributionMode.SPLIT, (), "bytes")
    with pytest.raises(MetadataError, match="lone surrogate"):
        OperatorStateEntry("ok", DistributionMode.SPLIT, (), "\udfff")
    assert OperatorStateEntry("z\u00e4hler \U0001f600", DistributionMode.UNION, (0,), "str").name.endswith("\U0001f600")
