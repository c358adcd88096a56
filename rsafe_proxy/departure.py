"""A request's work stops when its client leaves: `ClientWatch` cancels the handler's own task, as `asyncio.timeout`
does, and the block then ends quietly (`left` says so). It learns of the departure from the server where the
server offers to tell (the scope extension ON_DISCONNECT: rsafe_proxy.server calls back when the connection is
lost), else by reading the ASGI `receive` for `http.disconnect` in one small task.

One watcher covers the whole request, the wait for the answer and the sending of a stream alike, where a task
for the work, a task for the watcher and a task group for the stream cost three tasks and a cancel scope."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from starlette.types import Message, Receive, Scope, Send

# The scope extension a server may set: a callable taking a callback (or None, to forget it), called once if the
# client's connection is lost while the request is served (at once if it already was).
ON_DISCONNECT = "rsafe.on_disconnect"
Notify = Callable[[Callable[[], None] | None], None]


class ClientWatch:
    """`async with ClientWatch(receive, send) as watch:` — the block is cancelled when the client leaves (then
    `watch.left`); send through `watch.send`, which ends the watch with the response's last message (a complete
    response makes uvicorn's `receive` say `http.disconnect` too). Enter it only once the request body is read:
    the watcher takes every message `receive` gives from then on."""

    def __init__(self, receive: Receive, send: Send, notify: Notify | None = None) -> None:
        self._receive = receive
        self._send = send
        self._notify = notify
        self.left = False
        self.started = False
        self._watching = False
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> ClientWatch:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("ClientWatch is entered outside a task")
        self._task, self._cancelling = task, task.cancelling()
        self._watching = True
        if self._notify is not None:
            self._notify(self._gone)
        else:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    @classmethod
    def of(cls, scope: Scope, receive: Receive, send: Send) -> ClientWatch:
        """A watch told of the departure by the server where it offers to (ON_DISCONNECT)."""
        notify: Notify | None = scope.get("extensions", {}).get(ON_DISCONNECT)
        return cls(receive, send, notify)

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone()

    def _gone(self) -> None:
        """The client left: the block is cancelled, unless it is over or its response was sent whole."""
        if self._watching and self._task is not None:
            self._watching = False
            self.left = True
            self._task.cancel()

    async def send(self, message: Message) -> None:
        """Send `message`; once the response's last one is sent, a disconnect no longer cancels anything."""
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._watching = False
        await self._send(message)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        self._watching = False
        if self._notify is not None:
            self._notify(None)
        if self._watcher is not None:
            self._watcher.cancel()
        if self.left and self._task is not None:
            # our own cancellation ends here; one from elsewhere (a shutdown) goes on
            return self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError
        return False
