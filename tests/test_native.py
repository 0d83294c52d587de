"""The native one-pass statistics kernel (prodigy_dist.native) against torch, and its use by the compiled path."""

import pytest
import torch

from prodigy_dist import native


def _built() -> bool:
    return native.row_col_sq_sums(torch.ones(2, 2)) is not None


pytestmark = pytest.mark.skipif(not _built(), reason="no C++ toolchain: the native kernel could not be built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 40), (1, 7), (33, 70), (257, 1000), (3000, 33)])
def test_row_and_column_sums_of_squares(shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    rows, cols, none = native.row_col_sq_sums(g)
    assert none is None
    sq = g.double().square()
    assert rows.dtype == cols.dtype == torch.float32 and rows.shape == (shape[0],) and cols.shape == (shape[1],)
    torch.testing.assert_close(rows.double(), sq.sum(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(cols.double(), sq.sum(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("start", [0, 3, 10])
@pytest.mark.parametrize("shape", [(0, 40), (1, 7), (33, 70), (5, 11), (257, 1000)])
def test_prodigy_samples_are_copied_out_in_the_same_pass(shape, start):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    rows, cols, samples = native.row_col_sq_sums(g, start)
    assert samples.dtype == g.dtype and torch.equal(samples, g.reshape(-1)[start::11])


def test_not_applicable_returns_none():
    assert native.row_col_sq_sums(torch.ones(3, 4, 5)) is None
    assert native.row_col_sq_sums(torch.ones(4, 6).t()) is None  # not contiguous
    assert native.row_col_sq_sums(torch.ones(4, 6, dtype=torch.float64)) is None


def test_compiled_path_uses_it(monkeypatch):
    from prodigy_dist import ProdigyPlusScheduleFree

    calls = []
    original = native.row_col_sq_sums
    monkeypatch.setattr(native, "row_col_sq_sums", lambda g, *a: calls.append(tuple(g.shape)) or original(g, *a))
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    opt = ProdigyPlusScheduleFree(model.parameters(), fast_path="compiled")
    model(torch.randn(8, 300)).square().mean().backward()
    opt.step()
    assert (200, 300) in calls
