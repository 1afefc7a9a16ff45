"""`bench quarantine`: what admission and quarantine cost, and how fast a live quarantine bites.

- `admission`: the decision itself, in process — policy rules (tenant/template/image/network/labels
  globs), the quarantine verdict, placement, and the limit caps — over a policy of realistic size.
  Its P99 is the `overhead_p99_ms` the issue targets (≤ 1 ms).
- `create`: the create call through the sandbox manager (admission, pooled restore, containment)
  until it returns a running sandbox, and until `run_code("1+1")` answers, for an admitted sandbox
  with no network, one with an `allow` policy, and one quarantined by its verdict (whose CPU is
  clamped, so its first answer is slower by design). `containment` is the part spent applying the
  network policy and quarantine after the restore: the network set-up on the create's clock
  (target ≤ 5 ms P99; the namespace, TAP and uplink of a pooled VMM are made before the call).
- `live_quarantine`: a guest thread keeps sending on a TCP connection to a namespace the benchmark
  creates; the quarantine call is made and `live_quarantine_ms` is the time from the call until the
  last byte that got through (0 when nothing arrived after the call began), by the kernel's receive
  timestamps at the destination; its resolution is the sender's interval (1 ms, slower under TCG).
  `nft_cut` is the commit of the cut itself (from the call until the rule is in force: an upper
  bound that does not depend on the sender), `call` the whole quarantine call (cut, CPU and memory
  clamp, audit record with fsync).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tartarus import audit
from tartarus.bench import nethost
from tartarus.bench.stats import summary_ms
from tartarus.daemon.config import DaemonConfig
from tartarus.daemon.manager import SandboxManager
from tartarus.limits.spec import LimitCaps, resolve_limits
from tartarus.network.policy import NetworkPolicy
from tartarus.policy.engine import AdmissionRequest, PolicyEngine
from tartarus.policy.model import Match, Policy, Rule
from tartarus.sandbox.spec import SandboxSpec
from tartarus.snapshots.build import ensure_snapshot
from tartarus.templates.built import get_template

RULES = 40
SENDER = """
import socket, threading, time
def _send():
    s = socket.create_connection(({host!r}, {port}), timeout=30)
    while True:
        s.send(b"x")
        time.sleep(0.001)
threading.Thread(target=_send, daemon=True).start()
"""


def bench_policy() -> Policy:
    """RULES rules of every kind; the quarantine rule sits last, so most requests scan all rules."""
    rules = []
    for i in range(RULES - 1):
        match = [
            Match(tenant=[f"tenant-{i}-*", f"org-{i}"]),
            Match(template=[f"tpl-{i}*"], network=["full"]),
            Match(image=[f"registry.example/team-{i}/*"]),
            Match(labels={"team": f"t{i}", "tier": "batch"}),
        ][i % 4]
        rules.append(Rule(name=f"rule-{i}", match=match, verdict="admit" if i % 3 else "reject"))
    rules.append(
        Rule(name="risky", match=Match(labels={"risk": "high"}), verdict="quarantine", reason="risk")
    )
    return Policy(rules=rules, limits=LimitCaps(max_ttl_s=3600, default_ttl_s=600))


def bench_admission(samples: int, progress: Callable[[int], None]) -> dict[str, Any]:
    engine = PolicyEngine(bench_policy())
    rng = random.Random(7)
    requests = []
    for i in range(samples):
        labels = {"team": f"t{rng.randrange(60)}", "tier": rng.choice(["batch", "web"])}
        if i % 10 == 0:
            labels["risk"] = "high"
        requests.append(
            AdmissionRequest(
                tenant=f"tenant-{rng.randrange(80)}-x",
                template=rng.choice(["python-ds", "tpl-3a", "node"]),
                network=rng.choice(["none", "allow", "full"]),
                image=rng.choice([None, "registry.example/team-7/app:1"]),
                labels=labels,
            )
        )
    times: list[float] = []
    verdicts = {"admit": 0, "reject": 0, "quarantine": 0}
    caps = engine.policy.limits
    for req in requests:
        t0 = time.perf_counter()
        decision = engine.admit(req)
        if decision.verdict != "reject":
            resolve_limits(template_vcpus=1, template_memory_mib=512, ttl_s=300, caps=caps)
        times.append(time.perf_counter() - t0)
        verdicts[decision.verdict] += 1
    progress(samples)
    return {**summary_ms(times), "rules": RULES, "verdicts": verdicts}


async def _create_rounds(
    manager: SandboxManager,
    template: str,
    samples: int,
    variants: dict[str, tuple[NetworkPolicy, dict[str, str]]],
    progress: Callable[[int], None],
) -> dict[str, Any]:
    totals: dict[str, list[float]] = {k: [] for k in variants}
    answered: dict[str, list[float]] = {k: [] for k in variants}
    containment: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(samples):
        for name, (network, labels) in variants.items():  # interleaved: same machine conditions
            while manager.pooled < manager.config.pool_size:
                await asyncio.sleep(0.01)  # waiting for the pool's background refill
            t0 = time.perf_counter()
            record = await manager.create(SandboxSpec(template, network=network, labels=labels))
            totals[name].append(time.perf_counter() - t0)
            runtime = record.runtime
            assert runtime is not None
            interpreter = await runtime.code_interpreter()
            answer = await interpreter.run_code("1+1")
            answered[name].append(time.perf_counter() - t0)
            containment[name].append(runtime.timings.get("containment", 0.0))
            if answer.result != "2":
                raise RuntimeError(f"run_code('1+1') answered {answer}")
            if name == "quarantined" and runtime.quarantined is None:
                raise RuntimeError("the quarantine verdict was not applied")
            await manager.destroy(record.id)
            progress(1)
    return {
        name: {
            **summary_ms(totals[name]),
            "run_code_answered": summary_ms(answered[name]),
            "containment": summary_ms(containment[name]),
        }
        for name in variants
    }


async def _live_quarantine(
    manager: SandboxManager, template: str, samples: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    with nethost.test_host() as sink:
        allow = NetworkPolicy.model_validate(
            {"mode": "allow", "allow": [{"host": nethost.ADDR, "ports": [sink.port]}]}
        )
        record = await manager.create(SandboxSpec(template, network=allow))
        sandbox_id, runtime = record.id, record.runtime
        assert runtime is not None
        try:
            interpreter = await runtime.code_interpreter()
            started = await interpreter.run_code(SENDER.format(host=nethost.ADDR, port=sink.port))
            if started.error is not None:
                raise RuntimeError(f"sender did not start: {started.error}")
            while manager.pooled < manager.config.pool_size:
                await asyncio.sleep(0.01)  # let the pool's refill finish before measuring
            live: list[float] = []
            calls: list[float] = []
            leaked = 0
            for _ in range(samples):
                # Data must be flowing (again, after the previous release) before each sample.
                async with asyncio.timeout(30):
                    while time.time() - sink.last() > 0.02:
                        await asyncio.sleep(0.005)
                t_call = time.time()  # wall clock, like the sink's kernel timestamps
                await manager.quarantine(sandbox_id, "benchmark", by="bench")
                t_done = time.time()
                await asyncio.sleep(0.3)  # the observation window: any leak would arrive in it
                last = sink.last()
                leaked += sum(1 for t in sink.received if t > t_done + 0.002)
                live.append(max(0.0, last - t_call))
                calls.append(t_done - t_call)
                await manager.release(sandbox_id, by="bench")
                progress(1)
        finally:
            await manager.destroy(sandbox_id)
    cuts = [
        r["network_cut_ms"] / 1000
        for r in audit.read(manager.state_dir)
        if r["action"] == "sandbox.quarantine" and r.get("sandbox") == sandbox_id
    ]
    return {
        **summary_ms(live),
        "call": summary_ms(calls),
        "nft_cut": summary_ms(cuts),
        "chunks_after_call_returned": leaked,
        "send_interval_ms": 1.0,
    }


async def bench_quarantine(
    template_name: str,
    admission_samples: int,
    create_samples: int,
    live_samples: int,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    admission = bench_admission(admission_samples, progress)
    template = get_template(template_name)
    snapshot = ensure_snapshot(template)
    allow = NetworkPolicy.model_validate(
        {"mode": "allow", "allow": [{"host": nethost.ADDR, "ports": [18080]}]}
    )
    variants = {
        "admitted": (NetworkPolicy(), {}),
        "admitted_allow": (allow, {}),
        "quarantined": (allow, {"risk": "high"}),
    }
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        manager = SandboxManager(Path(tmp), DaemonConfig(pool_size=1, policy=bench_policy()))
        manager.open()
        manager.start_pools()
        try:
            create = await _create_rounds(manager, template_name, create_samples, variants, progress)
            live = await _live_quarantine(manager, template_name, live_samples, progress)
        finally:
            await manager.close()
    return {
        "template": template_name,
        "snapshot": snapshot.key,
        "overhead_p99_ms": admission["p99_ms"],
        "admission": admission,
        "create": create,
        "live_quarantine_ms": live["p99_ms"],
        "live_quarantine": live,
        "what": __doc__,
    }
