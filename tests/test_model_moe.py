"""MoE: top-k routing, gates from unbiased affinities, bias moves toward under-loaded experts."""
import torch

from learner.config import ModelConfig
from learner.moe import MoEFeedForward
from tests.model_fixtures import one_thread  # noqa: F401  (autouse)

CFG = ModelConfig.from_name("tiny").replace(d_model=16, n_layers=2, n_experts=6, moe_top_k=2, moe_d_ff=8,
                                           first_dense_layers=1, moe_bias_update_rate=0.01)


def test_routes_top_k_and_matches_per_token_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(CFG).eval()
    x = torch.randn(2, 5, 16)
    index, gates = moe.route(x.reshape(-1, 16))
    assert index.shape == gates.shape == (10, 2)
    assert all(len(set(row)) == 2 for row in index.tolist())
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    out = moe(x)
    assert out.shape == x.shape
    flat = x.reshape(-1, 16)
    ref = moe.shared(flat)
    for t in range(10):
        for j in range(2):
            e = int(index[t, j])
            h = torch.nn.functional.silu(flat[t] @ moe.w_gate[e]) * (flat[t] @ moe.w_up[e])
            ref[t] = ref[t] + gates[t, j] * (h @ moe.w_down[e])
    torch.testing.assert_close(out.reshape(-1, 16), ref, atol=1e-5, rtol=1e-4)


def test_bias_moves_toward_under_loaded_experts():
    torch.manual_seed(0)
    moe = MoEFeedForward(CFG).train()
    with torch.no_grad():                        # expert 0 is everyone's favourite
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[0] += 1.0
    x = torch.rand(256, 16) + 0.2
    moe(x)
    load = moe.last_load.clone()
    assert load.sum() == 256 * 2 and load[0] == load.max() and load[0] > 2 * load.mean()
    assert moe.expert_bias[0] < 0                                  # over-loaded: bias down
    assert (moe.expert_bias[load < load.mean()] > 0).all()         # under-loaded: bias up
    for _ in range(300):                                           # repeated steps even the load out
        moe(x)
    assert moe.last_load[0] < load[0]
    assert moe.last_load.std() < 0.5 * load.std()


def test_bias_changes_selection_not_gates():
    torch.manual_seed(0)
    moe = MoEFeedForward(CFG).eval()
    x = torch.randn(8, 16)
    index, gates = moe.route(x)
    affinity = torch.sigmoid(moe.router(x))
    sel = affinity.gather(1, index)
    torch.testing.assert_close(gates, sel / sel.sum(-1, keepdim=True))
    moe(x)
    assert (moe.expert_bias == 0).all()           # eval mode never updates the bias


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    moe = MoEFeedForward(CFG).train()
    moe(torch.randn(12, 16)).square().sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.w_down.grad.abs().sum() > 0
