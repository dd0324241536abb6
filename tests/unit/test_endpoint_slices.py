import pytest

from services.coordinator.endpoint_slices import AddressForm, Endpoint, SliceSet, WatchError, fold_slice
from tests.endpoint_slice_docs import (NAMESPACE, SERVICE, bookmark, dns_address, endpoint, endpoint_slice,
                                       event, gone, slice_list)

FORM = AddressForm(service=SERVICE, namespace=NAMESPACE)


def test_ready_pod_is_active_at_the_address_it_advertises():
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12")], "100")
    assert fold_slice(doc, FORM) == {"worker-0": Endpoint(dns_address("worker-0"), "active")}


def test_readiness_is_serving_because_the_service_publishes_not_ready_addresses():
    starting = endpoint("worker-1", "10.8.1.13", serving=False)
    assert starting["conditions"]["ready"] is True  # what the controller writes for this Service
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12"), starting], "100")
    assert set(fold_slice(doc, FORM)) == {"worker-0"}


def test_terminating_pod_drains_whether_or_not_it_still_serves():
    # A draining worker fails /ready at once but serves KV pulls to the end of its drain.
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12", terminating=True),
                                          endpoint("worker-1", "10.8.1.13", terminating=True, serving=False)],
                         "100")
    assert {w: e.state for w, e in fold_slice(doc, FORM).items()} == {"worker-0": "draining", "worker-1": "draining"}


def test_conditions_without_values_read_as_the_api_documents():
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12"), endpoint("worker-1", "10.8.1.13"),
                                          endpoint("worker-2", "10.8.1.14")], "100")
    doc["endpoints"][0]["conditions"] = {}                # nil ready: ready; nil serving: as ready
    doc["endpoints"][1]["conditions"] = {"ready": False}  # an older controller: serving unset
    del doc["endpoints"][2]["hostname"]                   # not a StatefulSet pod: its name
    assert {w: e.state for w, e in fold_slice(doc, FORM).items()} == {"worker-0": "active", "worker-2": "active"}
    assert fold_slice(doc, FORM)["worker-2"].address == dns_address("worker-2")


def test_ip_addresses_take_the_named_port_and_bracket_ipv6():
    form = AddressForm(service=SERVICE, namespace=NAMESPACE, mode="ip")
    v4 = endpoint_slice("worker-v4", [endpoint("worker-0", "10.8.1.12")], "100")
    v6 = endpoint_slice("worker-v6", [endpoint("worker-0", "fd00:10:8::c")], "100", address_type="IPv6")
    assert fold_slice(v4, form)["worker-0"].address == "http://10.8.1.12:8082"
    assert fold_slice(v6, form)["worker-0"].address == "http://[fd00:10:8::c]:8082"


def test_endpoints_that_are_not_pods_or_lack_the_port_list_nothing():
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12")], "100", port_name="metrics")
    assert fold_slice(doc, FORM) == {}
    doc = endpoint_slice("worker-abcde", [endpoint("worker-0", "10.8.1.12")], "100")
    doc["endpoints"][0]["targetRef"] = None
    assert fold_slice(doc, FORM) == {}
    assert fold_slice(endpoint_slice("worker-empty", [], "100"), FORM) == {}  # endpoints: null


def test_endpoints_split_over_slices_are_merged_and_deleting_one_slice_drops_only_its_pods():
    slices = SliceSet(FORM)
    a = endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12"), endpoint("worker-1", "10.8.1.13")], "100")
    b = endpoint_slice("worker-bbbbb", [endpoint("worker-2", "10.8.1.14")], "101")
    slices.list(slice_list([a, b], "102"))
    assert sorted(slices.desired()) == ["worker-0", "worker-1", "worker-2"]
    assert slices.resource_version == "102"
    assert slices.apply(event("DELETED", endpoint_slice("worker-aaaaa", [], "103")))
    assert sorted(slices.desired()) == ["worker-2"]
    assert not slices.apply(event("DELETED", endpoint_slice("worker-aaaaa", [], "104")))  # already gone


def test_a_pod_in_two_slices_is_draining_if_either_says_it_terminates():
    slices = SliceSet(FORM)
    slices.list(slice_list([endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12")], "100")], "100"))
    moved = endpoint_slice("worker-bbbbb", [endpoint("worker-0", "10.8.1.12", terminating=True)], "101")
    assert slices.apply(event("ADDED", moved))
    assert slices.desired()["worker-0"].state == "draining"
    slices.apply(event("DELETED", endpoint_slice("worker-bbbbb", [], "102")))
    assert slices.desired()["worker-0"].state == "active"  # the other slice still lists it


def test_a_modification_that_changes_no_pod_is_not_a_change():
    slices = SliceSet(FORM)
    doc = endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12")], "100")
    slices.list(slice_list([doc], "100"))
    same = endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12")], "105")
    same["endpoints"][0]["zone"] = "us-central1-b"
    assert not slices.apply(event("MODIFIED", same))
    assert slices.resource_version == "105"
    unready = endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12", serving=False)], "106")
    assert slices.apply(event("MODIFIED", unready)) and slices.desired() == {}


def test_bookmark_moves_the_version_only_and_an_error_event_raises():
    slices = SliceSet(FORM)
    slices.list(slice_list([endpoint_slice("worker-aaaaa", [endpoint("worker-0", "10.8.1.12")], "100")], "100"))
    assert not slices.apply(bookmark("250"))
    assert slices.resource_version == "250" and set(slices.desired()) == {"worker-0"}
    with pytest.raises(WatchError) as err:
        slices.apply(gone("250", "900"))
    assert err.value.code == 410
