"""The committed generated stubs equal what `make protos` would write today."""

from __future__ import annotations

import filecmp

import pytest

from tests.support import REPO, load_script


@pytest.mark.parametrize("package", ["extproc/_pb/envoy_api", "tests/support/_pb"])
def test_generated_code_is_current(tmp_path, package):
    generate = load_script(REPO / "protos" / "generate.py")
    generate.generate(tmp_path)
    fresh = tmp_path / package
    committed = REPO / package
    names = sorted(p.name for p in fresh.glob("*.py*"))
    assert names == sorted(p.name for p in committed.glob("*.py*") if p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"run `make protos`: {mismatch or errors} differ"


def test_wire_names_match_envoy():
    from extproc._pb.envoy_api import external_processor_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["ExternalProcessor"]
    assert service.full_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    fields = {f.name: f.number for f in pb.ProcessingRequest.DESCRIPTOR.fields}
    assert fields["request_headers"] == 2 and fields["response_body"] == 5
    assert fields["metadata_context"] == 8 and fields["observability_mode"] == 10
    reply = {f.name: f.number for f in pb.ProcessingResponse.DESCRIPTOR.fields}
    assert reply["dynamic_metadata"] == 8 and reply["mode_override"] == 9


def test_rate_limit_service_double_speaks_envoys_api():
    from tests.support._pb import rls_pb2 as rls

    service = rls.DESCRIPTOR.services_by_name["RateLimitService"]
    assert service.full_name == "envoy.service.ratelimit.v3.RateLimitService"
    assert [m.name for m in service.methods] == ["ShouldRateLimit"]
    desc = {f.name: f.number for f in rls.RateLimitDescriptor.DESCRIPTOR.fields}
    assert desc == {"entries": 1, "hits_addend": 3, "is_negative_hits": 4}
    assert rls.RateLimitDescriptor.DESCRIPTOR.fields_by_name["hits_addend"].message_type.full_name == "google.protobuf.UInt64Value"
    assert {f.name: f.number for f in rls.RateLimitRequest.DESCRIPTOR.fields} == {"domain": 1, "descriptors": 2, "hits_addend": 3}
    assert rls.RateLimitResponse.OVER_LIMIT == 2
