"""An openpi-style policy transport, as the baseline rtdiff's server is measured against (benchmarks/serve.py).

openpi serves a policy over websockets: the server sends its metadata on
connect, then for every binary message it receives it unpacks a msgpack map
(numpy arrays inside as maps of raw bytes, dtype and shape), calls the policy,
and sends back one msgpack message; the client is a blocking websocket that
sends one message and waits for one. Nothing is validated. This module does the
same with a policy that answers zeros of PushT's shapes, so the comparison is
of transports only.

    python benchmarks/openpi_style.py serve --port 8765   # prints "serving ws://..." when ready
    python benchmarks/openpi_style.py serve --unix PATH   # the same over a Unix socket, beside rtdiff's ipc://
"""

from __future__ import annotations

import argparse
import asyncio

import msgpack
import numpy as np

ACTIONS_SHAPE = (16, 2)


def _pack_array(value):
    if isinstance(value, np.ndarray):
        return {b"__ndarray__": True, b"data": value.tobytes(), b"dtype": value.dtype.str, b"shape": value.shape}
    return value


def _unpack_array(value: dict):
    if b"__ndarray__" in value:
        return np.frombuffer(value[b"data"], dtype=np.dtype(value[b"dtype"])).reshape(value[b"shape"])
    return value


def pack(message: dict) -> bytes:
    return msgpack.packb(message, default=_pack_array)


def unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, object_hook=_unpack_array)


async def _serve(port: int, unix_path: str | None = None) -> None:
    from websockets.asyncio.server import serve, unix_serve

    actions = np.zeros(ACTIONS_SHAPE, np.float32)

    async def handler(websocket) -> None:
        await websocket.send(pack({"server": "openpi-style"}))
        async for data in websocket:
            unpack(data)  # the observation: decoded as openpi does, then unused, as a no-compute policy would
            await websocket.send(pack({"actions": actions}))

    if unix_path:
        listening, shown = unix_serve(handler, unix_path, compression=None, max_size=None), f"unix:{unix_path}"
    else:
        listening, shown = serve(handler, "127.0.0.1", port, compression=None, max_size=None), f"ws://127.0.0.1:{port}"
    async with listening as server:
        print(f"serving {shown}", flush=True)
        await server.serve_forever()


class OpenpiStyleClient:
    """Blocking: one observation out, one action chunk back. `uri`: ws://host:port, or unix:PATH."""

    def __init__(self, uri: str):
        from websockets.sync.client import connect, unix_connect

        if uri.startswith("unix:"):
            self.websocket = unix_connect(uri[len("unix:"):], compression=None, max_size=None)
        else:
            self.websocket = connect(uri, compression=None, max_size=None)
        self.metadata = unpack(self.websocket.recv())

    def infer(self, obs: dict) -> dict:
        self.websocket.send(pack(obs))
        return unpack(self.websocket.recv())

    def close(self) -> None:
        self.websocket.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--unix", help="listen on this Unix socket path instead of a TCP port")
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.unix))


if __name__ == "__main__":
    main()
