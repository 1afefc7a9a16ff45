"""The cluster roles: `tartarus agent` (one per host, runs the sandboxes) and `tartarus gateway` (the public
API: keys, tenants, placement, and proxying every sandbox call to the agent that owns it).

They sit above the daemon (the agent is the daemon's app behind a guard that admits only gateways) and use
`tartarus.cluster` for membership and placement. `tartarus serve` loads none of this.

Modules: `token` (the shared agent token), `caller` (who a gateway says is calling), `agent` (the guard,
the agent's control plane, its membership), `proxy` (streaming HTTP and WebSocket forwarding), `gateway`
(the gateway's app).
"""
