"""The trainer (fit / evaluate / baselines / step_time / plots) and ``fastcontrast train``,
driven through the ContrastiveMethod interface with tiny methods."""
import argparse
import json
import math

import pytest
import torch
from torch import nn

from fastcontrast import info_nce
from fastcontrast.cli.train import _budget_shortfall, add_train_parser
from fastcontrast.methods import ContrastiveMethod, moco, plots, scoring, simclr, timing, trainer
from fastcontrast.methods import evaluate as ev
from fastcontrast.methods.data import ClutteredDigits

TINY = {"width": 4, "feature_dim": 16, "projection_dim": 8}


@pytest.fixture(scope="module")
def digits():
    # 12 x 12 canvases keep the probes fast
    return ClutteredDigits("train", canvas=12), ClutteredDigits("test", canvas=12)


class Pixels(ContrastiveMethod):
    """A method whose features are the flattened input: evaluate must equal the raw probe."""

    name = "pixels"

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.backend = "auto"

    def views(self, dataset, indices, generator):
        a, b = dataset.two_views(indices, generator)
        return {"a": a.flatten(1), "b": b.flatten(1)}

    def loss(self, batch):
        loss = info_nce(self.scale * batch["a"], batch["b"], backend=self.backend)
        return {"loss": loss, "mi_bound": math.log(len(batch["a"])) - loss.detach()}

    def features(self, inputs):
        return self.scale * inputs.flatten(1)


def test_fit_logs_steps_and_epoch_means(digits):
    train, _ = digits
    torch.manual_seed(0)
    method = simclr.build(**TINY)
    history = trainer.fit(method, train, steps=7, batch_size=400, lr=1e-3, progress=False)
    # 1258 items / 400 = 3 full batches per epoch: epochs end at steps 3, 6 and 7
    assert history.steps == 7 and len(history.step_loss) == 7
    assert history.epoch_end_step == [3, 6, 7]
    assert history.epoch_loss[0] == pytest.approx(sum(history.step_loss[:3]) / 3)
    assert history.epoch_mi_bound[1] == pytest.approx(sum(history.step_mi_bound[3:6]) / 3)
    for loss, bound in zip(history.step_loss, history.step_mi_bound):
        assert bound == pytest.approx(math.log(2 * 400 - 1) - loss, abs=1e-5)
    assert len(history.step_metrics["accuracy"]) == 7
    assert history.threads == torch.get_num_threads()
    json.dumps(history.to_dict())


def test_fit_respects_the_time_budget(digits):
    train, _ = digits
    method = simclr.build(**TINY)
    one = trainer.fit(method, train, steps=1, batch_size=32, lr=1e-3, progress=False).seconds
    history = trainer.fit(method, train, seconds=0.5, batch_size=32, lr=1e-3, progress=False)
    assert history.steps >= 1
    assert history.seconds < 0.5 + 3 * one + 0.2  # stops at the first step past the budget


def test_fit_with_progress_bar_prints_epochs(digits, capsys):
    train, _ = digits
    trainer.fit(simclr.build(**TINY), train, steps=2, batch_size=629, lr=1e-3, progress=True)
    assert "epoch" in capsys.readouterr().out


def test_fit_bad_arguments(digits):
    train, _ = digits
    method = simclr.build(**TINY)
    with pytest.raises(ValueError, match="budget"):
        trainer.fit(method, train, batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        trainer.fit(method, train, steps=1, batch_size=8, lr=-1.0)
    with pytest.raises(TypeError, match="batch_size"):
        trainer.fit(method, train, steps=1, batch_size=8.0, lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        trainer.fit(method, train, steps=1, batch_size=8, lr=1e-3, optimizer="lamb")
    with pytest.raises(TypeError, match="ContrastiveMethod"):
        trainer.fit(nn.Linear(2, 2), train, steps=1, batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="data must be one of"):
        trainer.datasets("cifar")


def test_evaluate_pixels_equals_raw_probe(digits):
    train, test = digits
    scores = scoring.evaluate(Pixels(), train, test)
    tx, ty = train.evaluation_set()
    sx, sy = test.evaluation_set()
    assert scores["probe"] == pytest.approx(ev.raw_pixel_baseline(tx, ty, sx, sy))
    assert scores["knn"] == pytest.approx(ev.knn_accuracy(tx.flatten(1), ty, sx.flatten(1), sy))


def test_evaluate_restores_train_mode_and_is_deterministic(digits):
    train, test = digits
    method = simclr.build(**TINY).train()
    a = scoring.evaluate(method, train, test)
    assert method.training and all(m.training for m in method.modules())
    assert scoring.evaluate(method, train, test) == a
    assert 0.0 <= a["probe"] <= 1.0 and 0.0 <= a["knn"] <= 1.0


def test_baselines_keys_and_supervised_learns(digits):
    train, test = digits
    def make():
        return simclr.build(**{**TINY, "width": 8})

    result = scoring.baselines(make, train, test, steps=60, batch_size=64, lr=3e-3)
    assert set(result) == {"untrained", "raw", "supervised"}
    assert result["supervised"]["steps"] == 60
    assert 0.0 <= result["supervised"]["classifier"] <= 1.0
    # 60 supervised steps already give features far better than random ones (~14%)
    assert result["supervised"]["probe"] > result["untrained"]["probe"] + 0.1
    torch.manual_seed(0)
    assert result["untrained"] == scoring.evaluate(make(), train, test)


def test_step_time_leaves_the_method_untouched(digits):
    train, _ = digits
    method = simclr.build(**TINY)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    t = timing.step_time(method, train, 32, "reference", repeats=2)
    assert t > 0 and method.backend == "auto"
    assert all(p.grad is None for p in method.parameters())
    for k, v in method.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="backend"):
        timing.step_time(_NoBackend(), train, 8, "reference")


class _NoBackend(Pixels):
    def __init__(self):
        super().__init__()
        del self.backend


def test_same_curve_reports_the_largest_difference(digits):
    train, _ = digits

    def make(backend):  # a different temperature for one backend: the curves must differ
        return simclr.build(backend=backend, temperature=0.2 if backend == "auto" else 0.3,
                            **TINY)

    result = timing.same_curve(make, train, steps=3, batch_size=16, lr=1e-3)
    a, b = result["losses"]["auto"], result["losses"]["reference"]
    assert len(a) == len(b) == 3
    assert result["max_abs_diff"] == max(abs(x - y) for x, y in zip(a, b)) > 1e-2


# per method: tiny settings, and the step from which the loss must go down (MoCo's queue holds
# random vectors until real keys replace them during the first steps)
METHOD_CASES = {
    "simclr": (simclr, TINY, 0),
    "moco": (moco, {**TINY, "queue_size": 64}, 2),
}


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_method_training_is_deterministic_and_decreases_the_loss(digits, name):
    module, tiny, warm = METHOD_CASES[name]
    train, _ = digits

    def run(seed):
        torch.manual_seed(seed)
        return trainer.fit(module.build(**tiny), train, steps=12 + warm, batch_size=32,
                           lr=3e-3, seed=seed, progress=False).step_loss

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other
    assert sum(first[-4:]) / 4 < sum(first[warm:warm + 4]) / 4


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_method_same_curve_as_reference_backend(digits, name):
    module, tiny, _ = METHOD_CASES[name]
    result = timing.same_curve(lambda b: module.build(backend=b, **tiny), digits[0], steps=5,
                               batch_size=16, lr=1e-3)
    assert result["max_abs_diff"] < 1e-4


def test_project_2d_pca_is_the_top_principal_plane():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    x = torch.randn(300, 6, dtype=torch.float64) * torch.tensor([5.0, 3, 0.1, 0.1, 0.1, 0.1])
    x = x @ basis.T + 7.0
    p = plots.project_2d(x, "pca")
    assert p.shape == (300, 2)
    # the projection keeps almost all the variance (the two large directions)
    assert float(p.var(0).sum() / (x - x.mean(0)).var(0).sum()) > 0.99
    with pytest.raises(ValueError, match="method"):
        plots.project_2d(x, "umap")


def test_plots_write_png(digits, tmp_path):
    pytest.importorskip("matplotlib")
    train, _ = digits
    history = trainer.fit(simclr.build(**TINY), train, steps=3, batch_size=629, lr=1e-3,
                          progress=False)
    plots.plot_history(history, tmp_path / "curves.png")
    plots.plot_embedding(torch.randn(50, 4), torch.arange(50) % 10, tmp_path / "pca.png")
    for name in ("curves.png", "pca.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="labels"):
        plots.plot_embedding(torch.randn(5, 4), torch.arange(4), tmp_path / "x.png")


def _parser():
    parser = argparse.ArgumentParser(prog="fastcontrast")
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parses_and_rejects():
    args = _parser().parse_args(["train", "moco", "--steps", "3", "--batch-size", "16",
                                 "--backend", "reference", "--no-baselines"])
    assert (args.method, args.steps, args.batch_size, args.backend, args.baselines) == (
        "moco", 3, 16, "reference", False)
    for bad in (["train", "byol"], ["train", "simclr", "--steps", "0"],
                ["train", "simclr", "--embedding", "umap"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)


def test_cli_train_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(simclr.DEFAULTS, "width", 4)
    monkeypatch.setitem(simclr.DEFAULTS, "feature_dim", 16)
    args = _parser().parse_args(["train", "simclr", "--steps", "2", "--batch-size", "32",
                                 "--no-baselines", "--quiet", "--out", str(tmp_path)])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "linear probe" in out and "untrained" in out
    assert "less than simclr's default budget" in out  # 2 steps: the README's figures need more
    record = json.loads((tmp_path / "simclr.json").read_text())
    assert record["history"]["steps"] == 2
    assert set(record["scores"]) == {"probe", "knn"}
    assert "untrained" in record["baselines"]


def test_budget_shortfall_note_only_below_the_default_budget():
    defaults = {"seconds": 300}
    note = _budget_shortfall("simclr", {"seconds": 60.0, "steps": None}, defaults, 60.2)
    assert "60 s" in note and "default budget of 300 s" in note
    assert _budget_shortfall("simclr", {"seconds": None, "steps": None}, defaults, 300.4) is None
    assert _budget_shortfall("simclr", {"seconds": 600.0, "steps": None}, defaults, 600) is None
    assert _budget_shortfall("simclr", {"seconds": None, "steps": 5}, defaults, 3.0) is not None
