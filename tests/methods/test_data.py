"""Embedded data: cluttered translated digits (rendering, split, evaluation set), the CMC/AMDIM
augmentations, and the synthetic speaker sequences for CPC."""
import pytest
import torch

from fastcontrast.methods.data import (ClutteredDigits, ClutterRenderer, SyntheticSpeakers,
                                       evaluation_set, filtered_views, load_digit_images,
                                       random_resized_crops, split_halves, stratified_split)
from fastcontrast.methods.evaluate import linear_probe


@pytest.fixture(scope="module")
def train_set():
    return ClutteredDigits("train")


def _gen(k):
    """Generator number k of this test: fresh per test (conftest seeds each one, and
    FASTCONTRAST_TEST_SEED changes them all), the same for equal k within a test."""
    return torch.Generator().manual_seed(torch.initial_seed() + k)


def _digit_corners(images, digits):
    """Top-left corner (r, c) of each 8x8 digit in its clutter-free canvas, checking that the
    canvas holds exactly that digit there and nothing else; -1 where no placement matches."""
    b, side = images.shape[0], images.shape[-1]
    windows = images.unfold(2, 8, 1).unfold(3, 8, 1)[:, 0]           # (b, P, P, 8, 8)
    match = (windows == digits[:, 0, None, None]).flatten(3).all(3)   # (b, P, P)
    match &= (images.sum((1, 2, 3)) == digits.sum((1, 2, 3)))[:, None, None]
    corners = torch.full((b, 2), -1)
    for i in range(b):
        hits = match[i].nonzero()
        if len(hits):
            corners[i] = hits[0]
    return corners, side - 8


@pytest.mark.parametrize("canvas", [24, 17])
@pytest.mark.parametrize("batch", [1, 257])
def test_render_shape_range_dtype(train_set, canvas, batch):
    data = ClutteredDigits("train", canvas=canvas)
    idx = torch.randint(0, len(data), (batch,))
    images = data.render(idx, _gen(0))
    assert images.shape == (batch, 1, canvas, canvas)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.flatten(1).amax(1).gt(0.5).all()          # every canvas holds a digit


def test_render_is_deterministic_given_a_generator(train_set):
    idx = torch.arange(0, 300, 3)
    a, b = train_set.render(idx, _gen(5)), train_set.render(idx, _gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, train_set.render(idx, _gen(6)))


def test_two_views_differ(train_set):
    idx = torch.randint(0, len(train_set), (128,))
    a, b = train_set.two_views(idx, _gen(0))
    differs = (a != b).flatten(1).any(1)
    assert differs.float().mean() > 0.95, "two views of one digit should almost never coincide"


def test_evaluation_set_is_fixed_and_covers_the_split(train_set):
    images, labels = train_set.evaluation_set()
    again, labels_again = ClutteredDigits("train").evaluation_set()
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert images.shape == (len(train_set), 1, 24, 24)
    assert torch.equal(labels, train_set.labels)
    test_images, test_labels = evaluation_set("test")
    assert len(test_images) == len(test_labels) == 1797 - len(train_set)
    assert not torch.equal(images, train_set.evaluation_set(seed=7)[0])


def test_stratified_split_is_disjoint_complete_and_balanced():
    _, labels = load_digit_images()
    train, test = stratified_split(labels, test_fraction=0.3, seed=0)
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(len(labels)))
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((labels[test] == c).sum()) == round(0.3 * n_c)
    again = stratified_split(labels, 0.3, seed=0)
    other = stratified_split(labels, 0.3, seed=1)
    assert torch.equal(again[1], test) and not torch.equal(other[1], test)
    data = ClutteredDigits("test")
    images, all_labels = load_digit_images()
    assert torch.equal(data.indices, test) and torch.equal(data.labels, all_labels[test])
    assert torch.equal(data.digits[:, 0], images[test])


@pytest.mark.parametrize("canvas", [24, 8, 13])
def test_digit_lies_entirely_inside_the_canvas(canvas):
    data = ClutteredDigits("train", canvas=canvas, n_fragments=0)
    idx = torch.randint(0, len(data), (200,))
    images = data.render(idx, _gen(1))
    corners, last = _digit_corners(images, data.digits[idx])
    assert (corners >= 0).all(), "every canvas must hold its whole digit and nothing else"
    if canvas > 8:   # the corners spread over the whole admissible range
        assert corners.min() == 0 and corners.max() == last


def test_clutter_adds_fragments_around_the_same_digit(train_set):
    clean = ClutteredDigits("train", n_fragments=0)
    idx = torch.randint(0, len(train_set), (200,))
    cluttered, plain = train_set.render(idx, _gen(3)), clean.render(idx, _gen(3))
    # same generator: the digit sits at the same place, clutter only adds ink (max overlay)
    assert (cluttered >= plain).all()
    extra = (cluttered - plain).flatten(1).sum(1)
    assert (extra > 0).float().mean() > 0.95
    assert extra.mean() > 0.5 * plain.flatten(1).sum(1).mean() / 4   # a fragment is 1/4 digit


def test_fragments_come_from_other_digits():
    pool = torch.stack([torch.zeros(8, 8), torch.ones(8, 8)])
    render = ClutterRenderer(pool, canvas=24, n_fragments=(1, 4))
    own = torch.zeros(100, dtype=torch.long)
    blank = render(pool[own].unsqueeze(1), _gen(0), own_index=own)
    ink = blank.flatten(1).sum(1)      # blank digit: every lit pixel is a fragment of the ones
    assert (ink >= 16).all() and (ink <= 64).all() and (ink > 16).any()
    assert ((blank == 0) | (blank == 1)).all()
    own = torch.ones(100, dtype=torch.long)
    full = render(pool[own].unsqueeze(1), _gen(0), own_index=own)
    assert (full.flatten(1).sum(1) == 64).all(), "the ones digit only gets blank fragments"
    two = ClutterRenderer(pool, canvas=64, n_fragments=(2, 2))
    fixed = two(pool[[0]].unsqueeze(1).expand(50, 1, 8, 8), _gen(0),
                own_index=torch.zeros(50, dtype=torch.long)).flatten(1).sum(1)
    # exactly two fragments: 32 lit pixels unless they overlap (rare on a 64 x 64 canvas)
    assert (fixed <= 32).all() and (fixed == 32).float().mean() > 0.9


def test_augment_is_the_renderer_for_loader_batches(train_set):
    loader = torch.utils.data.DataLoader(train_set, batch_size=33, shuffle=False)
    digits, labels = next(iter(loader))
    assert digits.shape == (33, 1, 8, 8) and labels.dtype == torch.int64
    views = train_set.augment(digits, _gen(0))
    assert views.shape == (33, 1, 24, 24)
    corners, _ = _digit_corners(ClutteredDigits("train", n_fragments=0).augment(digits, _gen(0)),
                                digits)
    assert (corners >= 0).all()


@pytest.mark.parametrize("bad, error, words", [
    (dict(split="val"), ValueError, "split"),
    (dict(canvas=7), ValueError, "canvas"),
    (dict(n_fragments=-1), ValueError, "n_fragments"),
    (dict(n_fragments=(3, 1)), ValueError, "n_fragments[1]"),
    (dict(n_fragments=2.5), TypeError, "n_fragments"),
    (dict(test_fraction=1.0), ValueError, "test_fraction"),
])
def test_bad_dataset_arguments(bad, error, words):
    kwargs = dict(split="train")
    kwargs.update(bad)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        ClutteredDigits(kwargs.pop("split"), **kwargs)


def test_bad_render_arguments(train_set):
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 1258\)"):
        train_set.render(torch.tensor([0, 1258]))
    with pytest.raises(TypeError, match="indices must be a 1-D integer tensor"):
        train_set.render(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="generator"):
        train_set.render(torch.tensor([0]), generator=0)
    with pytest.raises(ValueError,
                       match=r"digits must be \(B, 1, 8, 8\), got shape \(2, 1, 9, 9\)"):
        train_set.augment(torch.zeros(2, 1, 9, 9))
    with pytest.raises(TypeError, match="digits must have a floating-point dtype"):
        train_set.augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Augmentations


def test_random_resized_crops():
    images = torch.rand(9, 2, 24, 24)
    same = random_resized_crops(images, 24, scale=(1.0, 1.0), generator=_gen(0))
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)    # full crop = identity
    a = random_resized_crops(images, 16, scale=(0.2, 0.5), generator=_gen(1))
    b = random_resized_crops(images, 16, scale=(0.2, 0.5), generator=_gen(1))
    assert a.shape == (9, 2, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, random_resized_crops(images, 16, (0.2, 0.5), _gen(2)))
    # a crop of a constant image stays that constant: it never reaches outside the image
    flat = random_resized_crops(torch.full((50, 1, 24, 24), 0.7), 7, (0.1, 1.0), _gen(3))
    torch.testing.assert_close(flat, torch.full_like(flat, 0.7))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crops(images, 16, scale=(0.5, 1.5))


@pytest.mark.parametrize("axis, dim", [("rows", 2), ("cols", 3)])
def test_split_halves(axis, dim):
    images = torch.rand(4, 1, 23, 24)
    first, second = split_halves(images, axis)
    assert first.shape[dim] == images.shape[dim] // 2
    assert torch.equal(torch.cat([first, second], dim), images)
    with pytest.raises(ValueError, match="axis"):
        split_halves(images, "depth")


def test_filtered_views_add_up_and_smooth():
    images = torch.rand(3, 2, 24, 24, dtype=torch.float64)
    low, high = filtered_views(images, sigma=1.0)
    torch.testing.assert_close(low + high, images)
    assert low[..., 4:-4, 4:-4].std() < images[..., 4:-4, 4:-4].std() / 2
    const = torch.full((1, 1, 24, 24), 0.3)
    low_c, _ = filtered_views(const, sigma=1.0)
    torch.testing.assert_close(low_c[..., 3:-3, 3:-3], const[..., 3:-3, 3:-3])
    with pytest.raises(ValueError, match="sigma"):
        filtered_views(images, sigma=0)


# ---------------------------------------------------------------------------------------------
# Sequences


def test_speakers_shapes_determinism_and_standardisation():
    data = SyntheticSpeakers(n_speakers=5, n_per_speaker=7, length=256, seed=3)
    x, y = data[0]
    assert x.shape == (1, 256) and y.dtype == torch.int64
    assert data.sequences.shape == (35, 1, 256) and torch.equal(data.labels.bincount(),
                                                                torch.full((5,), 7))
    torch.testing.assert_close(data.sequences.mean(-1), torch.zeros(35, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.sequences.std(-1), torch.ones(35, 1), atol=1e-5, rtol=0)
    again = SyntheticSpeakers(n_speakers=5, n_per_speaker=7, length=256, seed=3)
    assert torch.equal(again.sequences, data.sequences)
    test = SyntheticSpeakers(n_speakers=5, n_per_speaker=7, length=256, seed=3, split="test")
    assert torch.equal(test.frequencies, data.frequencies)       # the same speakers
    assert not torch.equal(test.sequences, data.sequences)       # other recordings
    assert len({tuple(f.tolist()) for f in data.frequencies}) == 5
    labels = torch.tensor([0, 4, 4])
    assert torch.equal(data.generate(labels, _gen(0)), data.generate(labels, _gen(0)))


def test_speaker_needs_long_context():
    """A probe on the spectrum of the whole sequence identifies the speaker; the spectrum of a
    short window (or the raw window) is close to chance."""
    seed = torch.initial_seed() % 1000
    train = SyntheticSpeakers(n_per_speaker=80, speaker_seed=seed, seed=seed)
    test = SyntheticSpeakers(n_per_speaker=20, speaker_seed=seed, seed=seed, split="test")

    def spectrum(x, window):
        bins = int(0.15 * window) + 1      # the band that holds every speaker frequency
        return torch.fft.rfft(x[:, 0, :window], dim=1).abs()[:, :bins]

    full = linear_probe(spectrum(train.sequences, 1024), train.labels,
                        spectrum(test.sequences, 1024), test.labels)
    short = linear_probe(spectrum(train.sequences, 48), train.labels,
                         spectrum(test.sequences, 48), test.labels)
    raw = linear_probe(train.sequences[:, 0, :48], train.labels, test.sequences[:, 0, :48],
                       test.labels)
    assert full >= 0.95, full
    assert short <= 0.35 and raw <= 0.3, (short, raw)


def test_bad_speaker_arguments():
    with pytest.raises(ValueError, match="distinct 3-subsets"):
        SyntheticSpeakers(n_speakers=60, n_frequencies=8, per_speaker=3)
    with pytest.raises(ValueError, match="Nyquist"):
        SyntheticSpeakers(spacing=0.1)
    data = SyntheticSpeakers(n_speakers=3, n_per_speaker=1, length=64)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        data.generate(torch.tensor([3]))
    with pytest.raises(TypeError, match="labels must be a 1-D int64 tensor"):
        data.generate(torch.tensor([0.0]))
