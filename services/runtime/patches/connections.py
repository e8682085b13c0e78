"""Close connections whose request headers do not arrive in time (slowloris).

uvicorn, which BentoML serves with, arms its keep-alive timer only after a response: a
connection that opens and sends nothing, or sends its headers a byte every few seconds, is
kept open for ever. This adds a header timer to uvicorn's h11 protocol (the one it uses when
httptools is not installed, as here): armed when a connection opens and after each response,
cancelled once a request's headers are complete; when it fires, the connection is closed.
The body and the whole request have their own limits in the HTTP layer (BODY_TIMEOUT,
REQUEST_TIMEOUT); the idle keep-alive time is uvicorn's (5 s).
"""

from __future__ import annotations


def install(header_timeout: float) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if getattr(H11Protocol, "header_timeout", None) is not None:
        H11Protocol.header_timeout = header_timeout
        return
    H11Protocol.header_timeout = header_timeout
    connection_made, handle_events, on_response_complete = (
        H11Protocol.connection_made, H11Protocol.handle_events, H11Protocol.on_response_complete)

    def arm(self) -> None:
        disarm(self)
        self._header_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, expire, self)

    def disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def expire(self) -> None:
        self._header_timer = None
        if self.cycle is self._header_cycle and not self.transport.is_closing():  # still no new request
            self.transport.close()

    def patched_connection_made(self, transport) -> None:
        connection_made(self, transport)
        arm(self)

    def patched_handle_events(self) -> None:
        handle_events(self)
        if getattr(self, "_header_timer", None) is not None and self.cycle is not self._header_cycle:
            disarm(self)  # a request's headers are complete

    def patched_on_response_complete(self) -> None:
        on_response_complete(self)
        if not self.transport.is_closing():
            arm(self)  # the next request's headers, on a kept-alive connection

    H11Protocol.connection_made = patched_connection_made
    H11Protocol.handle_events = patched_handle_events
    H11Protocol.on_response_complete = patched_on_response_complete
