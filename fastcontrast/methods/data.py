"""Embedded data sets for the reference methods (nothing is downloaded) and their augmentations.

Interface every method expects (a user's own data plugs in the same way):

* a ``torch.utils.data.Dataset`` whose item ``i`` is ``(image, label)``: ``image`` a float tensor
  (C, H, W) (or (C, T) for sequences), ``label`` an int64 scalar tensor;
* an augmentation callable ``augment(images, generator=None) -> views``: a batch (B, C, H, W) in,
  one freshly randomised view per image out, (B, C', H', W'). A method calls it once per view,
  so two calls give two independent views. ``generator`` (a ``torch.Generator`` or None for the
  global one) makes the views reproducible.

Data sets here:

* ``ClutteredDigits``: scikit-learn's 8x8 digits (1797 images, values 0..16, scaled to [0, 1])
  drawn at a random position on a ``canvas`` x ``canvas`` image (24 by default) with a few 4x4
  fragments cut from other random digits pasted at random positions as clutter. Every view is
  rendered afresh (position and clutter are the nuisances a contrastive objective must learn to
  ignore); ``evaluation_set(split)`` is one fixed rendering with a fixed seed.
* ``SyntheticSpeakers``: 1-D sequences whose class (the "speaker") is a set of frequencies,
  identifiable from a long context but not from a short window (see its docstring).

Augmentations for the methods that need more than two renderings: ``random_resized_crops``
(AMDIM: crops of different scale), ``split_halves`` and ``filtered_views`` (CMC: two views of
one image).
"""
import math
import numbers

import torch
import torch.nn.functional as F

from .. import _validation as check

SPLITS = ("train", "test")
DIGIT = 8        # side of a scikit-learn digit
FRAGMENT = 4     # side of a clutter fragment
DIGIT_MAX = 16.0  # largest intensity in scikit-learn's digits


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_fraction(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return float(value)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")


def _check_images(name, images, channels=None):
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {images.dtype}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (B, C, H, W) batch, "
                         f"got shape {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape "
                         f"{tuple(images.shape)}")


def load_digit_images():
    """scikit-learn's digits as (images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64).

    Read from the data file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what
    ``load_digits`` parses) without importing scikit-learn, which takes seconds (paid by every
    process of ``fastcontrast train --nproc N``); ``load_digits`` where the file is not found."""
    import importlib.util
    import os

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None:  # pragma: no cover - depends on the environment
        raise ImportError("fastcontrast.methods.data needs scikit-learn for its embedded "
                          "digits: pip install scikit-learn")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data",
                        "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # pragma: no cover - a scikit-learn that stores its data elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target
    images = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32) / DIGIT_MAX
    return images, torch.from_numpy(np.asarray(target)).to(torch.int64)


def stratified_split(labels, test_fraction=0.3, seed=0):
    """(train_indices, test_indices), both sorted: round(test_fraction * n_c) of the n_c items of
    every class c go to the test split, chosen by a permutation seeded with ``seed``."""
    test_fraction = _check_fraction("test_fraction", test_fraction)
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class ClutterRenderer:
    """Draws 8x8 digits on a blank canvas with clutter: the augmentation of ``ClutteredDigits``.

    ``renderer(digits, generator)`` with digits (B, 1, 8, 8) in [0, 1] returns (B, 1, canvas,
    canvas): each digit at a uniformly random top-left corner (r, c) in [0, canvas - 8]^2 (so it
    lies entirely inside), plus ``n_fragments`` 4x4 patches, each cut at a random offset in
    [0, 4]^2 of a random digit of ``pool`` and pasted at a random corner in [0, canvas - 4]^2.
    Overlaps keep the brighter pixel (max), so values stay in [0, 1]. ``n_fragments`` is an int
    or an inclusive range (lo, hi) drawn per image. ``own_index`` (B,) (positions in ``pool`` of
    the digits drawn) keeps a digit's own pixels out of its clutter; without it a fragment comes
    from the same digit with probability 1 / len(pool).

    Random draws, in order: digit corners, fragment count, sources, offsets, corners. The digit
    corners come first, so two renderers that differ only in clutter place the digits alike.
    One scatter (max) per batch, on the CPU (about 1 ms for 512 views on one thread); the views
    come back on the device and in the dtype of ``digits``."""

    def __init__(self, pool, *, canvas=24, n_fragments=4):
        if not isinstance(pool, torch.Tensor) or pool.dim() != 3 or pool.shape[1:] != (DIGIT,
                                                                                       DIGIT):
            shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
            raise ValueError(f"pool must be a (P, 8, 8) tensor of digits, got {shape}")
        if len(pool) < 2:
            raise ValueError(f"pool must hold at least 2 digits, got {len(pool)}")
        self.canvas = check.check_int("canvas", canvas, DIGIT)
        if isinstance(n_fragments, numbers.Integral) and not isinstance(n_fragments, bool):
            lo = hi = check.check_int("n_fragments", n_fragments, 0)
        elif isinstance(n_fragments, (tuple, list)) and len(n_fragments) == 2:
            lo = check.check_int("n_fragments[0]", n_fragments[0], 0)
            hi = check.check_int("n_fragments[1]", n_fragments[1], lo)
        else:
            raise TypeError(f"n_fragments must be an int or a (lo, hi) pair, got {n_fragments!r}")
        self.n_fragments = (lo, hi)
        self.pool = pool.to(torch.float32)

    def _corners(self, shape, high, generator):
        return torch.randint(0, high + 1, shape + (2,), generator=generator)

    def _flat_positions(self, corners, size):
        """Flat canvas indices (..., size * size) of size x size patches at ``corners`` (..., 2)."""
        offsets = torch.arange(size)
        rows = corners[..., 0, None, None] + offsets[:, None]
        cols = corners[..., 1, None, None] + offsets[None, :]
        return (rows * self.canvas + cols).flatten(-2)

    def __call__(self, digits, generator=None, *, own_index=None):
        _check_images("digits", digits, channels=1)
        if digits.shape[2:] != (DIGIT, DIGIT):
            raise ValueError(f"digits must be (B, 1, 8, 8), got shape {tuple(digits.shape)}")
        _check_generator(generator)
        b, (lo, hi), pool = digits.shape[0], self.n_fragments, self.pool
        positions = [self._flat_positions(
            self._corners((b,), self.canvas - DIGIT, generator), DIGIT)]
        values = [digits.reshape(b, DIGIT * DIGIT).to("cpu", torch.float32)]
        if hi > 0:
            count = torch.randint(lo, hi + 1, (b, 1), generator=generator)
            if own_index is None:
                source = torch.randint(0, len(pool), (b, hi), generator=generator)
            else:  # uniform over the pool minus the digit itself
                source = torch.randint(0, len(pool) - 1, (b, hi), generator=generator)
                source = source + (source >= own_index.reshape(b, 1).cpu()).long()
            offset = self._corners((b, hi), DIGIT - FRAGMENT, generator)
            patch = torch.arange(FRAGMENT)
            rows = offset[..., 0, None, None] + patch[:, None]
            cols = offset[..., 1, None, None] + patch[None, :]
            fragments = pool[source[..., None, None], rows, cols]     # (b, hi, 4, 4)
            fragments = fragments * (torch.arange(hi) < count).unsqueeze(-1).unsqueeze(-1)
            positions.append(self._flat_positions(
                self._corners((b, hi), self.canvas - FRAGMENT, generator), FRAGMENT).flatten(1))
            values.append(fragments.flatten(1))
        canvas = torch.zeros(b, self.canvas * self.canvas)
        canvas.scatter_reduce_(1, torch.cat(positions, 1), torch.cat(values, 1), "amax")
        return canvas.view(b, 1, self.canvas, self.canvas).to(digits.device, digits.dtype)


class ClutteredDigits(torch.utils.data.Dataset):
    """Cluttered translated digits: one split of scikit-learn's digits and its renderer.

    ``dataset[i]`` is ``(digit (1, 8, 8) in [0, 1], label)``; ``dataset.augment`` (a
    ``ClutterRenderer`` whose clutter comes from this split's digits only) turns a batch of them
    into (B, 1, canvas, canvas) views. ``render(indices, generator)`` renders items of this split,
    ``two_views`` two independent renderings, ``evaluation_set()`` one fixed rendering.

    The split is stratified: ``test_fraction`` of every class (30% by default: 1258 train, 539
    test digits) goes to "test", chosen with ``split_seed``; both splits of one ``split_seed``
    are disjoint and together cover all 1797 digits."""

    def __init__(self, split="train", *, canvas=24, n_fragments=4, test_fraction=0.3,
                 split_seed=0):
        _check_split(split)
        images, labels = load_digit_images()
        train, test = stratified_split(labels, test_fraction, split_seed)
        self.split = split
        self.indices = train if split == "train" else test    # positions in the 1797 digits
        self.digits = images[self.indices].unsqueeze(1)        # (n, 1, 8, 8)
        self.labels = labels[self.indices]
        self.num_classes = 10
        self.augment = ClutterRenderer(self.digits[:, 0], canvas=canvas, n_fragments=n_fragments)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.digits[i], self.labels[i]

    def _as_indices(self, indices):
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            raise TypeError(f"indices must be a 1-D integer tensor, got dtype {indices.dtype}, "
                            f"shape {tuple(indices.shape)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices.long()

    def render(self, indices, generator=None):
        """(B, 1, canvas, canvas) fresh renderings of the items ``indices`` of this split."""
        indices = self._as_indices(indices)
        return self.augment(self.digits[indices], generator, own_index=indices)

    def two_views(self, indices, generator=None):
        """Two independent renderings (view_a, view_b) of the same items."""
        return self.render(indices, generator), self.render(indices, generator)

    def evaluation_set(self, seed=1234):
        """(images (n, 1, canvas, canvas), labels (n,)): every item of the split, rendered once
        with a generator seeded by ``seed``: the same tensors on every call."""
        generator = torch.Generator().manual_seed(seed)
        return self.render(torch.arange(len(self)), generator), self.labels.clone()


def evaluation_set(split="test", *, seed=1234, **kwargs):
    """Fixed rendering of a ``ClutteredDigits`` split: (images, labels). ``kwargs`` go to
    ``ClutteredDigits`` (canvas, n_fragments, test_fraction, split_seed)."""
    return ClutteredDigits(split, **kwargs).evaluation_set(seed)


# ---------------------------------------------------------------------------------------------
# Augmentations for methods that need other views


def random_resized_crops(images, size, scale=(0.3, 1.0), generator=None):
    """One random square crop per image, resized to ``size`` x ``size`` (bilinear).

    The crop side is sqrt(a) times the image side with a ~ U(scale) (its area fraction), its
    centre uniform over the positions that keep it inside the image. Two calls with different
    ``size``/``scale`` give AMDIM's two views of different scale."""
    _check_images("images", images)
    _check_generator(generator)
    size = check.check_int("size", size, 1)
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    b = images.shape[0]
    side = torch.sqrt(lo + (hi - lo) * torch.rand(b, generator=generator))  # fraction of side
    centre = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - side[:, None])
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = centre      # affine_grid's (x, y) order; both axes drawn alike
    grid = F.affine_grid(theta, (b, images.shape[1], size, size), align_corners=False)
    work = images.dtype if images.dtype == torch.float64 else torch.float32
    return F.grid_sample(images.to(work), grid.to(images.device, work), mode="bilinear",
                         padding_mode="zeros", align_corners=False).to(images.dtype)


def split_halves(images, axis="rows"):
    """CMC's region views: (top, bottom) halves for axis="rows", (left, right) for "cols".
    An odd side gives the middle line to the second half."""
    _check_images("images", images)
    if axis not in ("rows", "cols"):
        raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")
    dim = 2 if axis == "rows" else 3
    half = images.shape[dim] // 2
    if half == 0:
        raise ValueError(f"images must have at least 2 {axis}, got shape {tuple(images.shape)}")
    return images.narrow(dim, 0, half), images.narrow(dim, half, images.shape[dim] - half)


def filtered_views(images, sigma=1.0):
    """CMC's "channel" views of a grey image: (low-pass, high-pass) = (G * x, x - G * x) with G a
    normalised Gaussian of standard deviation ``sigma`` pixels (radius ceil(3 sigma)), applied per
    channel with zero padding. The two views add up to the image."""
    _check_images("images", images)
    if not isinstance(sigma, numbers.Real) or not sigma > 0:
        raise ValueError(f"sigma must be a positive float, got {sigma!r}")
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    low = F.conv2d(images, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0),
                   groups=c)
    low = F.conv2d(low, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius),
                   groups=c)
    return low, images - low


# ---------------------------------------------------------------------------------------------
# Sequences for CPC


class SyntheticSpeakers(torch.utils.data.Dataset):
    """Synthetic "speakers": sequences whose class is identifiable only from a long context.

    A shared bank of ``n_frequencies`` frequencies (cycles per sample) is spread evenly over
    [0.05, 0.05 + (n_frequencies - 1) * spacing]; speaker s owns a fixed set F_s of ``per_speaker``
    of them (distinct sets, drawn with ``speaker_seed``). A sequence of speaker s is

        x(t) = sum_{f in F_s} a_f(t) sin(2 pi f t + phi_f) + noise_std * eps(t)

    with phases phi_f ~ U[0, 2 pi) and white Gaussian noise eps, fresh for every sequence, and
    amplitude envelopes a_f(t) = 0.5 + u_f(t), u_f linear interpolation of U[0, 1) knots every
    ``length / 8`` samples (so every component keeps a positive amplitude). Each sequence is
    standardised to zero mean and unit variance.

    Why a short window is not enough: the frequencies are ``spacing`` apart (0.003 by default),
    so telling neighbours apart needs a window longer than 1 / spacing = 333 samples; every
    frequency is shared by several speakers, so one resolved frequency is not enough either;
    the random phases make raw samples uninformative to a linear read-out; and the noise
    (std 2 against unit-amplitude sines) hides a single period. Over the full ``length``
    (1024 by default) the spectrum resolves the frequencies and averages the noise away.
    Measured with the defaults (logistic regression on |FFT| below 0.15 cycles/sample, 100
    train / 50 test sequences per speaker, chance 10%): a 48-sample window 17%, 256 samples
    79%, the full 1024 samples 100%; an untrained ``SequenceEncoder``, mean-pooled, 23%.

    ``dataset[i]`` is ``(sequence (1, length), speaker)``; the split's ``n_per_speaker``
    sequences per speaker are generated once from ``seed`` and the split. ``generate(labels,
    generator)`` draws fresh sequences of the same speakers."""

    def __init__(self, n_speakers=10, *, n_per_speaker=100, length=1024, split="train",
                 n_frequencies=8, per_speaker=3, spacing=0.003, noise_std=2.0, speaker_seed=0,
                 seed=0):
        _check_split(split)
        self.n_speakers = check.check_int("n_speakers", n_speakers, 2)
        self.length = check.check_int("length", length, 8)
        n_per_speaker = check.check_int("n_per_speaker", n_per_speaker, 1)
        n_frequencies = check.check_int("n_frequencies", n_frequencies, 2)
        per_speaker = check.check_int("per_speaker", per_speaker, 1)
        if per_speaker > n_frequencies or math.comb(n_frequencies, per_speaker) < n_speakers:
            raise ValueError(f"{n_speakers} speakers need {n_speakers} distinct {per_speaker}-"
                             f"subsets of {n_frequencies} frequencies; only "
                             f"{math.comb(n_frequencies, per_speaker)} exist")
        if not spacing > 0 or 0.05 + (n_frequencies - 1) * spacing >= 0.5:
            raise ValueError(f"spacing must be positive and keep every frequency below 0.5 "
                             f"(Nyquist), got {spacing}")
        self.noise_std = float(noise_std)
        bank = 0.05 + spacing * torch.arange(n_frequencies, dtype=torch.float64)
        generator = torch.Generator().manual_seed(speaker_seed)
        chosen = set()
        while len(chosen) < n_speakers:  # distinct subsets, drawn in a fixed order
            chosen.add(tuple(sorted(torch.randperm(n_frequencies, generator=generator)
                                    [:per_speaker].tolist())))
        order = torch.randperm(n_speakers, generator=generator).tolist()
        subsets = sorted(chosen)
        self.frequencies = bank[torch.tensor([subsets[i] for i in order])]  # (S, per_speaker)
        self.num_classes = self.n_speakers
        labels = torch.arange(self.n_speakers).repeat_interleave(n_per_speaker)
        split_seed = 2 * seed + (0 if split == "train" else 1)
        self.labels = labels
        self.sequences = self.generate(labels, torch.Generator().manual_seed(split_seed))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.sequences[i], self.labels[i]

    def generate(self, labels, generator=None):
        """Fresh sequences (B, 1, length) float32 of the speakers ``labels`` (B,)."""
        _check_generator(generator)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise TypeError(f"labels must be a 1-D int64 tensor, got {labels!r:.60}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_speakers):
            raise ValueError(f"labels must lie in [0, {self.n_speakers}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        b, (_, k), t = len(labels), self.frequencies.shape, self.length
        freqs = self.frequencies[labels]                                       # (b, k)
        phase = 2 * math.pi * torch.rand(b, k, generator=generator, dtype=torch.float64)
        knots = torch.rand(b * k, 1, 9, generator=generator, dtype=torch.float64)
        envelope = 0.5 + F.interpolate(knots, size=t, mode="linear", align_corners=True)
        time = torch.arange(t, dtype=torch.float64)
        sines = torch.sin(2 * math.pi * freqs[..., None] * time + phase[..., None])
        signal = (envelope.view(b, k, t) * sines).sum(1)
        signal = signal + self.noise_std * torch.randn(b, t, generator=generator,
                                                       dtype=torch.float64)
        signal = (signal - signal.mean(1, keepdim=True)) / signal.std(1, keepdim=True)
        return signal.to(torch.float32).unsqueeze(1)
