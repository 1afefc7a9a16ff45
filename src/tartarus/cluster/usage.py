"""What a node has committed, as SQL shared by the membership view and the placement query.

Used = running sandboxes plus unexpired reservations. An expired reservation holds nothing even before the
reconciler deletes it, so a gateway (or a PostgreSQL restart) that dies mid-placement leaks no capacity.
"""

from __future__ import annotations

# MATERIALIZED: aggregate the placements once and hash-join, rather than let the planner (which has no
# statistics on a young table) re-aggregate them per node in a nested loop (3 ms at 64 nodes vs 0.3).
USED_CTE = """WITH u AS MATERIALIZED (
        SELECT node, sum(vcpus)::bigint AS vcpus, sum(memory_mib)::bigint AS memory_mib,
               sum(disk_mib)::bigint AS disk_mib,
               count(*) AS slots
        FROM cluster.placements
        WHERE state = 'running' OR (state = 'reserved' AND reserved_until > now())
        GROUP BY node)"""
USED_JOIN = "LEFT JOIN u ON u.node = n.name"
USED_COLUMNS = (
    "COALESCE(u.vcpus, 0), COALESCE(u.memory_mib, 0), COALESCE(u.disk_mib, 0), COALESCE(u.slots, 0)"
)
