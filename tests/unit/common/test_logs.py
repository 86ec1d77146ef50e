import json
import logging

from services.common.logs import JsonFormatter


def test_json_lines_carry_extra_fields():
    record = logging.LogRecord("imsearch.x", logging.INFO, __file__, 1, "embedded %d", (5,), None)
    record.run = "r1"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["msg"] == "embedded 5" and doc["level"] == "info" and doc["run"] == "r1"
    assert doc["logger"] == "imsearch.x" and doc["ts"].endswith("Z")
