"""Evaluation of frozen features: linear probe, weighted kNN, the InfoNCE mutual-information
bound, and the baselines a trained encoder is compared with.

    feats = extract_features(encoder, images)              # eval mode, no grad, mode restored
    acc = linear_probe(train_feats, train_y, test_feats, test_y)   # logistic regression
    acc = knn_accuracy(train_feats, train_y, test_feats, test_y, k=20)
    bound = mi_lower_bound(loss, n_candidates)              # log(N) - L, in nats

Accuracies are fractions in [0, 1]. Features are (N, D) floating tensors, labels (N,) int64.
"""
import math
import numbers
import warnings

import torch
import torch.nn.functional as F

from .._validation import check_int, check_same

PROBE_BACKENDS = ("auto", "sklearn", "torch")
KNN_METRICS = ("cosine", "euclidean")
_warned_no_sklearn = False


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_split(prefix, features, labels):
    """(N, D) finite floating features and (N,) int64 labels of the same length and device."""
    name, label_name = f"{prefix}_features", f"{prefix}_labels"
    for n, t in ((name, features), (label_name, labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {features.dtype}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) tensor, got {_describe(features)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{label_name} must have dtype torch.int64, got {labels.dtype}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"{label_name} must have shape ({features.shape[0]},) to match {name}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"{label_name} must be on the device of {name} ({features.device}), "
                         f"got {labels.device}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(features)).sum())} "
                         f"non-finite values")


def _check_pair(train_features, train_labels, test_features, test_labels):
    _check_split("train", train_features, train_labels)
    _check_split("test", test_features, test_labels)
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features must have D = {train_features.shape[1]} (from "
                         f"train_features), got shape {tuple(test_features.shape)}")
    check_same("test_features", test_features, "train_features", train_features)


def _check_positive_float(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Linear probe


def _sklearn_available():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_sklearn(x, y, x_test, c, max_iter):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        # the iteration cap is a documented budget; an unconverged probe is still a probe
        warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
        model.fit(scaler.transform(x), y)
    return torch.from_numpy(model.predict(scaler.transform(x_test)))


def _probe_torch(x, y, x_test, c, max_iter):
    """Full-batch L-BFGS on sklearn's objective, divided by n:
    mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n), on train-standardised float64 features."""
    x, x_test = torch.from_numpy(x), torch.from_numpy(x_test)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x, x_test = (x - mean) / std, (x_test - mean) / std
    classes, target = torch.unique(torch.from_numpy(y), return_inverse=True)
    weight = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    penalty = 1.0 / (2.0 * c * len(x))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, target) + penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return classes[(x_test @ weight + bias).argmax(1)]


def linear_probe(train_features, train_labels, test_features, test_labels, *, C=1.0,
                 max_iter=1000, backend="auto"):
    """Test accuracy of a multinomial logistic regression trained on frozen features.

    Minimises sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C) (bias unpenalised) on features
    standardised with the training mean and standard deviation, and returns the fraction of
    test items whose arg-max class is their label. ``backend``: "sklearn" (LogisticRegression,
    L-BFGS), "torch" (the same objective, full-batch L-BFGS in float64: deterministic, no extra
    dependency) or "auto" (sklearn when installed, else torch with a one-time warning). A test
    label never seen in training counts as an error."""
    global _warned_no_sklearn
    _check_pair(train_features, train_labels, test_features, test_labels)
    c = _check_positive_float("C", C)
    max_iter = check_int("max_iter", max_iter)
    if backend not in PROBE_BACKENDS:
        raise ValueError(f"backend must be one of {PROBE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "sklearn" if _sklearn_available() else "torch"
        if backend == "torch" and not _warned_no_sklearn:
            _warned_no_sklearn = True
            warnings.warn("scikit-learn is not installed: linear_probe uses its torch L-BFGS "
                          "fallback (pip install scikit-learn for the reference solver)")
    elif backend == "sklearn" and not _sklearn_available():
        raise ImportError("linear_probe(backend='sklearn') needs scikit-learn: "
                          "pip install scikit-learn")
    x, x_test = (t.detach().cpu().to(torch.float64).numpy() for t in (train_features,
                                                                       test_features))
    y = train_labels.cpu().numpy()
    solve = _probe_sklearn if backend == "sklearn" else _probe_torch
    predicted = solve(x, y, x_test, c, max_iter)
    return float((predicted == test_labels.cpu()).double().mean())


# ---------------------------------------------------------------------------------------------
# kNN


def knn_predict(train_features, train_labels, test_features, *, k=20, temperature=0.07,
                metric="cosine", chunk_size=1024):
    """Weighted k-nearest-neighbour labels (Wu et al. 2018, InstDisc; DINO's kNN evaluation).

    For a test vector x, s_j = cos(x, x_j) ("cosine") or -||x - x_j|| ("euclidean") over the
    training vectors; the k largest s_j vote with weights exp(s_j / temperature) for their
    labels; the class with the largest total wins (the smallest label on a tie). Test rows are
    processed ``chunk_size`` at a time, so memory is O(chunk_size * n_train)."""
    k = check_int("k", k)
    t = _check_positive_float("temperature", temperature)
    chunk_size = check_int("chunk_size", chunk_size)
    if metric not in KNN_METRICS:
        raise ValueError(f"metric must be one of {KNN_METRICS}, got {metric!r}")
    # similarities in at least float32: fp16/bf16 rounding would create ties among neighbours
    work = torch.promote_types(train_features.dtype, torch.float32)
    train = train_features.detach().to(work)
    if metric == "cosine":
        train = F.normalize(train, dim=1)
    classes, target = torch.unique(train_labels, return_inverse=True)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test_features), chunk_size):
        chunk = test_features[start:start + chunk_size].detach().to(work)
        if metric == "cosine":
            sims = F.normalize(chunk, dim=1) @ train.T
        else:
            sims = -torch.cdist(chunk, train)
        top, where = sims.topk(k, dim=1)
        # exp((s - max s) / t): the same vote up to a per-row factor, without overflow
        weights = torch.exp((top - top[:, :1]) / t)
        votes = torch.zeros(len(chunk), len(classes), dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, target[where], weights)
        predictions.append(classes[votes.argmax(1)])
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k=20,
                 temperature=0.07, metric="cosine", chunk_size=1024):
    """Fraction of test items whose weighted kNN label (``knn_predict``) is their label."""
    _check_pair(train_features, train_labels, test_features, test_labels)
    predicted = knn_predict(train_features, train_labels, test_features, k=k,
                            temperature=temperature, metric=metric, chunk_size=chunk_size)
    return float((predicted == test_labels).double().mean())


# ---------------------------------------------------------------------------------------------
# Mutual information


def mi_lower_bound(loss, n_candidates):
    """InfoNCE lower bound on the mutual information of the two views, in nats:

        I(X; Y) >= log(N) - L_N

    where L_N is the mean InfoNCE loss (cross-entropy of the positive among N candidates: the
    positive and N - 1 negatives; van den Oord et al. 2018, Poole et al. 2019). It can never
    exceed log(N), so a large MI needs many candidates. ``loss``: a float or a tensor (returned
    as the same type, differentiable)."""
    n = check_int("n_candidates", n_candidates)
    if isinstance(loss, torch.Tensor):
        if not loss.is_floating_point():
            raise TypeError(f"loss must have a floating-point dtype, got {loss.dtype}")
        return math.log(n) - loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return math.log(n) - float(loss)
    raise TypeError(f"loss must be a float or a tensor, got {type(loss).__name__}")


# ---------------------------------------------------------------------------------------------
# Features and baselines


def extract_features(encoder, inputs, *, batch_size=256, device=None):
    """encoder(inputs) in batches of ``batch_size``, in eval mode and without gradients,
    flattened to (N, F) and returned on the CPU. Each submodule's train/eval mode is restored
    afterwards (also if the encoder raises). ``device``: where the batches run (default: the
    device of the encoder's first parameter, or the inputs' device if it has none)."""
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got {_describe(inputs)}")
    batch_size = check_int("batch_size", batch_size)
    if device is None:
        parameter = next(encoder.parameters(), None)
        device = parameter.device if parameter is not None else inputs.device
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    try:
        with torch.no_grad():
            outputs = [encoder(inputs[i:i + batch_size].to(device)).flatten(1).cpu()
                       for i in range(0, len(inputs), batch_size)]
    finally:
        for module, mode in modes:
            module.training = mode
    return torch.cat(outputs)


def raw_pixel_baseline(train_images, train_labels, test_images, test_labels, **probe_kwargs):
    """``linear_probe`` on the flattened pixels: the floor an encoder must beat."""
    for name, images in (("train_images", train_images), ("test_images", test_images)):
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise TypeError(f"{name} must be a (N, ...) tensor, got {type(images).__name__}")
    return linear_probe(train_images.flatten(1), train_labels, test_images.flatten(1),
                        test_labels, **probe_kwargs)


def untrained_baseline(make_encoder, train_inputs, train_labels, test_inputs, test_labels, *,
                       seeds=(0, 1, 2), k=20, batch_size=256):
    """Linear-probe and kNN accuracy of freshly initialised encoders, one per seed:
    {"probe": [..], "knn": [..], "probe_mean", "knn_mean"}. ``make_encoder()`` builds the
    encoder; its weights are drawn after torch.manual_seed(seed) inside a forked RNG, so the
    caller's random state is untouched."""
    if not callable(make_encoder):
        raise TypeError(f"make_encoder must be callable, got {type(make_encoder).__name__}")
    result = {"probe": [], "knn": []}
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = make_encoder()
        train = extract_features(encoder, train_inputs, batch_size=batch_size)
        test = extract_features(encoder, test_inputs, batch_size=batch_size)
        result["probe"].append(linear_probe(train, train_labels, test, test_labels))
        result["knn"].append(knn_accuracy(train, train_labels, test, test_labels, k=k))
    result["probe_mean"] = sum(result["probe"]) / len(seeds)
    result["knn_mean"] = sum(result["knn"]) / len(seeds)
    return result


def cluttered_digits_calibration(seeds=(0, 1, 2), *, out_dim=128, **dataset_kwargs):
    """The calibration numbers of the cluttered-digit benchmark: the fixed renderings of the
    train and test splits, then the raw-pixel probe and ``untrained_baseline`` of a
    ``SmallConvEncoder(out_dim=out_dim)`` over ``seeds``. Returns a dict of accuracies."""
    from .data import ClutteredDigits
    from .encoders import SmallConvEncoder

    train_x, train_y = ClutteredDigits("train", **dataset_kwargs).evaluation_set()
    test_x, test_y = ClutteredDigits("test", **dataset_kwargs).evaluation_set()
    result = {"raw_pixel_probe": raw_pixel_baseline(train_x, train_y, test_x, test_y)}
    untrained = untrained_baseline(lambda: SmallConvEncoder(out_dim=out_dim), train_x, train_y,
                                   test_x, test_y, seeds=seeds)
    result.update({f"untrained_{key}": value for key, value in untrained.items()})
    return result
