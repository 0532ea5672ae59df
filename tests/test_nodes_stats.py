"""Statistics accumulation: no copy per call, one transfer per step, per-layer means, run totals."""

import json

import torch

from sparge_pack.nodes.stats import RunStats, StepAccumulator


def test_one_transfer_per_step_and_per_layer_means(monkeypatch):
    acc = StepAccumulator()
    assert not acc
    d1, d2 = torch.tensor([0.5, 0.25]), torch.tensor([0.75, 0.25])
    acc.add_sparse("double.0", d1, torch.tensor([0.0, 0.5]))
    acc.add_sparse("double.0", d2, torch.tensor([0.5, 0.5]))
    acc.add_sparse("single.3", torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    acc.add_dense("cross-attention")
    acc.add_dense("cross-attention")
    d1.fill_(0.0)  # references are kept: the values read at flush time are the current ones
    transfers = []
    original = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: transfers.append(1) or original(self, *a, **k))
    step = acc.flush(4, 0.8)
    assert transfers == [1]
    assert step.layers["double.0"].calls == 2
    assert step.layers["double.0"].density == [0.375, 0.125]
    assert step.layers["double.0"].pv_skipped == [0.25, 0.5]
    assert step.sparse_calls == 3 and step.dense_calls == {"cross-attention": 2}
    assert abs(step.density - (2 * 0.25 + 1.0) / 3) < 1e-9
    assert not acc and acc.flush(5, None).layers == {}
    json.dumps(step.as_dict())
    assert "step 4 (sigma 0.8): 3 sparse calls; density 0.500" in step.summary_line()


def test_run_totals_weighted_by_sparse_calls():
    run = RunStats()
    for i, (density, calls) in enumerate([(0.5, 1), (0.2, 3)]):
        acc = StepAccumulator()
        for _ in range(calls):
            acc.add_sparse("double.0", torch.tensor([density]), torch.tensor([0.1]))
        acc.add_dense("mask")
        run.steps.append(acc.flush(i, None))
    totals = run.totals()
    assert totals["steps"] == 2 and totals["sparse_calls"] == 4 and totals["dense_calls"] == {"mask": 2}
    assert abs(totals["density"] - (0.5 + 3 * 0.2) / 4) < 1e-6
    assert "2 steps, 4 sparse attention calls" in run.summary_line()
    assert RunStats().totals()["density"] is None


def test_head_count_mismatch_is_an_error():
    acc = StepAccumulator()
    try:
        acc.add_sparse("x", torch.zeros(2), torch.zeros(3))
    except ValueError as e:
        assert "2 heads" in str(e)
    else:
        raise AssertionError("expected ValueError")
