"""torch.distributed.checkpoint: optimizer state saved on N FSDP2 ranks loads on M ranks and on one process, and the
resumed run continues the uninterrupted one (DISTRIBUTED.md D5)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from . import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

FIRST, SECOND = 6, 6
OPTIONS = [{}, dict(use_speed=True, weight_decay=0.01), dict(use_schedulefree=False, factored=False)]
IDS = ["defaults", "speed_wd", "prodigy_unfactored"]


@pytest.fixture(scope="module")
def uninterrupted():
    return {i: dist_workers.single_process(o, FIRST + SECOND) for i, o in enumerate(OPTIONS)}


def _check(params, d, want_params, want_d):
    assert d[0] == pytest.approx(want_d[0], rel=1e-6)
    for name, p in want_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-6 * p.abs().max().item())


@pytest.mark.parametrize("save_world,load_world", [(2, 3), (3, 2), (2, 1)])
@pytest.mark.parametrize("index", range(len(OPTIONS)), ids=IDS)
def test_dcp_reshard_resume(pools, uninterrupted, save_world, load_world, index):
    options = OPTIONS[index]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        pools(save_world).run(dist_workers.dcp_save_worker, ckpt, options, FIRST)
        if load_world == 1:
            params, d = dist_workers.dcp_resume_single(ckpt, options, FIRST, SECOND)
        else:
            # 2 -> 3 relies on DCP's own state creation (a zero-gradient step at lr=0), 3 -> 2 on init_state()
            res = pools(load_world).run(dist_workers.dcp_resume_worker, ckpt, options, FIRST, SECOND,
                                        save_world == 3)
            ranks_d = res[0]["d"]
            assert all(rd == ranks_d[0] for rd in ranks_d)
            assert res[0]["k_before"] == 1 and res[0]["loaded_k"] == FIRST + 1  # DCP's fake step did not count
            params, d = res[0]["params"], ranks_d[0]
    _check(params, d, *uninterrupted[index])


def test_dcp_single_process_checkpoint_loads_on_two_ranks(pools, uninterrupted):
    """1 -> 2: a checkpoint written by one plain process (no process group) resumes on 2 FSDP2 ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        dist_workers.dcp_save_single(ckpt, OPTIONS[1], FIRST)
        res = pools(2).run(dist_workers.dcp_resume_worker, ckpt, OPTIONS[1], FIRST, SECOND, True)
    assert res[0]["d"][0] == res[0]["d"][1] and res[0]["loaded_k"] == FIRST + 1
    _check(res[0]["params"], res[0]["d"][0], *uninterrupted[1])


def test_dcp_hsdp_checkpoint_loads_on_one_process_and_three_ranks(pools, uninterrupted):
    """HSDP 2x2 -> 1 plain process and -> 3 FSDP2 ranks: the replicas' copies are saved once."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        pools(4).run(dist_workers.dcp_save_worker, ckpt, OPTIONS[0], FIRST, (2, 2))
        params, d = dist_workers.dcp_resume_single(ckpt, OPTIONS[0], FIRST, SECOND)
        _check(params, d, *uninterrupted[0])
        res = pools(3).run(dist_workers.dcp_resume_worker, ckpt, OPTIONS[0], FIRST, SECOND, True)
        _check(res[0]["params"], res[0]["d"][0], *uninterrupted[0])
