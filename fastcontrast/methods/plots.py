"""Plots of a training run and of learned features (matplotlib, scikit-learn for t-SNE:
optional, imported on use)."""
import torch

EMBEDDINGS = ("pca", "tsne")


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path):
    """PNG at ``path``: the per-step loss (light) and epoch means (bold), and the InfoNCE bound
    log(N) - L, against the step."""
    plt = _pyplot()
    fig, (ax_loss, ax_mi) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(history.step_loss) + 1)
    for ax, per_step, per_epoch, title in (
            (ax_loss, history.step_loss, history.epoch_loss, "loss"),
            (ax_mi, history.step_mi_bound, history.epoch_mi_bound, "MI bound log(N) - L (nats)")):
        ax.plot(steps, per_step, color="tab:blue", alpha=0.3, lw=0.8, label="step")
        ax.plot(history.epoch_end_step, per_epoch, color="tab:blue", lw=2, label="epoch mean")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(f"{history.settings.get('method', '')}: {history.steps} steps in "
                 f"{history.seconds:.0f} s ({history.threads} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def project_2d(features, method="pca", seed=0):
    """(N, 2) projection of (N, D) features: PCA (torch.pca_lowrank, centred) or t-SNE
    (scikit-learn)."""
    if method not in EMBEDDINGS:
        raise ValueError(f"method must be one of {EMBEDDINGS}, got {method!r}")
    x = features.detach().to(torch.float64).cpu()
    if method == "pca":
        _, _, v = torch.pca_lowrank(x, q=2, center=True)
        return (x - x.mean(0)) @ v[:, :2]
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn") from exc
    return torch.from_numpy(TSNE(2, init="pca", random_state=seed).fit_transform(x.numpy()))


def plot_embedding(features, labels, path, method="pca"):
    """PNG at ``path``: a 2-D projection (``project_2d``) of ``features`` coloured by class."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be an (N, D) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be a ({features.shape[0]},) tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    points = project_2d(features, method)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10", s=6)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_title(f"{method.upper()} of the features")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
