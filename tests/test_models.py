"""The model matrix: stock models (HF transformers and torch.nn), stock loss, stock AdamW
and gradient clipping, trained under ``pamtorch.mode(Config.full())``. The first step is
audited multiplication-free; 20 steps lower the loss, evaluated in exact fp32."""
import pytest
import torch

import pamtorch
from pamtorch.config import Config

import model_zoo as Z


@pytest.mark.parametrize("case", Z.CASES, ids=[c.name for c in Z.CASES])
def test_stock_model_trains_multiplication_free(case):
    if case.needs:
        pytest.importorskip(case.needs)
    torch.set_num_threads(1)
    model, batch, opt = Z.make(case)
    cfg = Config.full()
    start = Z.exact_loss(case, model, batch)

    def step():
        with pamtorch.mode(cfg):
            return Z.train_step(case, model, batch, opt)

    report = pamtorch.audit(step, model=model)
    report.assert_multiplication_free()
    assert sum(report.pa["forward"].values()) and sum(report.pa["backward"].values())
    assert sum(report.pa["optimizer"].values())
    for _ in range(19):
        loss = step()
        assert torch.isfinite(loss)
    end = Z.exact_loss(case, model, batch)
    assert end < 0.98 * start, (start, end)
