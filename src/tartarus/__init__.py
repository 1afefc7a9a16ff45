"""Tartarus: self-hostable microVM sandboxes for untrusted code."""

from tartarus.sdk import AsyncSandbox, Sandbox

__all__ = ["AsyncSandbox", "Sandbox"]
__version__ = "0.1.0"
