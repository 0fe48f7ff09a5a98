"""fastcontrast.distributed against the single-process losses on the concatenated batch:
W in {1, 2, 4} gloo processes on 127.0.0.1, both modes, float64 (see _workers.py for what each
check measures). One spawn of 4 processes runs every world size (W = 2 on the subgroups
{0, 2} and {1, 3}, W = 1 on {0}); the test functions assert on its results."""
import pytest
import torch

from . import _backend_cases, _workers
from ._distill_cases import NAMES as DISTILL_CASES
from ._false_negative_cases import NAMES as FALSE_NEGATIVE_CASES
from ._label_smoothing_cases import NAMES as LABEL_SMOOTHING_CASES
from ._matryoshka_cases import NAMES as MATRYOSHKA_CASES
from ._multi_positive_cases import NAMES as MULTI_POSITIVE_CASES

WORLDS = (1, 2, 4)
TOL = 1e-9
CASE_NAMES = ["info_nce", "info_nce_global_targets", "info_nce_exclude_self",
              "info_nce_bank_in_batch_True", "info_nce_bank_in_batch_False",
              "info_nce_per_query_negatives", "info_nce_no_in_batch_global_targets",
              "info_nce_symmetric",
              "info_nce_symmetric_noncontiguous", "clip_loss", "siglip_loss", "nt_xent",
              "supcon", "supcon_multiview", "moco_loss",
              # the objectives and id masks of the single-process API
              "info_nce_dcl", "info_nce_dclw", "info_nce_hcl_bank",
              "info_nce_hcl_dcl_global_targets", "info_nce_ids_dcl_bank_only",
              "info_nce_ids_hcl", "info_nce_ids_in_batch", "info_nce_ids_hcl_in_batch",
              "nt_xent_hcl_dcl",
              "moco_loss_hcl_query_index", *LABEL_SMOOTHING_CASES, *MULTI_POSITIVE_CASES,
              *MATRYOSHKA_CASES, *FALSE_NEGATIVE_CASES, *DISTILL_CASES]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _workers.run_world(4, tmp_path_factory.mktemp("distributed"))


def _entries(results, prefix):
    """(rank, key, value) of every result under ``prefix``; errors fail with their traceback."""
    found = []
    for rank, res in enumerate(results):
        for key, value in res.items():
            if key.startswith(prefix):
                if key.endswith("/error"):
                    pytest.fail(f"rank {rank}, {key}:\n{value}")
                found.append((rank, key, value))
    assert found, f"no results under {prefix!r}"
    return found


def _assert_small(results, prefix):
    bad = [(rank, key, value) for rank, key, value in _entries(results, prefix)
           if "/bad/" not in key and not value <= TOL]  # bad/: error messages
    assert not bad, f"relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_single_process(results, world, case):
    case = f"w{world}/{case}"
    _assert_small(results, f"{case}/")
    for mode in _workers.MODES:  # the loss, every input and scalar gradient, both variants
        keys = {key for _, key, _ in _entries(results, f"{case}/{mode}/")}
        assert {f"{case}/{mode}/{v}/loss" for v in ("mean", "sum", "rows")} <= keys
    assert {key for _, key, _ in _entries(results, f"{case}/agree/")} == {
        f"{case}/agree/mean", f"{case}/agree/rows"}


@pytest.mark.parametrize("dtype", list(_backend_cases.DTYPES))
@pytest.mark.parametrize("case", _backend_cases.OBJECTIVES)
def test_objectives_on_the_cpu_kernels_match_float64(results, case, dtype):
    """W = 4, both modes: the objectives on the compiled CPU kernels with float32 / bfloat16
    inputs, within the dtype's bound of the float64 single-process loss and gradients."""
    skipped = results[0].get(f"w4/{_backend_cases.BACKEND}-skipped")
    if skipped:
        pytest.skip(skipped)
    bound = _backend_cases.DTYPES[dtype][1]
    prefix = f"{_backend_cases.prefix('w4/', dtype)}{case}/"
    bad = [(rank, key, value) for rank, key, value in _entries(results, prefix)
           if not value <= bound]
    assert not bad, f"relative errors above {bound}: {bad}"
    for mode in _workers.MODES:
        keys = {key for _, key, _ in _entries(results, f"{prefix}{mode}/")}
        assert {f"{prefix}{mode}/{v}/loss" for v in ("mean", "sum", "rows")} <= keys


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", FALSE_NEGATIVE_CASES)
def test_dropped_counts_match_single_process(results, world, case):
    """return_dropped: each rank's counts over every rank's candidates are the single-process
    counts of its rows (and the loss returned with them is the group convention's)."""
    _assert_small(results, f"w{world}/{case}/dropped/gather")
    _assert_small(results, f"w{world}/{case}/dropped/ring")
    assert results[0][f"dropped_total/w{world}/{case}"] > 0  # the filter dropped something


@pytest.mark.parametrize("world", (2, 4))
def test_all_gather_with_grad_and_enqueue_all(results, world):
    _assert_small(results, f"w{world}/all_gather_with_grad/")
    _assert_small(results, f"w{world}/enqueue_all/")


def test_subgroups_of_a_2_x_2_layout(results):
    """W = 2 ran on the subgroups {0, 2} and {1, 3} of 4 processes, at once, on different data
    (group ranks differ from global ranks: the ring's peers are the group's neighbours)."""
    for rank, res in enumerate(results):
        assert any(key.startswith("w2/info_nce_symmetric/ring/") for key in res), rank
    _assert_small(results, "w2/")


@pytest.mark.parametrize("world", (2, 4))
def test_mismatched_inputs_raise_on_every_rank(results, world):
    for rank, res in enumerate(results):
        for mode in _workers.MODES:
            message = res[f"w{world}/bad/dim/{mode}"]
            assert "feature dimension D of query" in message, message
            assert str([_workers.DIM + r for r in range(world)]) in message, message
        message = res[f"w{world}/bad/dim/clip"]
        assert "clip_loss" in message and "feature dimension D of image" in message, message
        assert "query" not in message, message
        message = res[f"w{world}/bad/dtype"]
        assert "image must have the same dtype" in message and "torch.float32" in message, message
        for mode in _workers.MODES:  # Matryoshka prefixes on one rank only
            message = res[f"w{world}/bad/matryoshka/{mode}"]
            assert "matryoshka_dims / matryoshka_weights" in message, message


@pytest.mark.parametrize("world", (2, 4))
@pytest.mark.parametrize("what, own_error, called", [
    ("empty", "must not be empty", "clip_loss"),
    ("empty_nt_xent", "must not be empty", "nt_xent"),
    ("temperature_nt_xent", "temperature must be positive", "nt_xent"),
    ("targets", "targets must index the keys of all ranks", "info_nce"),
    ("queue", "feature dimension", "moco_loss")])
def test_one_rank_refused_raises_on_every_rank(results, world, what, own_error, called):
    """Only the last rank's input is bad (e.g. an empty last batch in ring mode): it raises its
    own error, every other rank a ValueError naming it and the function called (clip_loss and
    nt_xent run info_nce inside), none hangs in a collective."""
    for res in results[:world] if world == 4 else results:  # W = 2: both subgroups
        for mode in _workers.MODES:
            message = res[f"w{world}/bad/{what}/{mode}"]
            if message.startswith("last: "):
                assert own_error in message, message
            else:
                assert message.startswith(f"other: fastcontrast.distributed.{called}: "), message
                assert f"rank(s) [{world - 1}]" in message and "refused" in message, message


def test_needs_an_initialised_process_group():
    from fastcontrast import distributed as fcd

    q = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fcd.info_nce(q, q.clone())
    with pytest.raises(RuntimeError, match="init_process_group"):
        fcd.all_gather_with_grad(q)


def test_bad_mode_and_backend_are_refused_before_communicating():
    from fastcontrast import distributed as fcd

    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mode"):
        fcd.info_nce(q, q.clone(), mode="tree")
    with pytest.raises(ValueError, match="dclw_sigma"):  # the single-process checks
        fcd.info_nce(q, q.clone(), dclw_sigma=0.5)
    with pytest.raises(ValueError, match="symmetric"):
        fcd.info_nce(q, q.clone(), symmetric=True, decoupled=True)


def test_same_arguments_as_the_single_process_functions():
    """Every argument of the single-process function (same name, same default), plus mode and
    group."""
    import inspect

    import fastcontrast as fc
    from fastcontrast import distributed as fcd

    for name in ("info_nce", "clip_loss", "nt_xent", "supcon", "siglip_loss", "moco_loss",
                 "distill_info_nce"):
        single = inspect.signature(getattr(fc, name)).parameters
        multi = inspect.signature(getattr(fcd, name)).parameters
        assert list(multi) == list(single) + ["mode", "group"], name
        for arg, p in single.items():
            assert multi[arg].default == p.default and multi[arg].kind == p.kind, (name, arg)


@pytest.mark.parametrize("world", (2, 4))
def test_ring_holds_its_own_and_two_travelling_blocks(results, world):
    """Ring mode's memory in units of one key block M_r x D (N_r = M_r, so the query-side
    gradient buffers dx and a kernel call's partial dx are block-sized too): forward, the block
    computed on and the arriving one (2); backward, those two and one fp32 key-gradient
    accumulator (a second one only during the hand-over, after the computed block is released),
    a quarter-block partial d(keys), dx and a partial dx: at most 5.5, the same at every W
    (gather holds W blocks of keys, and its backward W blocks of key gradients). The graph saves
    only O(N_r) statistics beyond the inputs. The next block's transfer is posted before each
    block's compute, in both directions, and the symmetric loss is one ring each way."""
    for rank, res in enumerate(results):
        key = f"ring_probe/w{world}/ring"
        if f"w{world}/run_ring_probe/error" in res:
            pytest.fail(res[f"w{world}/run_ring_probe/error"])
        assert res[f"{key}/forward_blocks"] <= 2.1, (rank, res[f"{key}/forward_blocks"])
        assert 1 <= res[f"{key}/backward_blocks"] <= 5.5, (rank, res[f"{key}/backward_blocks"])
        assert res[f"{key}/saved_blocks"] < 0.1, (rank, res[f"{key}/saved_blocks"])
        assert res[f"{key}/forward_overlap"] and res[f"{key}/backward_overlap"], rank
        assert res[f"{key}/forward_block_sends"] == world - 1, rank
        assert res[f"{key}/backward_block_sends"] == 2 * world - 1, rank  # blocks + accumulators
        gather = f"ring_probe/w{world}/gather"
        assert res[f"{gather}/saved_blocks"] >= world - 0.1, rank  # it keeps the gathered keys
