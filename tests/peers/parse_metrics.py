"""Reads the OpenMetrics text exposition on stdin with the official Python
client's OpenMetrics parser and prints every sample as JSON: [{"name",
"labels", "value", "type"}, ...]. A text the parser rejects (a malformed line,
a missing `# EOF`) exits non-zero with its error."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type})
json.dump(samples, sys.stdout)
