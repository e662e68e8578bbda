"""A fast OpenAI-compatible upstream for proxy benchmarks: fixed answers, no model, raw asyncio HTTP/1.1.

It answers GET /v1/models and POST /v1/chat/completions (a fixed 7-token answer; with "stream": true, seven
content chunks, a finishing chunk with usage, and [DONE]) on keep-alive connections, at several thousand
requests per second on one core, so a proxy in front of it is measured, not the model.

    python bench/upstream_stub.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

WORDS = ["Hello", " there", ",", " how", " are", " you", "?"]
USAGE = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)}
ANSWER = json.dumps({"id": "chatcmpl-stub", "object": "chat.completion", "created": 1, "model": "stub",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                                  "finish_reason": "stop"}], "usage": USAGE}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model", "created": 1, "owned_by": "stub",
                                                 "max_model_len": 4096}]}).encode()


def _chunk(delta: dict, finish: str | None, usage: dict | None = None) -> bytes:
    body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": "stub",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


EVENTS = (b"".join(_chunk({"content": w}, None) for w in WORDS) + _chunk({}, "stop", USAGE) + b"data: [DONE]\n\n")


def response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


class Stub(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
            if "/models" in head.split(" ", 2)[1]:
                self.transport.write(response(MODELS))
            elif b'"stream":true' in body.replace(b" ", b""):
                self.transport.write(response(EVENTS, b"text/event-stream"))
            else:
                self.transport.write(response(ANSWER))


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    asyncio.run(serve(int(sys.argv[1])))
