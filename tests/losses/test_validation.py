"""Bad input raises a clear TypeError / ValueError naming the argument, expected and actual."""
import math

import pytest
import torch

import fastcontrast

N, D = 6, 4


def q_k(n=N, m=N, d=D, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)


def partner_targets(n=N):
    return (torch.arange(n) + 1) % n


def _filled_queue(size, dim):
    queue = fastcontrast.NegativeQueue(size, dim)
    queue.enqueue(torch.randn(size, dim))
    return queue


BAD_CALLS = {
    "query_not_tensor": (lambda: fastcontrast.info_nce([[1.0]], q_k()[1]), TypeError,
                         r"query must be a torch.Tensor, got list"),
    "key_not_tensor": (lambda: fastcontrast.info_nce(q_k()[0], 3.0), TypeError,
                       r"key must be a torch.Tensor, got float"),
    "query_wrong_ndim": (lambda: fastcontrast.info_nce(torch.randn(N), q_k()[1]), ValueError,
                         r"query must be 2-D, got 1-D \(shape \(6,\)"),
    "key_3d": (lambda: fastcontrast.info_nce(q_k()[0], torch.randn(N, 2, D)), ValueError,
               r"key must be 2-D, got 3-D"),
    "integer_query": (lambda: fastcontrast.info_nce(torch.ones(N, D, dtype=torch.int64),
                                                    q_k()[1]), TypeError,
                      r"query must have a floating-point dtype, got torch.int64"),
    "feature_mismatch": (lambda: fastcontrast.info_nce(q_k()[0], torch.randn(N, D + 1)),
                         ValueError, r"key must have feature dimension D = 4 \(from query\), "
                                     r"got shape \(6, 5\)"),
    "batch_mismatch": (lambda: fastcontrast.info_nce(*q_k(m=N + 2)), ValueError,
                       r"key must have N = 6 rows .* got M = 8; pass targets"),
    "empty_batch": (lambda: fastcontrast.info_nce(*q_k(n=0, m=0)), ValueError,
                    r"query must not be empty, got shape \(0, 4\)"),
    "zero_dim": (lambda: fastcontrast.info_nce(*q_k(d=0)), ValueError,
                 r"query must not be empty, got shape \(6, 0\)"),
    "mixed_dtypes": (lambda: fastcontrast.info_nce(q_k()[0], q_k(dtype=torch.float64)[1]),
                     TypeError, r"key must have the dtype of query \(torch.float32\), "
                                r"got torch.float64"),
    "mixed_devices": (lambda: fastcontrast.info_nce(q_k()[0], q_k()[1].to("meta")), ValueError,
                      r"key must be on the device of query \(cpu\), got meta"),
    "negatives_wrong_dim": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(3, D + 2)),
                            ValueError, r"negatives must have feature dimension D = 4"),
    "per_query_wrong_n": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(N + 1, 3, D)),
                          ValueError, r"per-query negatives must have shape \(N=6, K, D=4\), "
                                      r"got \(7, 3, 4\)"),
    "negatives_4d": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(N, 3, D, 1)),
                     ValueError, r"negatives must be 2-D or 3-D, got 4-D"),
    "targets_out_of_range": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError,
        r"targets must index keys in \[0, 5\] \(M = 6\), got values in \[0, 6\]"),
    "targets_negative": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError,
        r"got values in \[-1, 4\]"),
    "targets_int32": (lambda: fastcontrast.info_nce(*q_k(), targets=torch.arange(N).int()),
                      TypeError, r"targets must have dtype torch.int64, got torch.int32"),
    "targets_wrong_shape": (lambda: fastcontrast.info_nce(*q_k(), targets=torch.arange(N - 1)),
                            ValueError, r"targets must have shape \(6,\) .* got \(5,\)"),
    "targets_list": (lambda: fastcontrast.info_nce(*q_k(), targets=[0] * N), TypeError,
                     r"targets must be a torch.Tensor of int64, got list"),
    "temperature_zero": (lambda: fastcontrast.info_nce(*q_k(), temperature=0.0), ValueError,
                         r"temperature must be positive and finite, got 0.0"),
    "temperature_negative": (lambda: fastcontrast.info_nce(*q_k(), temperature=-0.1),
                             ValueError, r"temperature must be positive and finite, got -0.1"),
    "temperature_nan": (lambda: fastcontrast.info_nce(*q_k(), temperature=math.nan), ValueError,
                        r"temperature must be positive and finite, got nan"),
    "temperature_inf_tensor": (lambda: fastcontrast.info_nce(
        *q_k(), temperature=torch.tensor(math.inf)), ValueError,
        r"temperature must be positive and finite, got inf"),
    "temperature_vector": (lambda: fastcontrast.info_nce(*q_k(), temperature=torch.ones(2)),
                           ValueError, r"temperature must be a float or a 0-dim tensor, "
                                       r"got shape \(2,\)"),
    "temperature_string": (lambda: fastcontrast.info_nce(*q_k(), temperature="0.1"), TypeError,
                           r"temperature must be a float or a 0-dim tensor, got str"),
    "temperature_bool": (lambda: fastcontrast.info_nce(*q_k(), temperature=True), TypeError,
                         r"temperature must be a float or a 0-dim tensor, got bool"),
    "unknown_reduction": (lambda: fastcontrast.info_nce(*q_k(), reduction="avg"), ValueError,
                          r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    "unknown_backend": (lambda: fastcontrast.info_nce(*q_k(), backend="cuda-magic"), ValueError,
                        r"backend must be one of 'auto', 'reference', 'torch', 'cpu', 'triton', "
                        r"got 'cuda-magic'"),
    "symmetric_with_targets": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.arange(N), symmetric=True), ValueError,
        r"symmetric=True needs N == M and targets=None"),
    "symmetric_n_ne_m": (lambda: fastcontrast.info_nce(
        *q_k(m=N + 1), targets=torch.arange(N), symmetric=True), ValueError,
        r"symmetric=True needs N == M and targets=None, got N = 6, M = 7"),
    "symmetric_with_negatives": (lambda: fastcontrast.info_nce(
        *q_k(), torch.randn(3, D), symmetric=True), ValueError,
        r"symmetric=True supports neither negatives"),
    "exclude_self_without_targets": (lambda: fastcontrast.info_nce(*q_k(), exclude_self=True),
                                     ValueError, r"exclude_self=True needs targets"),
    "exclude_self_positive_is_self": (lambda: fastcontrast.info_nce(
        *q_k(), exclude_self=True, targets=torch.arange(N)), ValueError,
        r"targets\[i\] must differ from i"),
    "exclude_self_m_ne_n": (lambda: fastcontrast.info_nce(
        *q_k(m=N + 2), exclude_self=True, targets=partner_targets()), ValueError,
        r"exclude_self=True needs query and key to be the same set \(M == N\), got N = 6, M = 8"),
    "flag_not_bool": (lambda: fastcontrast.info_nce(*q_k(), normalize="yes"), TypeError,
                      r"normalize must be a bool, got str"),
    "cpu_backend_on_meta": (lambda: fastcontrast.info_nce(
        *(t.to("meta") for t in q_k()), backend="cpu"), ValueError,
        r"backend='cpu' needs CPU tensors, got tensors on meta"),
    "moco_queue_wrong_dim": (lambda: fastcontrast.moco_loss(*q_k(), torch.randn(7, D + 1)),
                             ValueError, r"^queue must have feature dimension D = 4 \(from "
                                         r"query\), got shape \(7, 5\)$"),
    "moco_negative_queue_wrong_dim": (lambda: fastcontrast.MoCoLoss()(
        *q_k(), _filled_queue(7, D + 1)), ValueError,
        r"^queue must have feature dimension D = 4 \(from query\), got shape \(7, 5\)$"),
    "clip_shape_mismatch": (lambda: fastcontrast.clip_loss(
        torch.randn(N, D), torch.randn(N + 1, D), 10.0), ValueError,
        r"text must have the shape of image \(6, 4\) .*, got \(7, 4\)"),
    "clip_scale_negative": (lambda: fastcontrast.clip_loss(*q_k(), -1.0), ValueError,
                            r"logit_scale must be positive and finite, got -1.0"),
    "clip_image_not_tensor": (lambda: fastcontrast.clip_loss(None, q_k()[1], 10.0), TypeError,
                              r"image must be a torch.Tensor, got NoneType"),
    "nt_xent_labels_as_second_view": (lambda: fastcontrast.NTXentLoss(0.5)(
        torch.randn(N, D), torch.arange(N)), TypeError,
        r"z2 must have a floating-point dtype, got torch.int64: the second argument of nt_xent "
        r"/ NTXentLoss is the second view .* use fastcontrast.supcon / SupConLoss"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    call, error, pattern = BAD_CALLS[name]
    with pytest.raises(error, match=pattern):
        call()


def test_triton_backend_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        fastcontrast.info_nce(*q_k(), backend="triton")


def test_triton_backend_refuses_float64():
    if "triton" not in fastcontrast.available_backends("cuda" if torch.cuda.is_available()
                                                        else "cpu"):
        pytest.skip("triton unavailable")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (t.to(device) for t in q_k(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"backend='triton' computes in float16/bfloat16/float32, "
                                        r"got float64"):
        fastcontrast.info_nce(q, k, backend="triton")


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be a positive finite float"):
        fastcontrast.InfoNCELoss(temperature=0.0)
