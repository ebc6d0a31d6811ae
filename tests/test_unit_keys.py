"""Unit: the key layout (`streaming.core.keys`) is Redis Cluster-safe."""

from __future__ import annotations

import secrets

import pytest
from redis.crc import key_slot

from streaming.core import keys
from streaming.core.manager import new_stream_id, valid_stream_id

pytestmark = [pytest.mark.unit]


def slot(key: str) -> int:
    return key_slot(key.encode())


def test_shard_tags_are_spread_over_the_slot_space():
    assert len(keys.SHARD_TAGS) == keys.SHARDS == 16
    for k, tag in enumerate(keys.SHARD_TAGS):
        assert k * 1024 <= slot("{" + tag + "}") < k * 1024 + 300


def test_a_streams_keys_and_channels_share_its_shards_slot():
    for _ in range(50):
        sid = new_stream_id()
        assert valid_stream_id(sid)  # the id format is unchanged: st_ + 128 random bits
        k = keys.shard(sid)
        want = slot("{" + keys.SHARD_TAGS[k] + "}")
        found = {
            slot(f(sid))
            for f in (
                keys.registry,
                keys.events,
                keys.cancel_flag,
                keys.watch,
                keys.cancel_channel,
                keys.ack_channel,
            )
        }
        assert found == {want}
        assert {slot(c) for c in keys.shard_channels(k)} == {want}


def test_streams_of_one_owner_spread_over_every_shard():
    shards = {keys.shard(new_stream_id()) for _ in range(2000)}
    assert shards == set(range(16))


@pytest.mark.parametrize("client", ["10.0.0.1", "key:abc", "jwt:iss|}sub{x", "}", "{}"])
def test_a_clients_keys_share_one_slot(client):
    sid = "st_" + secrets.token_hex(16)
    assert (
        len(
            {
                slot(keys.slots(client)),
                slot(keys.usage(client, "2026-12-02")),
                slot(keys.counted(client, sid)),
            }
        )
        == 1
    )


def test_a_sessions_keys_share_one_slot():
    sid = "se_" + secrets.token_hex(16)
    assert len({slot(keys.session(sid, part)) for part in ("", ":messages", ":live")}) == 1


def test_a_cluster_url_names_its_nodes():
    from streaming.redis_conn import cluster_nodes

    first, nodes = cluster_nodes("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001,h3")
    assert first == "redis://:pw@10.0.0.1:7000"
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("h3", 6379)]
    with pytest.raises(ValueError, match="host:port"):
        cluster_nodes("redis+cluster://")
