"""Secrets never reach MLflow params; flattening is lossless for plain values."""

from __future__ import annotations

from pretrain.tracking import REDACTED, flatten, redact


def test_redact_hides_credentials_at_any_depth() -> None:
    tree = {
        "data": {
            "storage_options": {
                "key": "AKIA",
                "secret": "s3cr3t",
                "client_kwargs": {"endpoint_url": "http://x"},
                "aws_access_key_id": "AKIA2",
                "session_token": "tok",
            }
        },
        "tracking": {"uri": "http://127.0.0.1:5000", "password": "pw"},
    }
    safe = redact(tree)
    opts = safe["data"]["storage_options"]
    assert opts["key"] == REDACTED  # s3fs's name for the access key id
    assert opts["secret"] == REDACTED and opts["aws_access_key_id"] == REDACTED and opts["session_token"] == REDACTED
    assert opts["client_kwargs"]["endpoint_url"] == "http://x"
    assert safe["tracking"]["password"] == REDACTED and safe["tracking"]["uri"] == "http://127.0.0.1:5000"
    flat = flatten(safe)
    assert not any(v in ("AKIA", "s3cr3t", "AKIA2", "tok", "pw") for v in flat.values())


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}, "e": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "{}",
        "e": "None",
    }
