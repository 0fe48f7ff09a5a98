"""Data-parallel training: ``trainer.fit`` on W = 2 gloo ranks (DDP + the distributed loss)
equals one process on the full batch (5 SGD steps, float64, within 1e-10); MoCo's queue stays
identical on every rank; ``fastcontrast train METHOD --nproc 2 --device cpu`` runs end to end."""

import pytest
import torch

from ._train_workers import world2_results


def _assert_same_fit(results, reference_key, key, modes):
    reference = results[reference_key]
    assert reference["world_size"] == 1
    for rank in (0, 1):
        assert set(results["ranks"][rank][key]) >= set(modes)
        for mode, got in results["ranks"][rank][key].items():
            assert got["world_size"] == 2
            assert len(got["losses"]) == 5
            for a, b in zip(got["losses"] + got["bounds"],
                            reference["losses"] + reference["bounds"]):
                assert abs(a - b) < 1e-10, mode
            for p, q in zip(got["params"], reference["params"]):
                assert torch.allclose(p, q, atol=1e-10, rtol=0), (mode, (p - q).abs().max())
    assert reference["losses"][0] != reference["losses"][-1]  # it did train


def test_fit_world2_equals_single_process_full_batch():
    _assert_same_fit(world2_results(), "fit_reference", "fit", ("fallback",))


def test_cmc_fit_world2_equals_single_process_full_batch():
    """CMC's data-parallel path (fastcontrast.distributed.info_nce, symmetric, per view pair)
    in both modes: 5 SGD steps on 2 ranks equal one process on the full batch (float64)."""
    _assert_same_fit(world2_results(), "cmc_reference", "cmc_fit", ("gather", "ring"))


def test_moco_queue_replicated_in_rank_order():
    ranks = world2_results()["ranks"]
    a, b = ranks[0]["moco"], ranks[1]["moco"]
    assert torch.equal(a["queue"], b["queue"]) and torch.equal(a["indices"], b["indices"])
    assert a["losses"] == b["losses"]
    # the last enqueued 2 x 16 keys: rank 0's 8 indices, then rank 1's (global batch order)
    assert int((a["indices"] >= 0).sum()) == 2 * 16


@pytest.mark.parametrize("method, sizes", [("simclr", "feature_dim=16"),
                                           ("moco", "feature_dim=16"), ("cmc", "out_dim=16")])
def test_cli_train_nproc2(method, sizes, tmp_path, capfd):
    from fastcontrast.cli import main

    import json

    code = main(["train", method, "--nproc", "2", "--device", "cpu", "--steps", "3",
                 "--batch-size", "32", "--set", "width=4", "--set", sizes, "--no-baselines",
                 "--quiet", "--out", str(tmp_path)])
    assert code == 0
    out = capfd.readouterr().out  # printed by rank 0, a child process
    assert "2 processes" in out and "linear probe" in out
    record = json.loads((tmp_path / f"{method}.json").read_text())
    assert record["device"] == "cpu" and record["history"]["settings"]["device"] == "cpu"
    assert record["history"]["settings"]["world_size"] == 2 and record["history"]["steps"] == 3
