"""Fair representations of tabular records (S46 ``fair_vae`` / ``fair_latent``): the pure losses, the
``tab_vae`` model, its model folder, and the fairness / utility / quality metrics.

A record is ``r = [x, y]``: the features ``x`` and the binary label ``y`` (as a float), never the
sensitive attribute ``a`` (it is only used by the fairness penalty and the metrics). ``TabVAE`` encodes a
record into a Gaussian posterior ``N(μ, diag σ²)`` over a small latent and decodes a latent into
``(x̂, logit ŷ)``; synthetic records are decoded from sampled latents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.core.checkpoint import cpu_tensors
from distill.core.refs import ModelFormat
from distill.core.registry import ARCHS, FORMATS, Params
from distill.errors import MissingFileError

VAE_FORMAT = "distill-fair-vae-v1"


# --- pure losses ---------------------------------------------------------------------------------

def _u_centered(v: Tensor) -> Tensor:
    """The U-centred Euclidean distance matrix of the rows of ``v`` ``[n, k]`` (Székely & Rizzo 2014,
    Eq. 3.1): ``a_ij − a_i·/(n−2) − a_·j/(n−2) + a_··/((n−1)(n−2))`` off the diagonal, 0 on it."""
    n = v.shape[0]
    d = torch.cdist(v, v)
    u = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2) + d.sum() / ((n - 1) * (n - 2))
    return u * (1 - torch.eye(n, dtype=u.dtype, device=u.device))


def dcov2(z: Tensor, a: Tensor) -> Tensor:
    """Unbiased squared distance covariance (Székely & Rizzo 2014, the U-statistic): ``Σ_{i≠j} Ã_ij B̃_ij
    / (n(n−3))`` of the U-centred distance matrices of ``z`` ``[n, k]`` and ``a`` ``[n]`` or ``[n, m]``; its
    expectation is 0 exactly when they are independent (the biased V-statistic is positive even then, and
    as a penalty would shrink every latent). Needs n > 3."""
    n = z.shape[0]
    if n < 4:
        raise ValueError(f"dcov2 needs at least 4 rows, got {n}")
    a = a.float().reshape(n, -1)
    return (_u_centered(z.float()) * _u_centered(a)).sum() / (n * (n - 3))


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I))`` summed over latent dims, mean over the batch."""
    return (0.5 * (mu.float().pow(2) + logvar.float().exp() - 1 - logvar.float())).sum(-1).mean()


def recon_loss(x_hat: Tensor, log_sigma: Tensor, y_logit: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Record negative log-likelihood (constants dropped): Gaussian features ``N(x̂, diag σ²)``, summed
    over the features, ``Σ_j ((x_j − x̂_j)² / (2 σ_j²) + log σ_j)``, + BCE of the label; mean over rows."""
    sigma2 = (2 * log_sigma.float()).exp()
    nll = ((x_hat.float() - x.float()).pow(2) / (2 * sigma2) + log_sigma.float()).sum(-1).mean()
    return nll + F.binary_cross_entropy_with_logits(y_logit.float(), y.float())


def bernoulli_kl(p_logit: Tensor, q_logit: Tensor) -> Tensor:
    """``KL(Bern(σ(p)) ‖ Bern(σ(q)))``, mean over the batch (the target ``p`` first)."""
    p, q = p_logit.float(), q_logit.float()
    sp = torch.sigmoid(p)
    return (sp * (F.logsigmoid(p) - F.logsigmoid(q)) + (1 - sp) * (F.logsigmoid(-p) - F.logsigmoid(-q))).mean()


def rbf_mmd2(x: Tensor, y: Tensor, sigma2: float) -> Tensor:
    """Biased squared MMD with the kernel ``exp(−‖u − v‖² / (2 σ²))``."""
    def k(u: Tensor, v: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(u, v).pow(2) / (2 * sigma2))
    x, y = x.float(), y.float()
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def dp_gap(pred: Tensor, a: Tensor) -> float:
    """Demographic-parity difference ``|P(ŷ = 1 | a = 1) − P(ŷ = 1 | a = 0)|`` (0 when a group is empty)."""
    pred, a = pred.float(), a.bool()
    if a.all() or not a.any():
        return 0.0
    return float((pred[a].mean() - pred[~a].mean()).abs())


# --- the model -----------------------------------------------------------------------------------

class TabVAEParams(Params):
    enc_hidden: int = Field(64, ge=1, description="encoder hidden width")
    dec_hidden: int = Field(32, ge=1, description="decoder hidden width")
    latent: int = Field(4, ge=1, description="latent dimensions")


class Decoder(nn.Module):
    """``z -> (x̂, logit ŷ)`` (one hidden layer) and the features' learned noise scales ``log σ``."""

    def __init__(self, latent: int, hidden: int, record_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, record_dim))
        self.log_sigma = nn.Parameter(torch.zeros(record_dim - 1))

    @property
    def hidden(self) -> int:
        return self.net[0].out_features

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(z)
        return out[:, :-1], out[:, -1]


class TabVAE(nn.Module):
    """Encoder ``r -> (μ, log σ²)`` (one hidden layer); ``decoder`` (a ``Decoder``) ``z -> (x̂, logit ŷ)``,
    the features modelled as ``N(x̂, diag σ²)`` with a learned ``σ`` per feature, the label as ``Bern``."""

    def __init__(self, p: TabVAEParams, record_dim: int) -> None:
        super().__init__()
        self.record_dim, self.latent = record_dim, p.latent
        self.encoder = nn.Sequential(nn.Linear(record_dim, p.enc_hidden), nn.ReLU(), nn.Linear(p.enc_hidden, 2 * p.latent))
        self.decoder = Decoder(p.latent, p.dec_hidden, record_dim)

    def encode(self, r: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(r).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(z)

    def forward(self, r: Tensor) -> Tensor:
        return self.encode(r)[0]


@ARCHS.register("tab_vae", "tabular VAE (MLP encoder/decoder) over [features, label] records (S46 fair_tabular)", TabVAEParams)
def tab_vae(p: TabVAEParams, input_shape: tuple[int, ...], num_classes: int = 2) -> TabVAE:
    return TabVAE(p, int(input_shape[-1]))


def records(x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([x.float(), y.float().unsqueeze(-1)], dim=-1)


def save_vae(folder: Path, model: TabVAE, spec: dict[str, Any] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cpu_tensors(model.state_dict()), str(folder / "model.safetensors"))
    params = spec["params"] if spec else {"enc_hidden": model.encoder[0].out_features,
                                         "dec_hidden": model.decoder.hidden, "latent": model.latent}
    cfg = {"format": VAE_FORMAT, "arch": "tab_vae", "params": params, "record_dim": model.record_dim}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def model_dir(folder: Path) -> Path:
    return folder / "student" if (folder / "student" / "config.json").is_file() else folder


def load_vae(folder: Path) -> TabVAE:
    folder = model_dir(Path(folder))
    if not (folder / "model.safetensors").is_file():
        raise MissingFileError(f"{folder / 'model.safetensors'} not found: give a finished fair_tabular run folder")
    cfg = json.loads((folder / "config.json").read_text())
    model = TabVAE(TabVAEParams.model_validate(cfg["params"]), cfg["record_dim"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


FORMATS.register(VAE_FORMAT, "a fair_tabular run's student/: tab_vae (model.safetensors + config.json)")(
    ModelFormat(claims=lambda cfg: cfg.get("format") == VAE_FORMAT, load=load_vae))


# --- metrics -------------------------------------------------------------------------------------

def synthesize(model: TabVAE, x: Tensor, y: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """One synthetic record per real record: ``z = μ + σ·ε`` from its posterior, decoded; the features
    sampled from ``N(x̂, diag σ_x²)``, the label from ``Bern(σ(logit ŷ))``. Fixed noise (``seed``), so a
    model's metrics are reproducible."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        mu, logvar = model.encode(records(x, y))
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g)
        x_hat, y_logit = model.decode(z)
        x_hat = x_hat + model.decoder.log_sigma.exp() * torch.randn(x_hat.shape, generator=g)
        y_hat = (torch.rand(y_logit.shape, generator=g) < torch.sigmoid(y_logit)).long()
    return x_hat.clone(), y_hat.clone()


def _fit_predict(x_train: Tensor, y_train: Tensor, x_test: Tensor) -> Tensor:
    """Logistic regression (scikit-learn, default L2) predictions; a constant when one class is seen."""
    from sklearn.linear_model import LogisticRegression

    if y_train.unique().numel() < 2:
        return torch.full((len(x_test),), int(y_train[0]), dtype=torch.long)
    clf = LogisticRegression(max_iter=1000).fit(x_train.numpy(), y_train.numpy())
    return torch.as_tensor(clf.predict(x_test.numpy()), dtype=torch.long)


def fair_metrics(model: TabVAE, train: Any, test: Any, seed: int = 0) -> dict[str, float]:
    """Utility, fairness and quality of a ``TabVAE``'s synthetic data and latents (``train``/``test``:
    datasets with ``x``, ``y``, ``a``):

    - ``accuracy`` / ``dp_gap``: a logistic regression trained on the synthetic records (x̂ -> ŷ),
      scored on the real test split: accuracy, and demographic-parity difference over the real ``a``;
    - ``data_dp``: the parity gap of the synthetic labels themselves (each synthetic record keeps the
      ``a`` of the real record it was generated from);
    - ``latent_dp``: the parity gap on test of a logistic probe y-from-μ trained on the train latents;
      ``latent_a_acc``: test accuracy of a probe a-from-μ (0.5 = the latents do not reveal ``a``);
      ``latent_dcov``: ``dcov2(μ, a)`` on test;
    - ``quality_mmd``: RBF MMD² (σ² = number of features) between synthetic and real test features.
    """
    model = model.eval().cpu()
    x_hat, y_hat = synthesize(model, train.x, train.y, seed)
    pred = _fit_predict(x_hat, y_hat, test.x)
    with torch.inference_mode():
        mu_tr, mu_te = model(records(train.x, train.y)), model(records(test.x, test.y))
    n = min(len(x_hat), len(test.x), 1000)
    return {
        "accuracy": float((pred == test.y).float().mean()),
        "dp_gap": dp_gap(pred, test.a),
        "data_dp": dp_gap(y_hat, train.a),
        "latent_dp": dp_gap(_fit_predict(mu_tr, train.y, mu_te), test.a),
        "latent_a_acc": float((_fit_predict(mu_tr, train.a, mu_te) == test.a).float().mean()),
        "latent_dcov": float(dcov2(mu_te, test.a)),
        "quality_mmd": float(rbf_mmd2(x_hat[:n], test.x[:n], float(test.x.shape[1]))),
    }
