"""A/B arms: assignment, the arm list's checks, and the bridge routing each user to their arm's replicas."""
import asyncio
from collections import Counter

import aiohttp
import pytest
import ray

from actors.arms import DEFAULT_AB_ARMS, arm_sections, parse_arms
from learner.config import TrainConfig
from serving_bridge.app import ServingBridge, UserViews, bound_port, make_app, start_site
from simulator import embedded
from streaming.arms import arm_of
from streaming.topics import ensure_topics
from tests.loop_helpers import loop_config, start_replicas


def test_arm_of_is_stable_balanced_and_total():
    arms = list(DEFAULT_AB_ARMS)
    users = range(70_000)
    counts = Counter(arm_of(u, arms) for u in users)
    assert set(counts) == set(arms)
    expected = len(users) / len(arms)
    assert all(abs(c - expected) < 0.05 * expected for c in counts.values()), counts
    assert [arm_of(u, arms) for u in range(100)] == [arm_of(u, arms) for u in range(100)]   # stable
    for user in (0, 2**63 - 1, -5, 10**30):               # every int maps to an arm of the list
        assert arm_of(user, arms) in arms
    assert Counter(arm_of(u, arms, salt="other") == arm_of(u, arms) for u in users)[True] < 0.3 * len(users)
    with pytest.raises(ValueError, match="no arms"):
        arm_of(1, [])
    with pytest.raises(ValueError, match="int"):
        arm_of("7", arms)


def test_arm_list_is_checked_before_anything_starts():
    specs = parse_arms("gbpo, sft,popular", require_sft=True)
    assert [(s.name, s.learned, s.algorithm) for s in specs] == [("gbpo", True, "gbpo"), ("sft", True, "sft"),
                                                                  ("popular", False, None)]
    assert parse_arms(["gbpo-legacy", "sft"], require_sft=True)[0].rl_on == "legacy"
    with pytest.raises(ValueError, match="unknown arm 'gpbo'"):
        parse_arms("gpbo,sft", require_sft=True)
    with pytest.raises(ValueError, match="needs the `sft` arm"):
        parse_arms("gbpo,ecpo", require_sft=True)
    with pytest.raises(ValueError, match="listed twice"):
        parse_arms("sft,sft", require_sft=True)
    with pytest.raises(ValueError, match="learned arm"):
        parse_arms("popular,oracle", require_sft=False)


def test_each_learned_arm_gets_its_own_objective_and_checkpoints(tmp_path):
    cfg = loop_config(tmp_path)
    train, loop = arm_sections(parse_arms("gbpo-legacy,sft", require_sft=True)[0], TrainConfig(), cfg.loop,
                               single=False)
    assert (train.algorithm, train.rl_on) == ("gbpo", "legacy")
    assert loop.checkpoint_dir.endswith("/gbpo-legacy") and cfg.loop.checkpoint_dir != loop.checkpoint_dir
    _, same = arm_sections(parse_arms("sft", require_sft=True)[0], TrainConfig(), cfg.loop, single=True)
    assert same.checkpoint_dir == cfg.loop.checkpoint_dir         # `onerec run` resumes where it did



@pytest.mark.integration
def test_bridge_routes_users_to_their_arm_and_batches_requests(ray_session, stream_config, tmp_path):
    """Two learned arms with different weights: every answer comes from the user's arm (the same answer
    as that arm's replica gives alone), concurrent requests share replica calls, and a user of a fixed
    arm gets a 409 naming it."""
    cfg = loop_config(tmp_path, explore_temperature=0.0)
    cfg.stream = stream_config
    ensure_topics(stream_config, kinds=("impressions", "feedback"))
    arms = ["gbpo", "sft", "oracle"]
    pools = {"gbpo": start_replicas(cfg, 1, seed=0), "sft": start_replicas(cfg, 1, seed=1)}
    views = UserViews(embedded.user_views(short_len=cfg.model.max_short, long_len=cfg.model.max_long),
                      embedded.item_catalogue().duration_of)
    bridge = ServingBridge.from_config(cfg, views=views, arms=arms, pools=pools)
    users = [u for u in range(400) if arm_of(u, arms) != "oracle"][:24]
    fixed_user = next(u for u in range(400) if arm_of(u, arms) == "oracle")

    def alone(user):
        arm = arm_of(user, arms)
        served = ray.get(pools[arm][0].recommend.remote([views.context(user)], 4, cfg.loop.beam_width, 0.0))
        return [int(i) for i in served["item_ids"][0]]

    async def scenario():
        runner = await start_site(make_app(bridge), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{bound_port(runner)}") as session:
                async def ask(user):
                    async with session.post("/recommend", json={"user_id": user, "top_k": 4}) as resp:
                        return resp.status, await resp.json()
                async def ask_bad():   # passes the schema, but the featurizer refuses its profile length
                    context = {**views.context(users[0]), "profile": [1, 2, 3]}
                    async with session.post("/recommend", json={"user_id": users[0], "context": context}) as resp:
                        return resp.status, await resp.json()
                *answers, bad = await asyncio.gather(*[ask(u) for u in users], ask_bad())
                assert bad[0] == 422 and "profile" in bad[1]["error"]   # alone: the good ones beside it pass
                status, body = await ask(fixed_user)
                assert status == 409 and "'oracle'" in body["error"]
                return answers
        finally:
            await runner.cleanup()

    answers = asyncio.run(scenario())
    for user, (status, answer) in zip(users, answers):
        assert status == 200 and answer["arm"] == arm_of(user, arms)
        assert [it["item_id"] for it in answer["items"]] == alone(user), user
    other = next(a for a in pools if a != arm_of(users[0], arms))   # the arm the bad request was not in
    n_other = sum(arm_of(u, arms) == other for u in users)
    calls = bridge.router.pools[other].calls
    assert calls < n_other, f"{calls} replica calls for {n_other} concurrent requests: no batching"
    for handles in pools.values():
        for h in handles:
            ray.kill(h)
