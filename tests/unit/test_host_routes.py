"""The cross-host routes of a host average (horovod_dpsgd.comm.hosts.cross_routes): every piece reaches its
carrier, and between two hosts with several carriers no pair of processes carries traffic both ways."""

import itertools

import pytest

from horovod_dpsgd.comm.hosts import Routes, cross_routes
from horovod_dpsgd.topology import HostLayout

LAYOUTS = [("2x2", 2), ("2x3", 3), ("2x4", 4), ("2x4", 2), ("3,2", 2), ("2,5", 2), ("4x3", 3)]


def routes_of(layout, shards, pair, step):
    return {r: cross_routes(layout, shards, (layout.host_of(r), *[h for h in pair if h != layout.host_of(r)]), r, step)
            for h in pair for r in layout.hosts[h]}


def delivered(layout, shards, routes):
    """piece -> rank holding the peer host's sum of that piece at the end, per host, following the messages."""
    held = {}
    for rank, route in routes.items():
        for source, piece in zip(route.sources, route.pieces):
            assert rank in routes[source].dests, f"rank {rank} waits for {source}, which does not send to it"
            assert layout.local_index(source) == piece, "a carrier sends its own piece"
            held[rank] = piece
    for rank, route in routes.items():
        if route.relay is not None:
            owner, relayer = route.relay
            assert routes[owner].relay[1] == rank and layout.host_of(owner) == layout.host_of(rank)
            assert routes[relayer].relay[0] == rank
    final = {}
    for rank, piece in held.items():
        route = routes[rank]
        final[rank] = held[route.relay[1]] if route.relay is not None else piece
    return final


@pytest.mark.parametrize("spec, shards", LAYOUTS)
@pytest.mark.parametrize("step", [0, 1, 6, 7])
def test_every_carrier_ends_with_the_peer_hosts_sum_of_its_own_piece(spec, shards, step):
    layout = HostLayout.parse(spec)
    for pair in itertools.combinations(range(layout.num_hosts), 2):
        routes = routes_of(layout, shards, pair, step)
        final = delivered(layout, shards, routes)
        carriers = [r for h in pair for r in layout.hosts[h][:shards]]
        assert sorted(final) == sorted(carriers)
        assert all(final[r] == layout.local_index(r) for r in carriers)
        assert all(routes[r] == Routes() for h in pair for r in layout.hosts[h][shards:])


@pytest.mark.parametrize("spec, shards", LAYOUTS)
@pytest.mark.parametrize("step", [0, 1])
def test_each_pair_of_processes_across_the_link_carries_one_direction(spec, shards, step):
    layout = HostLayout.parse(spec)
    routes = routes_of(layout, shards, (0, 1), step)
    sent = {(rank, dest) for rank, route in routes.items() for dest in route.dests}
    assert len(sent) == 2 * shards  # one piece each way per carrier: one model per host across the link
    assert not any((dest, rank) in sent for rank, dest in sent)


def test_the_two_hosts_take_turns_relaying():
    layout = HostLayout.parse("2x2")
    relaying = [{layout.host_of(r) for r, route in routes_of(layout, 2, (0, 1), step).items() if route.relay}
                for step in range(4)]
    assert relaying == [{0}, {1}, {0}, {1}]


def test_one_carrier_per_host_exchanges_both_ways():
    layout = HostLayout.parse("2x2")
    assert cross_routes(layout, 1, (0, 1), 0, 5) == Routes((2,), (2,), (0,))
    assert cross_routes(layout, 1, (1, 0), 2, 5) == Routes((0,), (0,), (0,))
    assert cross_routes(layout, 1, (0, 1), 1, 5) == Routes()  # not a carrier


def test_a_host_without_a_peer_host_sends_nothing_across():
    layout = HostLayout.parse("3x2")
    assert cross_routes(layout, 2, (2,), 4, 0) == Routes()
