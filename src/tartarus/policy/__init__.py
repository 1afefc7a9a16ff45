"""Policy: admission rules, limit caps and placement, loaded from YAML and evaluated in process.

One engine for the daemon and the control plane: `load_policy(path)` validates a file with clear
errors; `PolicyEngine(policy).admit(request)` returns a `Decision` (admit / reject / quarantine, the
reason, the rule and the node) in microseconds, because it is on every create's path.
"""

from tartarus.policy.engine import AdmissionRequest, Decision, PolicyEngine, Verdict
from tartarus.policy.model import Policy, load_policy

__all__ = ["AdmissionRequest", "Decision", "Policy", "PolicyEngine", "Verdict", "load_policy"]
