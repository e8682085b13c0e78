"""Settings: one object per service, read from the environment once, every value checked at start
(services/runtime/config.py); the renamed batch knobs still take their old names."""

import logging
import time

import pytest
import requests

from conftest import running_service
from services.runtime.config import ClassifierSettings, Settings, settings_for


def test_defaults_and_one_object_per_process():
    settings = Settings.from_env("generator")
    assert settings.max_request_items == 256 and settings.max_merged_rows == 32  # the generator's own default
    assert settings.classifier is None and Settings.from_env("classifier").classifier == ClassifierSettings()
    assert settings_for("policy") is settings_for("policy")  # built once, then shared


def test_the_renamed_knobs_keep_their_old_names_with_a_deprecation_line(monkeypatch, caplog):
    monkeypatch.setenv("MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("BATCH_MAX_ROWS", "128")
    with caplog.at_level(logging.WARNING, "services.runtime"):
        settings = Settings.from_env("policy")
    assert (settings.max_request_items, settings.max_merged_rows) == (64, 128)
    assert "MAX_BATCH_SIZE is deprecated: it is now called MAX_REQUEST_ITEMS" in caplog.text
    assert "BATCH_MAX_ROWS is deprecated: it is now called MAX_MERGED_ROWS" in caplog.text
    monkeypatch.setenv("MAX_REQUEST_ITEMS", "8")  # the new name wins where both are set
    assert Settings.from_env("policy").max_request_items == 8


@pytest.mark.parametrize("name, value, accepted", [
    ("MAX_REQUEST_ITEMS", "0", "at least 1"),
    ("MAX_MERGED_ROWS", "many", "not an integer"),
    ("WORKERS", "1000", "from 1 to 256"),
    ("BATCH_WAIT_MS", "-1", "zero or a positive number of milliseconds"),
    ("INLINE_INFER_MS", "nan", "not a number"),
    ("MAX_IMAGE_SIDE", "0", "at least 1"),
    ("FACE_MIN_SCORE", "1.5", "between 0 and 1"),
    ("FACE_MATCH_DISTANCE", "3", "at most 2"),
    ("TEACH_MATCH_THRESHOLD", "2", "from -1 to 1"),
    ("FACE_ANIMAL_THRESHOLD", "0", "above 0 to 1"),
    ("DOMAIN_THRESHOLD", "1.01", "from 0 to 1"),
    ("TEACH_PGVECTOR", "maybe", "auto, on, hnsw, off"),
    ("OTEL_TRACES_EXPORTER", "zipkin", "otlp (or none)"),
])
def test_a_bad_value_names_the_variable_and_what_it_accepts(monkeypatch, name, value, accepted):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name) as refused:
        Settings.from_env("classifier")
    assert accepted in str(refused.value)


def test_traces_go_out_only_over_the_protocol_that_is_installed(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert Settings.from_env("policy").tracing == "otlp"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL='grpc': only http/protobuf"):
        Settings.from_env("policy")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # off: the protocol no longer matters
    assert Settings.from_env("policy").tracing is None


def test_a_service_with_a_bad_setting_stops_and_says_why(tmp_path):
    with running_service("policy", tmp_path, env={"MAX_REQUEST_ITEMS": "-3"}, wait=False) as server:
        deadline = time.monotonic() + 60
        while server.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.process.poll() is not None, "the service kept running with MAX_REQUEST_ITEMS=-3"
        assert "MAX_REQUEST_ITEMS=-3 must be at least 1" in server.log()


def test_info_shows_the_new_names_beside_the_old(policy_server):
    limits = requests.get(f"{policy_server.url}/info", timeout=10).json()["limits"]
    assert limits["max_request_items"] == limits["max_batch_size"] == 256
    assert limits["max_merged_rows"] == limits["batch_max_rows"] == 512
