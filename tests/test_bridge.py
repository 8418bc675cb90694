"""The HTTP bridge against real replicas (Ray) and a real broker: answers, 4xx reasons, token, retries, logging."""
import asyncio
import time

import aiohttp
import pytest
import ray
from kafka import KafkaConsumer, KafkaProducer

from serving_bridge.app import ServingBridge, UserViews, bound_port, make_app, start_site
from simulator import embedded
from streaming import schemas
from streaming.topics import ensure_topics, topic_name
from tests.loop_helpers import loop_config, start_replicas

pytestmark = pytest.mark.integration

USER = 0   # a KuaiRand user with a pre-week history (the bridge's view of them is warm)



def impressions_by_id(stream_cfg, wanted: set[str], timeout_s: float = 20) -> dict[str, dict]:
    consumer = KafkaConsumer(topic_name(stream_cfg, "impressions"), auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1000, **stream_cfg.client_options())
    found, deadline = {}, time.monotonic() + timeout_s
    try:
        while wanted - set(found) and time.monotonic() < deadline:
            for record in consumer:
                imp = schemas.decode_impression(record.value)
                assert record.key == str(imp["user_id"]).encode(), "impressions are keyed by user id (layout 2)"
                found[imp["request_id"]] = imp
    finally:
        consumer.close()
    return found


@pytest.fixture(scope="module")
def replicas(ray_session, tmp_path_factory):
    cfg = loop_config(tmp_path_factory.mktemp("bridge"))
    handles = start_replicas(cfg)
    yield cfg, handles
    for h in handles:
        ray.kill(h)


def warm_views(cfg) -> UserViews:
    """The embedded world's views of its users (warm: pre-week histories) and catalogue durations."""
    return UserViews(embedded.user_views(short_len=cfg.model.max_short, long_len=cfg.model.max_long),
                     embedded.item_catalogue().duration_of)


async def with_bridge(cfg, handles, body):
    bridge = ServingBridge.from_config(cfg, handles, views=warm_views(cfg))
    runner = await start_site(make_app(bridge), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{bound_port(runner)}") as session:
            return await body(bridge, session)
    finally:
        await runner.cleanup()


def test_recommend_logs_impressions_and_rejects_bad_requests(replicas, stream_config, tmp_path):
    cfg, handles = replicas
    cfg = loop_config(tmp_path)
    cfg.stream = stream_config
    ensure_topics(stream_config, kinds=("impressions", "feedback"))

    async def body(bridge, session):
        answers = []
        for _ in range(6):
            async with session.post("/recommend", json={"user_id": USER, "top_k": 3}) as resp:
                assert resp.status == 200, await resp.text()
                answers.append(await resp.json())
        for ans in answers:
            assert ans["model_version"] == 1 and len(ans["items"]) == 3
            assert all(it["logprob"] <= 0 and len(it["semantic_id"]) == 3 for it in ans["items"])
        served = ray.get([h.health.remote() for h in handles], timeout=30)
        assert all(s["requests_served"] > 0 for s in served), "round robin should use both replicas"

        bad = [(b"{nope", "not valid JSON"), (b'{"top_k": 2}', "user_id"), (b'{"user_id": -1}', "user_id"),
               (b'{"user_id": 1, "top_k": 99}', "top_k"), (b'{"user_id": 1, "colour": 1}', "unknown fields"),
               (b'{"user_id": 1, "context": {"profile": [1], "short": {"item_id": [1]}, "long": {}}}',
                "context.short.duration_s"), (b"[1, 2]", "JSON object")]
        for payload, reason in bad:
            async with session.post("/recommend", data=payload) as resp:
                assert resp.status == 400, payload
                assert reason in (await resp.json())["error"]
        async with session.get("/version") as resp:
            assert (await resp.json())["model_version"] == 1
        async with session.get("/healthz") as resp:
            assert resp.status == 200 and (await resp.json())["replicas"] == 2

        # the server's own view of the user follows the feedback topic
        item = answers[0]["items"][0]["item_id"]
        producer = KafkaProducer(**stream_config.client_options())
        deadline = time.monotonic() + 30
        while item not in bridge.views.context(USER)["short"]["item_id"][-3:]:
            assert time.monotonic() < deadline, "the bridge never saw the feedback"
            producer.send(topic_name(stream_config, "feedback"), schemas.encode_feedback(
                {"request_id": answers[0]["request_id"], "user_id": USER, "item_id": item, "ts": time.time(),
                 "play_time_s": 12.0, "dislike": False, "like": True}), key=str(USER).encode())
            producer.flush(timeout=10)
            await asyncio.sleep(0.5)
        producer.close()
        return answers

    answers = asyncio.run(with_bridge(cfg, handles, body))
    logged = impressions_by_id(stream_config, {a["request_id"] for a in answers})
    for ans in answers:
        imp = logged[ans["request_id"]]
        assert imp["source"] == "onerec" and imp["model_version"] == ans["model_version"]
        assert [it["item_id"] for it in imp["items"]] == [it["item_id"] for it in ans["items"]]
        assert [it["logprob"] for it in imp["items"]] == pytest.approx([it["logprob"] for it in ans["items"]])
        assert imp["context"]["short"]["item_id"], "the served context is logged"


def test_token_guards_the_api(replicas, stream_config, tmp_path):
    _, handles = replicas
    cfg = loop_config(tmp_path, serve={"api_token": "s3cret"})
    cfg.stream = stream_config
    ensure_topics(stream_config, kinds=("impressions", "feedback"))

    async def body(bridge, session):
        async with session.post("/recommend", json={"user_id": USER}) as resp:
            assert resp.status == 401 and "bearer token" in (await resp.json())["error"]
        async with session.get("/version", headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with session.post("/recommend", json={"user_id": USER},
                                headers={"Authorization": "Bearer s3cret"}) as resp:
            assert resp.status == 200
        async with session.get("/healthz") as resp:
            assert resp.status == 200

    asyncio.run(with_bridge(cfg, handles, body))


def test_dead_replica_is_skipped_without_losing_requests(ray_session, stream_config, tmp_path):
    cfg = loop_config(tmp_path)
    cfg.stream = stream_config
    ensure_topics(stream_config, kinds=("impressions", "feedback"))
    handles = start_replicas(cfg)

    async def body(bridge, session):
        async def ask():
            async with session.post("/recommend", json={"user_id": USER}) as resp:
                return resp.status
        first = await asyncio.gather(*[ask() for _ in range(4)])
        ray.kill(handles[0])
        after = [await ask() for _ in range(12)]   # one at a time: each its own replica call (no batching)
        assert first + after == [200] * 16
        assert len(bridge.pool) == 1 and bridge.pool.failures >= 1
        ray.kill(handles[1])
        async with session.post("/recommend", json={"user_id": USER}) as resp:
            assert resp.status == 503 and "no replica" in (await resp.json())["error"]

    asyncio.run(with_bridge(cfg, handles, body))


def test_serve_caps_bound_the_work_a_request_asks_for(tmp_path):
    """serve.max_top_k and serve.max_context_items reject a request before any replica sees it."""
    def bridge_of(cfg):
        return ServingBridge.from_config(cfg, views=warm_views(cfg))

    context = warm_views(loop_config(tmp_path)).context(USER)   # a warm user's context
    n_items = len(context["short"]["item_id"]) + len(context["long"]["item_id"])
    assert n_items >= 2
    caps = {"max_top_k": 3, "max_context_items": n_items - 1}
    bridge = bridge_of(loop_config(tmp_path, top_k=2, serve=caps))
    assert bridge.parse_request({"user_id": USER, "top_k": 3})[2] == 3
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 3\]"):
        bridge.parse_request({"user_id": USER, "top_k": 4})
    with pytest.raises(ValueError, match="serve.max_context_items"):
        bridge.parse_request({"user_id": USER, "context": context})
    roomy = bridge_of(loop_config(tmp_path, serve={"max_context_items": n_items}))
    assert roomy.parse_request({"user_id": USER, "context": context})[1] is context
    with pytest.raises(ValueError, match="serve.max_top_k"):   # the loop's default top_k must fit the cap
        bridge_of(loop_config(tmp_path, top_k=4, serve={"max_top_k": 3}))
