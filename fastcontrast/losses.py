"""nn.Module twins of the functional losses (hold the options, call fastcontrast.functional)."""
import math

import torch
from torch import nn

from . import functional as F


def _format_value(value):
    """A repr field's value: floats (and 0-dim tensors) to 4 significant digits, else repr."""
    if isinstance(value, torch.Tensor):
        value = float(value.detach())
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def _matryoshka_options(dims, weights):
    """The Matryoshka keyword arguments a module passes on (none when not asked for, so that a
    loss without them, e.g. a distributed one, is called as before)."""
    options = {}
    if dims is not None:
        options["matryoshka_dims"] = tuple(dims)
    if weights is not None:
        options["matryoshka_weights"] = tuple(weights)
    return options


class _Loss(nn.Module):
    """Base of the loss modules: ``reduction``, ``backend``, ``distributed`` / ``group``, and
    the one ``extra_repr`` (the module's own fields from ``_repr_fields``, then the common ones).

    ``distributed="gather" | "ring"`` runs the loss of fastcontrast.distributed with that mode
    over ``group`` (None: all processes; see its convention); None: the single-process loss."""

    def __init__(self, reduction, backend, distributed=None, group=None):
        super().__init__()
        if distributed is not None and distributed not in ("gather", "ring"):
            raise ValueError(f"distributed must be None, 'gather' or 'ring', got {distributed!r}")
        self.reduction = reduction
        self.backend = backend
        self.distributed = distributed
        self.group = group

    def _loss(self, name, *args, **kwargs):
        """fastcontrast.functional.<name>, or fastcontrast.distributed.<name> in its mode."""
        if self.distributed is None:
            return getattr(F, name)(*args, **kwargs)
        from . import distributed as fcd  # imports torch.distributed only when asked for
        return getattr(fcd, name)(*args, mode=self.distributed, group=self.group, **kwargs)

    def _repr_fields(self):
        return {}

    def extra_repr(self):
        fields = {**self._repr_fields(), "reduction": self.reduction, "backend": self.backend}
        if self.distributed is not None:
            fields["distributed"] = self.distributed
        return ", ".join(f"{name}={_format_value(value)}" for name, value in fields.items())


def _filter_options(false_negative_margin, guide_margin, guide_margin_strategy, return_dropped):
    """The false-negative filter's options that differ from their defaults (none by default:
    a module without a filter calls the loss, and its distributed twin, as before)."""
    options = dict(false_negative_margin=false_negative_margin, guide_margin=guide_margin,
                   guide_margin_strategy=guide_margin_strategy, return_dropped=return_dropped)
    defaults = dict(false_negative_margin=None, guide_margin=0.0,
                    guide_margin_strategy="absolute", return_dropped=False)
    return {k: v for k, v in options.items() if v != defaults[k]}


def _guide(guide):
    return {} if guide is None else {"guide": guide}


class _ContrastiveLoss(_Loss):
    """Holds the temperature of a contrastive loss: a fixed float, or with
    ``learn_temperature=True`` a parameter stored as log(1/tau) (so it stays positive)."""

    # Options shown in the repr only when they differ from these defaults (the objectives).
    _OPTIONAL_DEFAULTS = dict(decoupled=False, dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0,
                              label_smoothing=0.0, matryoshka_dims=None, matryoshka_weights=None)

    def __init__(self, temperature, learn_temperature, reduction, backend, distributed=None,
                 group=None):
        super().__init__(reduction, backend, distributed, group)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")
        self.options = {}
        if learn_temperature:
            self.log_inverse_temperature = nn.Parameter(torch.tensor(-math.log(temperature)))
        else:
            self.register_parameter("log_inverse_temperature", None)
            self._temperature = float(temperature)

    @property
    def temperature(self):
        if self.log_inverse_temperature is None:
            return self._temperature
        return torch.exp(-self.log_inverse_temperature)

    def _repr_fields(self):
        options = {name: value for name, value in self.options.items()
                   if name not in self._OPTIONAL_DEFAULTS
                   or value != self._OPTIONAL_DEFAULTS[name]}
        return {"temperature": self.temperature,
                "learn_temperature": self.log_inverse_temperature is not None, **options}


class InfoNCELoss(_ContrastiveLoss):
    """Module form of :func:`fastcontrast.info_nce` (options as there)."""

    def __init__(self, temperature=0.07, *, normalize=True, in_batch_negatives=True,
                 exclude_self=False, symmetric=False, reduction="mean", decoupled=False,
                 dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0,
                 matryoshka_dims=None, matryoshka_weights=None, false_negative_margin=None,
                 guide_margin=0.0, guide_margin_strategy="absolute", return_dropped=False,
                 backend="auto", learn_temperature=False, distributed=None, group=None):
        super().__init__(temperature, learn_temperature, reduction, backend, distributed, group)
        self.options = dict(normalize=normalize, in_batch_negatives=in_batch_negatives,
                            exclude_self=exclude_self, symmetric=symmetric, decoupled=decoupled,
                            dclw_sigma=dclw_sigma, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                            label_smoothing=label_smoothing,
                            **_matryoshka_options(matryoshka_dims, matryoshka_weights),
                            **_filter_options(false_negative_margin, guide_margin,
                                              guide_margin_strategy, return_dropped))

    def forward(self, query, key, negatives=None, targets=None, query_labels=None,
                key_labels=None, guide=None):
        labels = {} if query_labels is None and key_labels is None else dict(
            query_labels=query_labels, key_labels=key_labels)
        return self._loss("info_nce", query, key, negatives, temperature=self.temperature,
                          targets=targets, reduction=self.reduction, backend=self.backend,
                          **self.options, **labels, **_guide(guide))


class NTXentLoss(_ContrastiveLoss):
    """Module form of :func:`fastcontrast.nt_xent` (SimCLR; DCL / DCLW / HCL options)."""

    def __init__(self, temperature=0.5, *, normalize=True, reduction="mean", decoupled=False,
                 dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0,
                 matryoshka_dims=None, matryoshka_weights=None, backend="auto",
                 learn_temperature=False, distributed=None, group=None):
        super().__init__(temperature, learn_temperature, reduction, backend, distributed, group)
        self.options = dict(normalize=normalize, decoupled=decoupled, dclw_sigma=dclw_sigma,
                            hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                            label_smoothing=label_smoothing,
                            **_matryoshka_options(matryoshka_dims, matryoshka_weights))

    def forward(self, z1, z2):
        return self._loss("nt_xent", z1, z2, temperature=self.temperature, reduction=self.reduction,
                         backend=self.backend, **self.options)


class SupConLoss(_ContrastiveLoss):
    """Module form of :func:`fastcontrast.supcon` (features (N, D) + labels, or (N, V, D))."""

    def __init__(self, temperature=0.1, *, normalize=True, reduction="mean", backend="auto",
                 learn_temperature=False, distributed=None, group=None):
        super().__init__(temperature, learn_temperature, reduction, backend, distributed, group)
        self.options = dict(normalize=normalize)

    @property
    def normalize(self):
        return self.options["normalize"]

    def forward(self, features, labels=None):
        return self._loss("supcon", features, labels, temperature=self.temperature,
                          normalize=self.normalize, reduction=self.reduction, backend=self.backend)


class MoCoLoss(_ContrastiveLoss):
    """Module form of :func:`fastcontrast.moco_loss`: the queue (a (K, D) tensor or a
    NegativeQueue) is passed to forward, so the module holds only the options."""

    def __init__(self, temperature=0.07, *, normalize=True, reduction="mean", decoupled=False,
                 hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0, false_negative_margin=None,
                 guide_margin=0.0, guide_margin_strategy="absolute", return_dropped=False,
                 backend="auto", learn_temperature=False, distributed=None, group=None):
        super().__init__(temperature, learn_temperature, reduction, backend, distributed, group)
        self.options = dict(normalize=normalize, decoupled=decoupled, hcl_beta=hcl_beta,
                            hcl_tau_plus=hcl_tau_plus, label_smoothing=label_smoothing,
                            **_filter_options(false_negative_margin, guide_margin,
                                              guide_margin_strategy, return_dropped))

    def forward(self, query, key, queue, query_index=None, guide=None):
        return self._loss("moco_loss", query, key, queue, temperature=self.temperature,
                           query_index=query_index, reduction=self.reduction,
                           backend=self.backend, **self.options, **_guide(guide))


class ClipLoss(_Loss):
    """Module form of :func:`fastcontrast.clip_loss`, optionally owning CLIP's learnable
    temperature: logit_scale = exp(log_logit_scale), clamped at ``max_logit_scale`` (100, as
    OpenCLIP). Pass ``logit_scale`` to forward to use a model-owned scale instead."""

    def __init__(self, init_logit_scale=1 / 0.07, *, learnable=True, max_logit_scale=100.0,
                 label_smoothing=0.0, matryoshka_dims=None, matryoshka_weights=None,
                 false_negative_margin=None, guide_margin=0.0, guide_margin_strategy="absolute",
                 return_dropped=False, reduction="mean", backend="auto", distributed=None,
                 group=None):
        super().__init__(reduction, backend, distributed, group)
        self.label_smoothing = label_smoothing
        self.matryoshka = _matryoshka_options(matryoshka_dims, matryoshka_weights)
        self.filter_options = _filter_options(false_negative_margin, guide_margin,
                                              guide_margin_strategy, return_dropped)
        if not (init_logit_scale > 0 and max_logit_scale > 0):
            raise ValueError(f"init_logit_scale and max_logit_scale must be positive, got "
                             f"{init_logit_scale!r}, {max_logit_scale!r}")
        log_scale = torch.tensor(math.log(init_logit_scale))
        if learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.max_logit_scale = float(max_logit_scale)

    @property
    def logit_scale(self):
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def _repr_fields(self):
        fields = {"logit_scale": self.logit_scale,
                  "learnable": isinstance(self.log_logit_scale, nn.Parameter),
                  "max_logit_scale": self.max_logit_scale}
        if self.label_smoothing:
            fields["label_smoothing"] = self.label_smoothing
        return {**fields, **self.matryoshka, **self.filter_options}

    def forward(self, image, text, logit_scale=None, logit_bias=None, labels=None, guide=None):
        scale = self.logit_scale if logit_scale is None else logit_scale
        extra = dict(self.matryoshka) if labels is None else {"labels": labels, **self.matryoshka}
        return self._loss("clip_loss", image, text, scale, logit_bias=logit_bias,
                          reduction=self.reduction, label_smoothing=self.label_smoothing,
                          backend=self.backend, **extra, **self.filter_options, **_guide(guide))


class SigLIPLoss(_Loss):
    """Module form of :func:`fastcontrast.siglip_loss`, owning SigLIP's logit_scale (stored as
    its log, init 10) and logit_bias (init -10), the paper's initialisation; learnable unless
    ``learnable=False``. Pass ``logit_scale`` / ``logit_bias`` to forward to use a model's own."""

    def __init__(self, init_logit_scale=10.0, init_logit_bias=-10.0, *, learnable=True,
                 reduction="mean", backend="auto", distributed=None, group=None):
        super().__init__(reduction, backend, distributed, group)
        if not (init_logit_scale > 0 and math.isfinite(init_logit_bias)):
            raise ValueError(f"init_logit_scale must be positive and init_logit_bias finite, got "
                             f"{init_logit_scale!r}, {init_logit_bias!r}")
        log_scale = torch.tensor(math.log(init_logit_scale))
        bias = torch.tensor(float(init_logit_bias))
        if learnable:
            self.log_logit_scale, self.logit_bias = nn.Parameter(log_scale), nn.Parameter(bias)
        else:
            self.register_buffer("log_logit_scale", log_scale)
            self.register_buffer("logit_bias", bias)

    def _repr_fields(self):
        return {"logit_scale": self.log_logit_scale.exp(), "logit_bias": self.logit_bias,
                "learnable": isinstance(self.log_logit_scale, nn.Parameter)}

    def forward(self, image, text, logit_scale=None, logit_bias=None):
        scale = self.log_logit_scale.exp() if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return self._loss("siglip_loss", image, text, scale, bias, reduction=self.reduction,
                           backend=self.backend)


class DistillInfoNCELoss(_ContrastiveLoss):
    """Module form of :func:`fastcontrast.distill_info_nce` (similarity distillation): holds the
    student's temperature (learnable with ``learn_temperature``) and the teacher's (fixed).
    forward(student_query, student_key, teacher_query, teacher_key); a CLIP model that owns its
    scales calls the functional form with temperature=1 / logit_scale instead."""

    def __init__(self, temperature=0.07, teacher_temperature=0.07, *, symmetric=True,
                 normalize=True, reduction="mean", backend="auto", learn_temperature=False,
                 distributed=None, group=None):
        super().__init__(temperature, learn_temperature, reduction, backend, distributed, group)
        if not (isinstance(teacher_temperature, (int, float))
                and math.isfinite(teacher_temperature) and teacher_temperature > 0):
            raise ValueError(f"teacher_temperature must be a positive finite float, got "
                             f"{teacher_temperature!r}")
        self.teacher_temperature = float(teacher_temperature)
        self.options = dict(symmetric=symmetric, normalize=normalize)

    def _repr_fields(self):
        return {**super()._repr_fields(), "teacher_temperature": self.teacher_temperature}

    def forward(self, student_query, student_key, teacher_query, teacher_key):
        return self._loss("distill_info_nce", student_query, student_key, teacher_query,
                          teacher_key, temperature=self.temperature,
                          teacher_temperature=self.teacher_temperature,
                          reduction=self.reduction, backend=self.backend, **self.options)


class DistillClipLoss(_Loss):
    """Module form of :func:`fastcontrast.distill_clip_loss` (OpenCLIP's DistillClipLoss, both
    terms in one fused pass): forward(student_image, student_text, teacher_image, teacher_text,
    logit_scale, teacher_logit_scale) -> (contrastive_loss, distill_loss). The scales come from
    the models (CLIP models own them), so the module holds only reduction and backend; for
    OpenCLIP's own signature use fastcontrast.compat.open_clip.DistillClipLoss."""

    def __init__(self, *, reduction="mean", backend="auto"):
        super().__init__(reduction, backend)

    def forward(self, student_image, student_text, teacher_image, teacher_text, logit_scale,
                teacher_logit_scale):
        return F.distill_clip_loss(student_image, student_text, teacher_image, teacher_text,
                                   logit_scale, teacher_logit_scale, reduction=self.reduction,
                                   backend=self.backend)
