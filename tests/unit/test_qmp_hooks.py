"""QMP messages are rendered for the log only when debug logging is on (they are on every VM verb)."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp import Message

from tartarus.runtime.vm import _QMP


class _Unrenderable(Message):
    def __str__(self) -> str:
        raise AssertionError("rendered")


def test_messages_are_rendered_only_for_debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    client = _QMP("test")
    msg = _Unrenderable({"execute": "query-status"})
    assert client._cb_outbound(msg) is msg
    assert client._cb_inbound(msg) is msg
    with caplog.at_level(logging.DEBUG, logger=client.logger.name), pytest.raises(AssertionError):
        client._cb_outbound(msg)
