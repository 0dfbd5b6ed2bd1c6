"""An OpenTelemetry collector stand-in for the end-to-end tests: an OTLP/HTTP
trace receiver on 127.0.0.1 only.

Prints `listening on PORT` once it serves. `POST /v1/traces` takes an
`ExportTraceServiceRequest` in protobuf (`application/x-protobuf`, as
OTLP/HTTP sends it), decoded with the OpenTelemetry project's own generated
classes (the `opentelemetry-proto` package), and answers with an empty
`ExportTraceServiceResponse`. `GET /_spans` returns every span received,
oldest first, as JSON: `trace_id`, `span_id`, `parent_span_id` (hex, empty
for a root), `name`, `kind` (`SPAN_KIND_CONSUMER`, ...), `attributes` (a map
of plain values), `links` (each `trace_id` and `span_id`), `status`
(`STATUS_CODE_ERROR`, ...) and the resource's `service.name`.
`GET /_count` says how many spans there are.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

lock = threading.Lock()
spans = []


def plain(value):
    """An OTLP AnyValue as a plain JSON value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(kvs):
    return {kv.key: plain(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces":
            self.answer(404, b"only /v1/traces", "text/plain")
            return
        if self.headers.get("Content-Type") != "application/x-protobuf":
            self.answer(415, b"OTLP/HTTP protobuf only", "text/plain")
            return
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as e:  # a body that is no ExportTraceServiceRequest
            self.answer(400, str(e).encode(), "text/plain")
            return
        received = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": Span.SpanKind.Name(span.kind),
                            "attributes": attributes(span.attributes),
                            "links": [
                                {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()}
                                for l in span.links
                            ],
                            "status": Status.StatusCode.Name(span.status.code),
                            "service": resource.get("service.name"),
                        }
                    )
        with lock:
            spans.extend(received)
        self.answer(
            200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"
        )

    def do_GET(self):
        with lock:
            if self.path == "/_spans":
                body = json.dumps(spans).encode()
            elif self.path == "/_count":
                body = json.dumps({"count": len(spans)}).encode()
            else:
                self.answer(404, b"", "text/plain")
                return
        self.answer(200, body, "application/json")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
