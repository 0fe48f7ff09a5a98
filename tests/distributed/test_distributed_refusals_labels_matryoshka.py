"""The combinations of multiple positives and Matryoshka prefixes that the single-process losses
refuse are refused by fastcontrast.distributed too, with the same error, before any
communication (so without a process group here). The distributed values and gradients are
checked in test_distributed_losses.py (_multi_positive_cases.py, _matryoshka_cases.py)."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast import distributed as fcd

N, D = 4, 6


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(N, D, generator=gen) for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2])
    return q, k, labels


def _calls():
    q, k, labels = _inputs()
    both = dict(query_labels=labels, key_labels=labels)
    return {
        "mrl_label_smoothing": ("info_nce", (q, k), dict(matryoshka_dims=(2, 6),
                                                         label_smoothing=0.1)),
        "mrl_labels": ("info_nce", (q, k), dict(matryoshka_dims=(3,), **both)),
        "mrl_dcl": ("info_nce", (q, k), dict(matryoshka_dims=(3,), decoupled=True)),
        "mrl_per_query": ("info_nce", (q, k, torch.randn(N, 2, D)),
                          dict(matryoshka_dims=(3,))),
        "mrl_too_long": ("info_nce", (q, k), dict(matryoshka_dims=(3, 7))),
        "mrl_weights_alone": ("info_nce", (q, k), dict(matryoshka_weights=(1.0,))),
        "clip_mrl_labels": ("clip_loss", (q, k, 2.0), dict(labels=labels,
                                                           matryoshka_dims=(3,))),
        "clip_mrl_label_smoothing": ("clip_loss", (q, k, 2.0),
                                     dict(label_smoothing=0.1, matryoshka_dims=(3,))),
        "nt_xent_mrl_hcl": ("nt_xent", (q, k), dict(hcl_beta=0.5, matryoshka_dims=(3,))),
        "labels_one_side": ("info_nce", (q, k), dict(query_labels=labels)),
        "labels_targets": ("info_nce", (q, k), dict(targets=torch.arange(N), **both)),
        "labels_label_smoothing": ("info_nce", (q, k), dict(label_smoothing=0.1, **both)),
        "labels_dcl": ("info_nce", (q, k), dict(decoupled=True, **both)),
        "labels_no_in_batch": ("info_nce", (q, k, torch.randn(3, D)),
                               dict(in_batch_negatives=False, **both)),
        "clip_labels_label_smoothing": ("clip_loss", (q, k, 2.0),
                                        dict(labels=labels, label_smoothing=0.1)),
        "clip_labels_shape": ("clip_loss", (q, k, 2.0), dict(labels=labels[:3])),
    }


@pytest.mark.parametrize("what", sorted(_calls()))
def test_refused_as_single_process(what):
    name, args, kwargs = _calls()[what]
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as single:
        getattr(fc, name)(*args, **kwargs)
    with pytest.raises(single.type) as multi:  # no process group: raised before any exchange
        getattr(fcd, name)(*args, **kwargs)
    assert str(multi.value) == str(single.value)


def test_accepted_options_reach_the_process_group_check():
    """The supported combinations pass the local checks (the call then needs a group)."""
    q, k, labels = _inputs()
    for call in (lambda: fcd.info_nce(q, k, query_labels=labels, key_labels=labels,
                                      symmetric=True),
                 lambda: fcd.clip_loss(q, k, 2.0, labels=labels),
                 lambda: fcd.info_nce(q, k, matryoshka_dims=(2, 6), matryoshka_weights=(1, 2)),
                 lambda: fcd.clip_loss(q, k, 2.0, matryoshka_dims=(3,)),
                 lambda: fcd.nt_xent(q, k, matryoshka_dims=(3, 6))):
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()
