"""A runner's ``--middleware tests.otel_setup:tracing``: the OpenTelemetry SDK, finished spans as JSON lines.

Each process writes ``<pid>.jsonl`` in the directory ``NATSRPC_TEST_SPANS`` names, one span a line,
so a test can rebuild a trace that crossed processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from natsrpc.observe.tracing import Tracing


def span_record(span: ReadableSpan) -> dict[str, object]:
    """What a test needs of a finished span."""
    context = span.get_span_context()
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}" if context else "",
        "span_id": f"{context.span_id:016x}" if context else "",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else "",
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "pid": os.getpid(),
    }


class FileExporter(SpanExporter):
    """Appends each finished span to ``<directory>/<pid>.jsonl``."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / f"{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(FileExporter(os.environ["NATSRPC_TEST_SPANS"])))
trace.set_tracer_provider(provider)
tracing = Tracing()
