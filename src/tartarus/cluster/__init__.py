"""Coordination for running Tartarus across many hosts, on engines that already solve the hard parts.

PostgreSQL holds membership (leases on the database's clock, epochs for fencing), placement (capacity
reserved in a transaction) and the reconciler's election (a session advisory lock); an S3-compatible
object store holds sandbox state as content-addressed chunks. Nothing here talks to VMs: the `agent` and
`gateway` roles call into these modules, so the single-host `tartarus serve` never loads them.

Modules, one job each: `model` (the typed values), `errors`, `schema` (the `cluster` PostgreSQL schema and
its migrations), `db` (connections), `events` (the audit trail), `usage` (committed capacity as SQL),
`membership` (register, renew, cordon, drain), `lease` (an agent's renewal loop), `reconcile` (one pass:
lost nodes, expired reservations), `election` (one reconciler at a time), `reconciler` (the gateway's
loop), `scoring` (pure ranking), `placement` (reserve, confirm, release, retry), `chunks` and `manifest`
(the pure state format), `objects` (the S3 client) and `statestore` (streaming upload/download).
"""
