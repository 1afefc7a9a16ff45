"""The gVisor backend: sandboxes run by `runsc` (systrap platform) on hosts where KVM is unusable.

Self-contained for now: it serves a template's root filesystem as an OCI bundle and connects the
unchanged guest agent protocol client (`runtime.agent.AgentClient`) to the agent inside the container.
"""
