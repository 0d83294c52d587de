"""Multi-process runs on CPU with gloo: FSDP2 (fully_shard, DTensor Shard(0)), HSDP and DDP give the same d and
weights as one process. The ranks are persistent pool workers (tests/worker_pool.py); on GPUs the same worker
functions run under NCCL unchanged."""

import pytest
import torch
import torch.distributed as dist

from . import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

STEPS = 12


def _assert_params_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, rtol=rtol, atol=1e-7 * p.abs().max().item())


@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 2)])
def test_hsdp_matches_one_process(pools, mesh_shape):
    """HSDP: (Replicate, Shard(0)) placements; statistics are reduced over the shard group only."""
    world = mesh_shape[0] * mesh_shape[1]
    results = pools(world).run(dist_workers.fsdp2_worker, {}, STEPS, mesh_shape)
    sharded = results[0]
    params, d = dist_workers.single_process({}, STEPS)
    assert all(rd == sharded["d"][0] for rd in sharded["d"])
    assert sharded["d"][0][0] == pytest.approx(d[0], rel=1e-6)
    assert [r["rows"]["tall.weight"] for r in results] == [35, 35] * mesh_shape[0]
    _assert_params_close(sharded["params"], params)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("options", [{}, dict(weight_decay=0.01, use_cautious=True, use_orthograd=True),
                                     dict(use_speed=True, use_bias_correction=True, schedulefree_c=5.0),
                                     dict(use_schedulefree=False, use_grams=True, eps=None),
                                     dict(factored=False, use_adopt=True, weight_decay=0.01,
                                          weight_decay_by_lr=False)],
                         ids=["defaults", "cautious_orthograd_wd", "speed_biascorr_sfc", "prodigy_grams_atan2",
                              "unfactored_adopt_wd"])
def test_fsdp2_matches_one_process(pools, world, options):
    results = pools(world).run(dist_workers.fsdp2_worker, options, STEPS)
    sharded = results[0]
    params, d = dist_workers.single_process(options, STEPS)
    ranks_d = sharded["d"]
    assert all(rd == ranks_d[0] for rd in ranks_d)  # d bitwise identical on every rank
    assert ranks_d[0][0] == pytest.approx(d[0], rel=1e-6)
    assert d[0] > 1e-6  # d moved
    # torch.chunk layout: uneven shards, and an empty one on 3 ranks
    assert [r["rows"]["tall.weight"] for r in results] == ([35, 35] if world == 2 else [24, 24, 22])
    assert [r["rows"]["tiny.weight"] for r in results] == ([1, 1] if world == 2 else [1, 1, 0])
    if not options:
        assert sharded["collectives"] <= 2 * STEPS  # at most 2 bucketed all-reduces per step with defaults
    assert sharded["collectives"] > 0
    _assert_params_close(sharded["params"], params)


def test_unsupported_sharded_options_raise(pools):
    muon, fused = pools(2).run(dist_workers.errors_worker)[0]
    assert "use_muon_pp" in muon and "fused_back_pass" in fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddp_replicas_match_one_process_and_each_other(pools, dtype):
    out = pools(2).run(dist_workers.ddp_worker, dict(dtype=dtype), STEPS)
    assert torch.equal(out[0]["flat"], out[1]["flat"])  # replicas bitwise identical (bf16: stochastic rounding)
    if dtype == torch.float32:
        params, d = dist_workers.single_process({}, STEPS)
        assert out[0]["d"] == pytest.approx(d[0], rel=1e-6)
        torch.testing.assert_close(out[0]["flat"], torch.cat([p.reshape(-1) for p in params.values()]),
                                   rtol=1e-5, atol=1e-7)
