"""An OTLP/HTTP trace receiver that prints each trace as a tree: see one request end to end
without a collector, and what tests/test_tracing.py checks the services' spans with.

    python -m loadtests.otlp_receiver --port 4318          # then serve with
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf make serve

It decodes what arrives with opentelemetry-proto (the collector's own message types); --quiet
only counts spans (a sink for the benchmark's tracing-on column).
"""

from __future__ import annotations

import argparse
import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf ExportTraceServiceRequest."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.spans: list[dict] = []
        self.resources: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                message = ExportTraceServiceRequest.FromString(body)
                for resource_spans in message.resource_spans:
                    resource = attributes(resource_spans.resource.attributes)
                    for scope in resource_spans.scope_spans:
                        for span in scope.spans:
                            receiver.spans.append({
                                "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(), "attributes": attributes(span.attributes),
                                "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                                "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                "service": resource.get("service.name")})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str, names: set[str], timeout: float = 20) -> list[dict]:
        """The spans of one trace, once every name in `names` has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = [s for s in self.spans if s["trace_id"] == trace_id]
            if names <= {s["name"] for s in spans}:
                return spans
            time.sleep(0.1)
        raise AssertionError(f"spans of {trace_id}: {[s['name'] for s in self.spans if s['trace_id'] == trace_id]}")


def attributes(pairs) -> dict:
    values = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        values[pair.key] = getattr(pair.value, kind) if kind else None
    return values


def tree(spans: list[dict]) -> str:
    """One trace's spans as an indented tree, children by start time, with durations and attributes."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict]] = {}
    for s in spans:
        children.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
    lines = []

    def show(span: dict, depth: int) -> None:
        shown = {k: v for k, v in span["attributes"].items() if k not in ("url.path", "http.request.method")}
        links = f" links={len(span['links'])}" if span["links"] else ""
        lines.append(f"{'  ' * depth}{span['name']}  {(span['end'] - span['start']) / 1e6:.3f} ms  "
                     + " ".join(f"{k}={v}" for k, v in shown.items()) + links)
        for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start"]):
            show(child, depth + 1)

    for root in sorted(children.get("", []), key=lambda s: s["start"]):
        if root["parent"]:
            lines.append(f"(caller's span {root['parent']})")
        show(root, 1 if root["parent"] else 0)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    p.add_argument("--quiet", action="store_true", help="count spans, print no trees")
    args = p.parse_args()
    receiver = Receiver(args.host, args.port)
    print(f"receiving OTLP/HTTP traces at {receiver.url}/v1/traces", flush=True)
    printed, seen = set(), 0
    try:
        while True:
            time.sleep(1.0)
            if args.quiet:
                if len(receiver.spans) != seen:
                    seen = len(receiver.spans)
                    print(f"{seen} spans", flush=True)
                continue
            quiet_for = {s["trace_id"] for s in receiver.spans} - printed
            for trace_id in sorted(quiet_for):
                spans = [s for s in receiver.spans if s["trace_id"] == trace_id]
                if time.time_ns() - max(s["end"] for s in spans) > 1e9:  # a second with nothing new
                    printed.add(trace_id)
                    print(f"trace {trace_id} ({spans[0]['service']})\n{tree(spans)}\n", flush=True)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
