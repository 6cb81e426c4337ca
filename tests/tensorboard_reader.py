"""Read scalars back from a TensorBoard event file (tensorboardX's protobufs), for the tests."""

from collections import defaultdict


def scalars(path) -> dict[str, list[tuple[int, float]]]:
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found = defaultdict(list)
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):  # TFRecord: length (8), its crc (4), payload, payload crc (4)
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            found[value.tag].append((event.step, value.simple_value))
    return dict(found)
