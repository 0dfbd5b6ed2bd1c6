"""Reads a metrics exposition on stdin with the official Python client's
parser and prints every sample as JSON: [{"name", "labels", "value", "type"},
...]. The format is the first argument: `openmetrics` (the default, the
OpenMetrics parser) or `prometheus` (the Prometheus text parser). A text the
parser rejects (a malformed line, a missing `# EOF` in OpenMetrics) exits
non-zero with its error."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus

parse = prometheus if sys.argv[1:] == ["prometheus"] else openmetrics
samples = []
for family in parse(sys.stdin.read()):
    for s in family.samples:
        samples.append({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type})
json.dump(samples, sys.stdout)
