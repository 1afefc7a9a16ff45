"""Network policies: request validation, host-side name pinning, and the nft rules they become."""

from __future__ import annotations

import subprocess

import pytest
from pydantic import ValidationError

from tartarus.errors import InvalidArgument
from tartarus.network import nft
from tartarus.network.netns import uplink_addresses
from tartarus.network.policy import NONE, NetworkPolicy, PinnedPolicy, PinnedRule, resolve


def test_default_is_none() -> None:
    assert NetworkPolicy().mode == "none"


@pytest.mark.parametrize(
    "raw",
    [
        {"mode": "allow"},  # allow without rules
        {"mode": "full", "allow": [{"host": "10.0.0.1"}]},  # rules without allow
        {"mode": "allow", "allow": [{"host": "10.0.0.1", "ports": [0]}]},
        {"mode": "allow", "allow": [{"host": "::1"}]},
        {"mode": "allow", "allow": [{"host": "bad host!"}]},
        {"mode": "allow", "allow": [{"host": "10.0.0.1", "protocol": "icmp"}]},
        {"mode": "open"},
    ],
)
def test_bad_policies_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        NetworkPolicy.model_validate(raw)


def test_names_resolve_on_the_host_and_are_pinned() -> None:
    policy = NetworkPolicy.model_validate(
        {"mode": "allow", "allow": [{"host": "localhost", "ports": [443, 80, 80]}, {"host": "192.0.2.7"}]}
    )
    pinned = resolve(policy)
    assert PinnedRule("127.0.0.1/32", (80, 443), "tcp") in pinned.rules
    assert PinnedRule("192.0.2.7/32", (), "tcp") in pinned.rules
    assert pinned.hosts == (("localhost", "127.0.0.1"),)


def test_unresolvable_name_is_a_clear_error() -> None:
    policy = NetworkPolicy.model_validate({"mode": "allow", "allow": [{"host": "no-such-host.invalid"}]})
    with pytest.raises(InvalidArgument, match=r"cannot resolve 'no-such-host\.invalid'"):
        resolve(policy)


def test_none_has_an_empty_egress_chain() -> None:
    assert nft.egress_update(NONE) == "flush chain inet tartarus egress\nflush chain inet tartarus services\n"
    assert nft.egress_update(NONE, empty=True) == "\n"


def test_from_an_empty_chain_a_policy_only_adds() -> None:
    """Deletions wait for an RCU grace period in the kernel; the create path must not delete."""
    text = nft.egress_update(PinnedPolicy("full"), empty=True)
    assert text.strip() and all(line.startswith("add rule ") for line in text.strip().splitlines())
    assert nft.close_gate().startswith("add rule inet tartarus gate")


def test_allow_rules_name_address_protocol_and_ports() -> None:
    policy = PinnedPolicy(
        "allow", (PinnedRule("192.0.2.0/24", (53,), "udp"), PinnedRule("10.1.2.3/32", (), "tcp"))
    )
    text = nft.egress_update(policy)
    assert "ip daddr 192.0.2.0/24 udp dport { 53 } accept" in text
    assert "ip daddr 10.1.2.3/32 meta l4proto tcp accept" in text
    assert "@denied" not in text  # explicit allows may name private ranges


def test_full_denies_private_and_link_local_first() -> None:
    text = nft.egress_update(PinnedPolicy("full"))
    assert text.index("@denied drop") < text.index("ct state new accept")
    assert 'services iifname "tap0" udp dport 53 accept' in text  # the DNS relay, for full only
    assert "udp dport 53" not in nft.egress_update(
        PinnedPolicy("allow", (PinnedRule("192.0.2.1/32", (), "tcp"),))
    )


@pytest.mark.parametrize(
    "policy", [NONE, PinnedPolicy("full"), PinnedPolicy("allow", (PinnedRule("192.0.2.1/32", (80,), "tcp"),))]
)
def test_rulesets_parse(policy: PinnedPolicy) -> None:
    """nft itself accepts every ruleset we generate (-c: check only, in an empty namespace)."""
    for text in (nft.namespace_ruleset(policy), nft.host_ruleset()):
        argv = ["unshare", "--net", "nft", "-c", "-f", "-"]
        result = subprocess.run(argv, input=text, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_uplink_slots_do_not_overlap() -> None:
    assert uplink_addresses(0) == ("198.19.0.1/30", "198.19.0.2/30")
    assert uplink_addresses(16383) == ("198.19.255.253/30", "198.19.255.254/30")
