"""The wire format: round trips, and every malformed message refused with the code docs/protocol.md gives."""

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdiff_client.protocol import ERRORS, Limits, ProtocolError, decode, decode_reply, encode, error_reply, request


def header(**overrides):
    base = {"v": 1, "op": "act", "id": 7, "model": "pusht", "params": {},
            "arrays": [{"name": "obs", "dtype": "float32", "shape": [2, 5]}]}
    base.update(overrides)
    return msgpack.packb(base)


OBS = np.arange(10, dtype=np.float32).reshape(2, 5)


def code_of(frames, limits=Limits()):
    with pytest.raises(ProtocolError) as error:
        decode(frames, limits)
    return error.value.code


def test_request_round_trip():
    frames = request("act", 7, "pusht", {"obs": OBS}, deadline_ms=50, seed=3)
    message = decode([bytes(f) for f in frames])
    assert (message.op, message.id, message.model, message.deadline_ms, message.params) == ("act", 7, "pusht", 50, {"seed": 3})
    np.testing.assert_array_equal(message.arrays["obs"], OBS)


def test_reply_round_trip_and_error_reply():
    header_, arrays = decode_reply([bytes(f) for f in encode({"op": "act", "id": "a", "ok": True}, {"x": OBS[0]})])
    assert header_["ok"] and header_["id"] == "a"
    np.testing.assert_array_equal(arrays["x"], OBS[0])
    header_, arrays = decode_reply([bytes(f) for f in error_reply("bad_array", "no", 3, "act")])
    assert header_["error"] == {"code": "bad_array", "message": "no"} and not header_["ok"] and arrays == {}


@pytest.mark.parametrize("frames,code", [
    ([], "bad_message"),
    ([b"\xc1"], "bad_message"),  # never-used msgpack byte
    ([msgpack.packb([1, 2])], "bad_message"),  # not a map
    ([header(v=2), OBS.tobytes()], "unsupported_version"),
    ([header(op="train"), OBS.tobytes()], "unknown_op"),
    ([header(id=None), OBS.tobytes()], "bad_message"),
    ([header(id=-1), OBS.tobytes()], "bad_message"),
    ([header(id="x" * 65), OBS.tobytes()], "bad_message"),
    ([header(deadline_ms=-5), OBS.tobytes()], "bad_message"),
    ([header(deadline_ms=float("nan")), OBS.tobytes()], "bad_message"),
    ([header(params=[1]), OBS.tobytes()], "bad_message"),
    ([header()], "bad_message"),  # a frame missing
    ([header(), OBS.tobytes(), b"extra"], "bad_message"),
    ([header(), OBS.tobytes()[:-1]], "bad_array"),  # byte count
    ([header(arrays=[{"name": "obs", "dtype": "float64", "shape": [2, 5]}]), OBS.astype(np.float64).tobytes()], "bad_array"),
    ([header(arrays=[{"name": "obs", "dtype": "object", "shape": [1]}]), b"x"], "bad_array"),
    ([header(arrays=[{"name": "obs", "dtype": "float32", "shape": [-1]}]), b""], "bad_array"),
    ([header(arrays=[{"name": "obs", "dtype": "float32", "shape": [2**40]}]), b""], "too_large"),
    ([header(arrays=[{"name": "obs", "dtype": "float32", "shape": [1] * 9}]), b"\0" * 4], "too_large"),
    ([header(arrays=[{"name": "a", "dtype": "uint8", "shape": [1]}] * 2), b"x", b"y"], "bad_message"),  # repeated name
    ([header(arrays=[{"name": "obs", "dtype": "float32"}]), OBS.tobytes()], "bad_message"),
    ([header(arrays=[{"name": f"a{k}", "dtype": "uint8", "shape": [1]} for k in range(9)]), *[b"x"] * 9], "too_large"),
    ([msgpack.packb({"v": 1, "op": "act", "id": 1, "pad": "x" * 70_000})], "too_large"),
    ([msgpack.packb({"v": 1, "op": "act", "id": 1, "blob": b"\0"})], "bad_message"),  # binary values refused
    ([msgpack.packb({"v": 1, "op": "act", "id": 1, "e": msgpack.ExtType(1, b"x")})], "bad_message"),  # ext refused
])
def test_malformed_messages_get_the_documented_code(frames, code):
    assert code_of(frames) == code


def test_the_request_id_survives_into_the_error_when_it_was_readable():
    with pytest.raises(ProtocolError) as error:
        decode([header(op="train", id="req-9"), OBS.tobytes()])
    assert error.value.request_id == "req-9"


def test_every_documented_code_is_in_the_doc():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for code in ERRORS:
        assert f"`{code}`" in doc, code


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_frames_are_refused_or_decoded_never_crash(frames):
    try:
        message = decode(frames)
    except ProtocolError as error:
        assert error.code in ERRORS
    else:  # random bytes that happen to form a valid message must still be consistent
        assert len(message.arrays) == len(frames) - 1


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "op", "id", "model", "deadline_ms", "arrays", "params", "x"]), json_like),
       st.lists(st.binary(max_size=64), max_size=3))
def test_random_headers_are_refused_or_decoded_never_crash(fields, payload):
    frames = [msgpack.packb(fields), *payload]
    try:
        decode(frames)
    except ProtocolError as error:
        assert error.code in ERRORS


def test_fields_of_the_wrong_type_and_look_alike_versions_are_refused_as_such():
    import datetime

    timestamp = msgpack.packb({"v": 1, "op": "info", "id": 1,
                               "params": {"at": datetime.datetime.now(datetime.timezone.utc)}}, datetime=True)
    assert code_of([timestamp]) == "bad_message"  # a Timestamp extension inside the header
    assert code_of([header(v=True), OBS.tobytes()]) == "unsupported_version"
    assert code_of([header(v=1.0), OBS.tobytes()]) == "unsupported_version"
    assert code_of([header(op=3), OBS.tobytes()]) == "bad_message"
    assert code_of([header(op="fly"), OBS.tobytes()]) == "unknown_op"
    assert code_of([header(model=5), OBS.tobytes()]) == "bad_message"
    assert code_of([header(arrays=[{"name": "obs", "dtype": 7, "shape": [2, 5]}]), OBS.tobytes()]) == "bad_message"
    assert code_of([header(arrays=[{"name": "obs", "dtype": "float32", "shape": "2x5"}]), OBS.tobytes()]) == \
        "bad_message"
    assert code_of([header(deadline_at="soon"), OBS.tobytes()]) == "bad_message"
    assert code_of([header(op="info"), OBS.tobytes()]) == "bad_message"  # info, cancel, stats carry no arrays
    assert code_of([header(extra=1), OBS.tobytes()]) == "bad_message"  # a request key the version does not have
    assert code_of([header(params={"seed": [1, 2]}), OBS.tobytes()]) == "bad_message"  # param values are scalars
    assert code_of([header(params={"x" * 65: 1}), OBS.tobytes()]) == "bad_message"  # param names <= 64 characters


BAD_DTYPE = [{"name": "obs", "dtype": "complex64", "shape": [2, 5]}]


@pytest.mark.parametrize("fields,code", [
    ({"v": 2, "op": "train", "id": 1}, "unsupported_version"),  # another version, whatever else its header holds
    ({"op": "train", "id": 1}, "unsupported_version"),  # no version at all
    ({"v": 1, "op": "train"}, "bad_message"),  # id before op
    ({"v": 1, "id": 1, "op": "train", "model": 5}, "unknown_op"),  # op before model
    ({"v": 1, "id": 1, "op": "act", "deadline_ms": float("inf"), "arrays": BAD_DTYPE}, "bad_message"),
    ({"v": 1, "id": 1, "op": "act", "params": 3, "arrays": BAD_DTYPE}, "bad_message"),  # params before arrays
    ({"v": 1, "id": 1, "op": "info", "arrays": BAD_DTYPE}, "bad_message"),  # info takes no arrays at all
    ({"v": 1, "id": 1, "op": "act", "arrays": [{"name": "a", "dtype": "float32", "shape": [2**23]}]},
     "bad_message"),  # the frames (none here) before an array's size
])
def test_a_header_with_several_faults_gets_the_first_in_the_documented_order_in_any_key_order(fields, code):
    for keys in (list(fields), list(reversed(fields))):
        assert code_of([msgpack.packb({key: fields[key] for key in keys})]) == code, keys


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "op", "id", "model", "deadline_ms", "inline_bytes", "arrays", "params",
                                        "x"]), json_like, min_size=2),
       st.sampled_from([1, "act", "info", "train"]))
def test_the_code_of_a_refused_header_does_not_depend_on_the_order_of_its_keys(fields, op):
    fields.setdefault("v", 1)
    fields.setdefault("op", op)

    def code(keys):
        try:
            decode([msgpack.packb({key: fields[key] for key in keys})])
        except ProtocolError as error:
            return error.code
        return "accepted"

    assert code(list(fields)) == code(list(reversed(fields)))


def test_the_message_size_limit_counts_all_its_arrays_together():
    limits = Limits(max_array_bytes=64, max_message_bytes=60)
    two = [{"name": n, "dtype": "float32", "shape": [2, 5]} for n in ("a", "b")]
    assert code_of([header(arrays=two), OBS.tobytes(), OBS.tobytes()], limits) == "too_large"  # 40 bytes, twice
    assert decode([header(arrays=two[:1]), OBS.tobytes()], limits).arrays["a"].shape == (2, 5)


def inline_header(data, **overrides):
    return header(arrays=[{"name": "obs", "dtype": "float32", "shape": [2, 5], "data": data}], **overrides)


def test_small_arrays_travel_inline_and_big_ones_in_frames():
    big = np.arange(4096, dtype=np.float32)  # 16 KiB: over what is left after `obs`
    frames = request("act", 7, "pusht", {"obs": OBS, "big": big}, inline_bytes=16 * 1024)
    assert len(frames) == 2  # the header (obs inside it), then big's frame
    message = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(message.arrays["obs"], OBS)
    np.testing.assert_array_equal(message.arrays["big"], big)
    assert message.inline_bytes == 16 * 1024  # asked of the server for the replies
    assert len(request("act", 7, "pusht", {"obs": OBS})) == 2  # inline_bytes 0: every array in a frame


def test_replies_come_inline_only_as_far_as_asked():
    actions = np.ones((16, 2), np.float32)
    for inline_bytes, frame_count in ((0, 2), (actions.nbytes - 1, 2), (actions.nbytes, 1)):
        frames = encode({"op": "act", "id": 1, "ok": True}, {"actions": actions}, inline_bytes)
        assert len(frames) == frame_count
        _, arrays = decode_reply([bytes(f) for f in frames])
        np.testing.assert_array_equal(arrays["actions"], actions)


@pytest.mark.parametrize("frames,code", [
    ([inline_header(OBS.tobytes()[:-4])], "bad_array"),  # inline byte count
    ([inline_header(OBS.tobytes()), OBS.tobytes()], "bad_message"),  # a frame for an array that is inline
    ([inline_header("not binary")], "bad_message"),
    ([inline_header(OBS.tobytes(), inline_bytes=-1)], "bad_message"),
    ([inline_header(OBS.tobytes(), inline_bytes=10**9)], "bad_message"),
    ([inline_header(OBS.tobytes(), inline_bytes=True)], "bad_message"),
])
def test_malformed_inline_arrays_get_the_documented_code(frames, code):
    assert code_of(frames) == code


def test_a_reply_whose_inline_data_or_frames_do_not_match_is_refused():
    inline = {"v": 1, "op": "act", "id": 1, "ok": True,
              "arrays": [{"name": "a", "dtype": "float32", "shape": [2], "data": b"\0" * 8}]}
    for frames in ([msgpack.packb(inline), b"\0" * 8],  # a frame too many
                   [msgpack.packb({**inline, "arrays": [{**inline["arrays"][0], "data": "text"}]})]):
        with pytest.raises(ProtocolError) as error:
            decode_reply(frames)
        assert error.value.code == "bad_message"
    with pytest.raises(ProtocolError) as error:
        decode_reply([msgpack.packb({**inline, "arrays": [{**inline["arrays"][0], "data": b"\0" * 4}]})])
    assert error.value.code == "bad_array"
