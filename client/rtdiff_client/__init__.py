"""rtdiff-client: what a robot, a game engine or a simulator installs to talk to an rtdiff server.

numpy, msgspec and pyzmq only, no torch: the wire format (docs/protocol.md), a `Client` with pipelined
requests, streams and reconnects, and the control-loop pieces (observation history, chunk plan with
crossfades, real-time pacing). rtdiff's own server and sims use this same code.

    from rtdiff_client import Client
    actions = Client("tcp://127.0.0.1:5555", model="pusht").act(obs).arrays["actions"]
"""

from rtdiff_client.client import Client, Reply, ServerError
from rtdiff_client.loop import ChunkPlan, RemoteController
from rtdiff_client.protocol import ERRORS, VERSION, Limits, Message, ProtocolError, decode, decode_reply, encode

__all__ = ["ERRORS", "VERSION", "ChunkPlan", "Client", "Limits", "Message", "ProtocolError", "RemoteController",
           "Reply", "ServerError", "decode", "decode_reply", "encode"]
