"""ClientWatch, the watch that stops a request's work when its client leaves, both ways it learns of it: told by
the server (the ON_DISCONNECT extension rsafe_proxy.server offers), or reading `receive` in a task of its own
(any other ASGI server). The whole path through the proxy's server: test_gate_availability.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Message

from rsafe_proxy.departure import ON_DISCONNECT, ClientWatch


async def _sent(message: Message) -> None:
    return None


class Server:
    """What the proxy's server does with ON_DISCONNECT: keeps the callback, calls it when the client leaves."""

    def __init__(self, gone: bool = False) -> None:
        self.gone = gone
        self.callback: Callable[[], None] | None = None
        self.registered = 0

    def notify(self, callback: Callable[[], None] | None) -> None:
        self.callback = callback
        self.registered += callback is not None
        if callback is not None and self.gone:
            callback()

    def leave(self) -> None:
        self.gone = True
        if self.callback is not None:
            self.callback()


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_a_server_that_tells_cancels_the_block_when_the_client_leaves() -> None:
    async def main() -> None:
        server = Server()
        scope = {"type": "http", "extensions": {ON_DISCONNECT: server.notify}}
        loop = asyncio.get_running_loop()
        async with ClientWatch.of(scope, _never, _sent) as watch:
            loop.call_later(0.05, server.leave)
            await asyncio.sleep(5)
            raise AssertionError("the block went on after the client left")
        assert watch.left and not watch.started
        assert server.registered == 1 and server.callback is None  # forgotten once the block is over
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_client_gone_before_the_watch_began_stops_the_block_at_its_first_wait() -> None:
    async def main() -> None:
        server = Server(gone=True)
        scope = {"type": "http", "extensions": {ON_DISCONNECT: server.notify}}
        async with ClientWatch.of(scope, _never, _sent) as watch:
            await asyncio.sleep(5)
            raise AssertionError("the block went on after the client left")
        assert watch.left

    asyncio.run(main())


def test_after_the_last_byte_a_departure_cancels_nothing() -> None:
    async def main() -> None:
        server = Server()
        scope = {"type": "http", "extensions": {ON_DISCONNECT: server.notify}}
        async with ClientWatch.of(scope, _never, _sent) as watch:
            await watch.send({"type": "http.response.start", "status": 200, "headers": []})
            await watch.send({"type": "http.response.body", "body": b"done"})
            server.leave()
            await asyncio.sleep(0.01)  # not cancelled
        assert not watch.left and watch.started

    asyncio.run(main())


def test_without_the_extension_the_watch_reads_receive_for_the_disconnect() -> None:
    async def main() -> None:
        messages: asyncio.Queue[Message] = asyncio.Queue()

        async def receive() -> Message:
            return await messages.get()

        loop = asyncio.get_running_loop()
        async with ClientWatch.of({"type": "http"}, receive, _sent) as watch:
            loop.call_later(0.02, messages.put_nowait, {"type": "http.request", "body": b"", "more_body": False})
            loop.call_later(0.05, messages.put_nowait, {"type": "http.disconnect"})
            await asyncio.sleep(5)
            raise AssertionError("the block went on after the client left")
        assert watch.left

    asyncio.run(main())


def test_a_cancellation_from_elsewhere_still_goes_on() -> None:
    async def main() -> None:
        server = Server()
        scope = {"type": "http", "extensions": {ON_DISCONNECT: server.notify}}

        async def served() -> None:
            async with ClientWatch.of(scope, _never, _sent):
                await asyncio.sleep(5)

        task = asyncio.create_task(served())
        await asyncio.sleep(0.02)
        task.cancel()  # a shutdown, say: not the client's departure
        await asyncio.wait([task])
        assert task.cancelled() and server.callback is None

    asyncio.run(main())
