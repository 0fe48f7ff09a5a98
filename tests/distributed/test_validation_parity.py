"""The same bad input raises the same exception, with the same message, from a single-process
loss and from its distributed twin (both call fastcontrast._loss_args), here in a 1-process gloo
group; the one documented difference is that distributed targets index the keys of all
ranks."""
import math
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastcontrast as fc
from fastcontrast import distributed as fcd

N, D = 6, 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo unavailable")
    # Loopback only, as the multi-process tests: the host may have no routable interface.
    set_ifname = sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ
    if set_ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            world_size=1, rank=0, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()
        if set_ifname:
            del os.environ["GLOO_SOCKET_IFNAME"]


def _x(n=N, d=D, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


def _indexed_queue(size=7, dim=D):
    queue = fc.NegativeQueue(size, dim, store_indices=True)
    queue.enqueue(torch.randn(size, dim), indices=torch.arange(size))
    return queue


# name: (loss, args builder, keyword arguments). Every rule whose two layers once worded it
# differently is here (per-query negatives, targets' shape and device, M != N without targets,
# symmetric's conditions), with a sample of the others for every loss.
BAD = {
    "info_nce/query_not_tensor": ("info_nce", lambda: ([[1.0]], _x()), {}),
    "info_nce/feature_dim": ("info_nce", lambda: (_x(), _x(d=D + 1)), {}),
    "info_nce/mixed_dtypes": ("info_nce", lambda: (_x(), _x(dtype=torch.float64)), {}),
    "info_nce/negatives_4d": ("info_nce", lambda: (_x(), _x(), torch.randn(N, 3, D, 1)), {}),
    "info_nce/per_query_wrong_n": ("info_nce", lambda: (_x(), _x(), torch.randn(N + 1, 3, D)),
                                   {}),
    "info_nce/targets_shape": ("info_nce", lambda: (_x(), _x()),
                               {"targets": torch.arange(N - 1)}),
    "info_nce/targets_int32": ("info_nce", lambda: (_x(), _x()),
                               {"targets": torch.arange(N).int()}),
    "info_nce/targets_device": ("info_nce", lambda: (_x(), _x()),
                                {"targets": torch.arange(N, device="meta")}),
    "info_nce/m_ne_n_without_targets": ("info_nce", lambda: (_x(), _x(n=N + 2)), {}),
    "info_nce/exclude_self_without_targets": ("info_nce", lambda: (_x(), _x()),
                                              {"exclude_self": True}),
    "info_nce/exclude_self_m_ne_n": ("info_nce", lambda: (_x(), _x(n=N + 2)),
                                     {"exclude_self": True, "targets": torch.arange(N)}),
    "info_nce/symmetric_with_targets": ("info_nce", lambda: (_x(), _x()),
                                        {"symmetric": True, "targets": torch.arange(N)}),
    "info_nce/symmetric_with_negatives": ("info_nce", lambda: (_x(), _x(), _x(n=3)),
                                          {"symmetric": True}),
    "info_nce/symmetric_no_in_batch": ("info_nce", lambda: (_x(), _x()),
                                       {"symmetric": True, "in_batch_negatives": False}),
    "info_nce/symmetric_decoupled": ("info_nce", lambda: (_x(), _x()),
                                     {"symmetric": True, "decoupled": True}),
    "info_nce/flag_not_bool": ("info_nce", lambda: (_x(), _x()), {"normalize": "yes"}),
    "info_nce/reduction": ("info_nce", lambda: (_x(), _x()), {"reduction": "avg"}),
    "info_nce/temperature_zero": ("info_nce", lambda: (_x(), _x()), {"temperature": 0.0}),
    "info_nce/temperature_vector": ("info_nce", lambda: (_x(), _x()),
                                    {"temperature": torch.ones(2)}),
    "info_nce/dclw_without_decoupled": ("info_nce", lambda: (_x(), _x()), {"dclw_sigma": 0.5}),
    "info_nce/hcl_tau_plus_one": ("info_nce", lambda: (_x(), _x()), {"hcl_tau_plus": 1.0}),
    "info_nce/query_ids_alone": ("info_nce", lambda: (_x(), _x(), _x(n=3)),
                                 {"query_ids": torch.arange(N)}),
    "info_nce/ids_without_bank": ("info_nce", lambda: (_x(), _x()),
                                  {"query_ids": torch.arange(N), "negative_ids": torch.arange(3)}),
    "info_nce/unknown_backend": ("info_nce", lambda: (_x(), _x()), {"backend": "cuda-magic"}),
    "clip_loss/shape": ("clip_loss", lambda: (_x(), _x(n=N + 1), 10.0), {}),
    "clip_loss/scale_negative": ("clip_loss", lambda: (_x(), _x(), -1.0), {}),
    "clip_loss/bias_type": ("clip_loss", lambda: (_x(), _x(), 10.0), {"logit_bias": "0"}),
    "clip_loss/reduction": ("clip_loss", lambda: (_x(), _x(), 10.0), {"reduction": "avg"}),
    "nt_xent/labels_as_view": ("nt_xent", lambda: (_x(), torch.arange(N)), {}),
    "nt_xent/shape": ("nt_xent", lambda: (_x(), _x(n=N + 1)), {}),
    "nt_xent/temperature": ("nt_xent", lambda: (_x(), _x()), {"temperature": -1.0}),
    "nt_xent/normalize": ("nt_xent", lambda: (_x(), _x()), {"normalize": 1}),
    "nt_xent/hcl_beta": ("nt_xent", lambda: (_x(), _x()), {"hcl_beta": -0.5}),
    "supcon/no_labels": ("supcon", lambda: (_x(),), {}),
    "supcon/labels_int32": ("supcon", lambda: (_x(), torch.arange(N).int()), {}),
    "supcon/temperature": ("supcon", lambda: (torch.randn(N, 2, D),), {"temperature": 0.0}),
    "moco_loss/queue_dim": ("moco_loss", lambda: (_x(), _x(), _x(n=7, d=D + 1)), {}),
    "moco_loss/query_index_plain_queue": ("moco_loss", lambda: (_x(), _x(), _x(n=7)),
                                          {"query_index": torch.arange(N)}),
    "moco_loss/query_index_shape": ("moco_loss", lambda: (_x(), _x(), _indexed_queue()),
                                    {"query_index": torch.arange(N + 1)}),
    "moco_loss/reduction": ("moco_loss", lambda: (_x(), _x(), _x(n=7)), {"reduction": "avg"}),
    "moco_loss/key_shape": ("moco_loss", lambda: (_x(), _x(n=N + 1), _x(n=7)), {}),
    "siglip_loss/shape": ("siglip_loss", lambda: (_x(), _x(d=D + 1), 10.0, -10.0), {}),
    "siglip_loss/bias_nan": ("siglip_loss", lambda: (_x(), _x(), 10.0, math.nan), {}),
    "siglip_loss/scale_inf": ("siglip_loss", lambda: (_x(), _x(), torch.tensor(math.inf), 0.0),
                              {}),
    # the false-negative filter (distributed/filtered.py) and distillation (distributed/distill.py)
    "info_nce/fn_margin_negative": ("info_nce", lambda: (_x(), _x()),
                                    {"false_negative_margin": -0.1}),
    "info_nce/fn_guide_rows": ("info_nce", lambda: (_x(), _x()),
                               {"guide": (_x(d=3), _x(n=N - 1, d=3))}),
    "info_nce/fn_dropped_alone": ("info_nce", lambda: (_x(), _x()), {"return_dropped": True}),
    "info_nce/fn_with_dcl": ("info_nce", lambda: (_x(), _x()),
                             {"false_negative_margin": 0.1, "decoupled": True}),
    "info_nce/fn_per_query": ("info_nce", lambda: (_x(), _x(), torch.randn(N, 3, D)),
                              {"false_negative_margin": 0.1}),
    "clip_loss/fn_guide_tuple": ("clip_loss", lambda: (_x(), _x(), 10.0),
                                 {"guide": (_x(d=3),)}),
    "clip_loss/fn_strategy": ("clip_loss", lambda: (_x(), _x(), 10.0),
                              {"guide": (_x(d=3), _x(d=3)), "guide_margin_strategy": "ratio"}),
    "moco_loss/fn_guide_queue_rows": ("moco_loss", lambda: (_x(), _x(), _x(n=7)),
                                      {"guide": (_x(d=3), _x(d=3), _x(n=6, d=3))}),
    "moco_loss/fn_with_label_smoothing": ("moco_loss", lambda: (_x(), _x(), _x(n=7)),
                                          {"false_negative_margin": 0.0,
                                           "label_smoothing": 0.1}),
    "distill_info_nce/teacher_rows": ("distill_info_nce",
                                      lambda: (_x(), _x(), _x(d=3), _x(n=N - 1, d=3)),
                                      {"temperature": 0.1, "teacher_temperature": 0.1}),
    "distill_info_nce/symmetric_m_ne_n": ("distill_info_nce",
                                          lambda: (_x(), _x(n=N + 1), _x(d=3), _x(n=N + 1, d=3)),
                                          {"temperature": 0.1, "teacher_temperature": 0.1}),
    "distill_info_nce/teacher_temperature": ("distill_info_nce",
                                             lambda: (_x(), _x(), _x(d=3), _x(d=3)),
                                             {"temperature": 0.1, "teacher_temperature": 0.0}),
}


def _raised(fn, args, kwargs):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name", list(BAD))
def test_same_error_in_both_layers(one_rank_group, name):
    loss, make_args, kwargs = BAD[name]
    args = make_args()
    single = _raised(getattr(fc, loss), args, kwargs)
    assert _raised(getattr(fcd, loss), args, kwargs) == single


def test_targets_index_the_keys_of_all_ranks(one_rank_group):
    """The one rule worded per layer: distributed targets index the keys of every rank (one
    rank here, so the same bound), and exclude_self compares them with the global row index."""
    q, k = _x(), _x()
    out_of_range = torch.tensor([0, 1, 2, 3, 4, 6])
    with pytest.raises(ValueError, match=r"^targets must index keys in \[0, 5\] \(M = 6\), "
                                         r"got values in \[0, 6\]$"):
        fc.info_nce(q, k, targets=out_of_range)
    with pytest.raises(ValueError, match=r"^targets must index the keys of all ranks in \[0, 5\] "
                                         r"\(M_total = 6\), got values in \[0, 6\]$"):
        fcd.info_nce(q, k, targets=out_of_range)
    with pytest.raises(ValueError, match=r"targets\[i\] must differ from i \(the positive"):
        fc.info_nce(q, q, exclude_self=True, targets=torch.arange(N))
    with pytest.raises(ValueError, match=r"targets\[i\] must differ from the global index of "
                                         r"row i \(the positive"):
        fcd.info_nce(q, q, exclude_self=True, targets=torch.arange(N))
