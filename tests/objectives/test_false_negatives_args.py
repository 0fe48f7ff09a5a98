"""The arguments of false-negative filtering (fastcontrast/_false_negative_args.py): bad input
errors naming the argument, the objectives it does not combine with, the module twins and the
distributed forms' refusal. The values are tested in test_false_negatives.py."""
import pytest
import torch

import fastcontrast as fc


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(false_negative_margin=-0.1), ValueError,
     r"false_negative_margin must be a finite number >= 0, got -0.1"),
    (dict(false_negative_margin=float("inf")), ValueError,
     r"false_negative_margin must be a finite number >= 0, got inf"),
    (dict(false_negative_margin="0.1"), TypeError,
     r"false_negative_margin must be a float or None, got str"),
    (dict(guide_margin=float("nan"), false_negative_margin=0.1), ValueError,
     r"guide_margin must be a finite number"),
    (dict(guide_margin=0.1), ValueError, r"pass guide=\(...\) with them"),
    (dict(guide_margin_strategy="soft", false_negative_margin=0.1), ValueError,
     r"guide_margin_strategy must be one of 'absolute', 'relative', got 'soft'"),
    (dict(return_dropped=True), ValueError, r"pass false_negative_margin or guide with it"),
    (dict(return_dropped=1, false_negative_margin=0.1), TypeError,
     r"return_dropped must be a bool"),
])
def test_bad_filter_arguments_are_refused(kwargs, error, match):
    q, k = torch.randn(2, 4, 3)
    for call in (lambda: fc.info_nce(q, k, **kwargs),
                 lambda: fc.clip_loss(q, k, 10.0, **kwargs),
                 lambda: fc.moco_loss(q, k, k, **kwargs)):
        with pytest.raises(error, match=match):
            call()


def test_bad_guides_are_refused():
    q, k, bank = torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3)
    g = torch.randn(4, 2)
    with pytest.raises(TypeError, match=r"guide must be a tuple \(guide_query, guide_key\), got "
                                        r"tuple of length 3"):
        fc.info_nce(q, k, guide=(g, g, g))
    with pytest.raises(TypeError, match=r"guide_query, guide_key, guide_negatives"):
        fc.info_nce(q, k, bank, guide=(g, g))
    with pytest.raises(ValueError, match=r"guide_key must have 4 rows \(as key\), got shape "
                                         r"\(3, 2\)"):
        fc.info_nce(q, k, guide=(g, g[:3]))
    with pytest.raises(ValueError, match=r"guide_text must have the guide dimension G = 2 "
                                         r"\(from guide_image\), got shape \(4, 5\)"):
        fc.clip_loss(q, k, 10.0, guide=(g, torch.randn(4, 5)))
    with pytest.raises(ValueError, match=r"guide_queue must have 5 rows \(as queue\)"):
        fc.moco_loss(q, k, bank, guide=(g, g, torch.randn(4, 2)))
    with pytest.raises(TypeError, match=r"guide_key must have a floating-point dtype"):
        fc.info_nce(q, k, guide=(g, torch.ones(4, 2, dtype=torch.long)))


@pytest.mark.parametrize("option, match", [
    (dict(exclude_self=True, targets=torch.tensor([1, 0, 3, 2])), "exclude_self"),
    (dict(decoupled=True), "decoupled"),
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(query_labels=torch.zeros(4, dtype=torch.long),
          key_labels=torch.zeros(4, dtype=torch.long)), "query_labels"),
])
def test_filter_refuses_the_objectives_it_does_not_combine_with(option, match):
    q, k = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=f"cannot be combined with {match}"):
        fc.info_nce(q, k, false_negative_margin=0.1, **option)
    with pytest.raises(ValueError, match="per-query negatives"):
        fc.info_nce(q, k, torch.randn(4, 2, 3), false_negative_margin=0.1)


def test_module_twins_take_the_filter():
    q, k = torch.randn(2, 6, 4)
    bank = torch.randn(5, 4)
    g = torch.randn(6, 3)
    assert torch.equal(fc.InfoNCELoss(0.2, false_negative_margin=0.1)(q, k),
                       fc.info_nce(q, k, temperature=0.2, false_negative_margin=0.1))
    loss, dropped = fc.InfoNCELoss(0.2, false_negative_margin=0.0, return_dropped=True)(
        q, k, guide=(g, g))
    expected = fc.info_nce(q, k, temperature=0.2, false_negative_margin=0.0, guide=(g, g),
                           return_dropped=True)
    assert torch.equal(loss, expected[0]) and torch.equal(dropped, expected[1])
    assert torch.equal(fc.MoCoLoss(0.2, false_negative_margin=0.1)(q, k, bank),
                       fc.moco_loss(q, k, bank, temperature=0.2, false_negative_margin=0.1))
    clip = fc.ClipLoss(10.0, learnable=False, false_negative_margin=0.5)
    assert torch.equal(clip(q, k), fc.clip_loss(q, k, clip.logit_scale,
                                                false_negative_margin=0.5))
    assert "false_negative_margin=0.5" in repr(clip)
    assert "false_negative_margin" not in repr(fc.InfoNCELoss())



def test_distributed_forms_refuse_what_single_process_refuses_before_communicating():
    """The distributed forms take the filter (tests/distributed) and refuse the combinations the
    single-process losses refuse, with their errors, before any collective (no process group
    here)."""
    from fastcontrast import distributed as fcd

    q, k = torch.randn(2, 4, 3)
    g = torch.randn(4, 2)
    for call, match in (
            (lambda: fcd.info_nce(q, k, false_negative_margin=0.1, exclude_self=True,
                                  targets=torch.tensor([1, 0, 3, 2])),
             "cannot be combined with exclude_self"),
            (lambda: fcd.info_nce(q, k, return_dropped=True), "return_dropped"),
            (lambda: fcd.clip_loss(q, k, 10.0, guide=(g, g), label_smoothing=0.1),
             "cannot be combined with label_smoothing"),
            (lambda: fcd.moco_loss(q, k, k, false_negative_margin=0.0, decoupled=True),
             "cannot be combined with decoupled"),
            (lambda: fcd.info_nce(q, k, guide=(g, g[:3])), "guide_key must have 4 rows")):
        with pytest.raises(ValueError, match=match):
            call()
