"""What a run logs and does, against recomputations from the replicas (the simulator).

The same checks run on real ranks in tests/test_instruments_mpi.py.
"""

import numpy as np
import pytest

from dsgd_mpi.sim.__main__ import build
from tests import instruments as ins

N = 4


def _params(trainer) -> np.ndarray:
    m = trainer.replicas.measured
    return np.stack([f[:m].cpu().numpy().copy() for f in trainer.replicas.flats])


def _trainer(tmp_path, mode: str, *extra: dict):
    cfg = ins.config(*extra, {"run": {"out_dir": str(tmp_path)}})
    return build(cfg, N, mode, log=lambda _: None)


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("order", ["local_first", "gossip_first"])
@pytest.mark.parametrize("measure", ["estimate", "exact", "sketch"])
def test_every_logged_distance_is_the_replicas_own(tmp_path, mode, order, measure):
    """In D-SGD and in exact phases, whichever order and measure: never a constant."""
    trainer = _trainer(tmp_path, mode, ins.PHASED, {"gossip": {"order": order},
                                                "consensus": {"measure": measure}})
    steps = ins.PHASED["run"]["steps"]
    pairs = ins.logged_and_recomputed(trainer, steps, lambda: _params(trainer))
    scale = float((_params(trainer).astype(np.float64) ** 2).sum(axis=1).mean())
    ins.assert_distances_match(pairs, scale, f"{mode}/{order}/{measure}")
    phases = {row["phase"] for row, _ in pairs}
    assert phases == {0, 1, 2}
    exact_phase = [r for row, r in pairs if row["phase"] == 1]
    # After an average the replicas agree to rounding; under D-SGD they do not.
    assert max(exact_phase) < 1e-10 * scale
    assert min(r for row, r in pairs if row["phase"] == 0) > 1e-6 * scale


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_csgd_is_single_model_sgd_on_the_total_batch_in_both_orders(tmp_path, mode):
    """Zhu et al.'s C-SGD: every gradient at x̄, x̄ <- x̄ - lr mean_i g_i(x̄)."""
    cfg = ins.config(ins.CSGD)
    expected = ins.single_model_sgd(cfg, N, ins.CSGD_STEPS)
    ends = {}
    for order in ("local_first", "gossip_first"):
        trainer = _trainer(tmp_path / order, mode, ins.CSGD, {"gossip": {"order": order}})
        trainer.replicas.start(0)
        for _ in range(ins.CSGD_STEPS):
            trainer.train_step()
        ends[order] = _params(trainer)
        for i, replica in enumerate(ends[order]):  # each replica is x̄ after the average
            np.testing.assert_allclose(replica, expected, rtol=1e-4, atol=2e-6,
                                       err_msg=f"{order}: replica {i}")  # fmt: skip
    start = ins.config(ins.CSGD)  # the models moved: the comparison is not between two inits
    assert np.abs(expected - ins.single_model_sgd(start, N, 0)).max() > 1e-3
    np.testing.assert_array_equal(ends["local_first"], ends["gossip_first"])
