"""Tartarus: self-hostable microVM sandboxes for untrusted code.

`from tartarus import Sandbox` is the SDK's front door, resolved on first use so that server code, which
imports `tartarus` too (for `__version__`, `tartarus.audit`, ...), never loads the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tartarus.sdk import AsyncSandbox, Sandbox

__all__ = ["AsyncSandbox", "Sandbox"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tartarus import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'tartarus' has no attribute {name!r}")
