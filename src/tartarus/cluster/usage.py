"""What a node has committed, as SQL shared by the membership view and the placement query.

Used = running sandboxes plus unexpired reservations. An expired reservation holds nothing even before the
reconciler deletes it, so a gateway (or a PostgreSQL restart) that dies mid-placement leaks no capacity.
"""

from __future__ import annotations

USED_JOIN = """LEFT JOIN (
        SELECT node, sum(vcpus) AS vcpus, sum(memory_mib) AS memory_mib, sum(disk_mib) AS disk_mib,
               count(*) AS slots
        FROM cluster.placements
        WHERE state = 'running' OR (state = 'reserved' AND reserved_until > now())
        GROUP BY node) u ON u.node = n.name"""
USED_COLUMNS = (
    "COALESCE(u.vcpus, 0), COALESCE(u.memory_mib, 0), COALESCE(u.disk_mib, 0), COALESCE(u.slots, 0)"
)

# The same sum for one node, read after that node's row is locked (the placement's capacity check).
USED_ON_NODE = """SELECT COALESCE(sum(vcpus), 0), COALESCE(sum(memory_mib), 0), COALESCE(sum(disk_mib), 0),
        count(*)
    FROM cluster.placements
    WHERE node = %s AND (state = 'running' OR (state = 'reserved' AND reserved_until > now()))"""
