"""E2B wire compatibility: E2B's control plane and envd data plane, translated onto Tartarus's /v1 API.

The layer talks to the daemon only over the daemon's own socket, as any client would (docs/e2b.md), so
Tartarus's authentication, tenancy, quotas and audit apply to what it does, and nothing here depends on
the daemon's internals.
"""
