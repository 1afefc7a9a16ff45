"""Python SDK: `Sandbox` (sync) and `AsyncSandbox`, speaking the daemon's REST API."""

from tartarus.runtime.interpreter import Execution, ExecutionError
from tartarus.sdk._core import CommandResult
from tartarus.sdk.aio import AsyncClient, AsyncSandbox
from tartarus.sdk.sync import Client, Sandbox

__all__ = ["AsyncClient", "AsyncSandbox", "Client", "CommandResult", "Execution", "ExecutionError", "Sandbox"]
