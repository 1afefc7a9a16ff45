"""QMP clients cost no logger per VM, and render messages for the log only under debug logging."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp import Message

from tartarus.runtime.vm import _QMP


class _Unrenderable(Message):
    def __str__(self) -> str:
        raise AssertionError("rendered")


def test_messages_are_rendered_only_for_debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    client = _QMP()
    msg = _Unrenderable({"execute": "query-status"})
    assert client._cb_outbound(msg) is msg
    assert client._cb_inbound(msg) is msg
    with caplog.at_level(logging.DEBUG, logger=client.logger.name), pytest.raises(AssertionError):
        client._cb_outbound(msg)


def test_clients_share_one_logger() -> None:
    """`logging` keeps every logger it makes: one per VM would grow a daemon by one per sandbox."""
    before = len(logging.Logger.manager.loggerDict)
    clients = [_QMP() for _ in range(5)]
    assert len({id(c.logger) for c in clients}) == 1
    assert len(logging.Logger.manager.loggerDict) == before
