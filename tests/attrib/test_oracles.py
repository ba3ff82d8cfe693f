"""External oracles on the tiny Wan transformer: traker (TRAK) and dattri (TracIn / Grad-Dot).

Both get the same per-example loss as our hooks (fixed K draws per example, weighted K-draw
mean; helpers.flow_losses through torch.func.functional_call) and our own projection matrix
kron(P_out, P_in) (block-diagonal over layers), so the comparison is exact up to float error
(external-oracles.md §2–§3). They compute per-example gradients with torch.func.vmap, which
copes with WanTransformer3DModel.
"""

from __future__ import annotations

import pytest
import torch

from carv_attrib.attrib.projection import KronProjector, kron_matrix, select_linear_layers
from carv_attrib.search.precondition import fit_preconditioner

from .helpers import (
    flow_losses,
    make_data,
    param_order_to_ours,
    rel_err,
    split_flat_param_order,
    wan_call,
)

N_TRAIN, N_TEST, K = 64, 6, 3
PATTERNS = ("blocks.*.attn1.to_*", "blocks.*.ffn.*")  # 12 layers; D = 12 · 2 · 2 = 48 < N_TRAIN
LAMBDA_REL = 0.05
KEYS = ("z", "eps", "sigma", "w", "ctx")

# torch.func.vmap over SDPA falls back to a loop on CPU and says so; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(scope="module")
def setup(wan):
    layers = select_linear_layers(wan, PATTERNS)
    proj = KronProjector(wan, layers, seed=11, k_in=2, k_out=2)
    train, test = make_data(N_TRAIN, K, seed=21), make_data(N_TEST, K, seed=22)

    def features(data):
        n = data["z"].shape[0]
        with proj.capture(num_slots=n):
            proj.slot = torch.arange(n).repeat_interleave(K)  # one batched forward, per-row slots
            flow_losses(wan_call(wan), **data).sum().backward()
        return proj.features()

    return layers, kron_matrix(proj), train, test, features(train), features(test)


def _example_loss(model, params, buffers, z, eps, sigma, w, ctx):
    """The loss of ONE example (no batch dim), as a function of the parameters."""

    def call(x, t, c):
        kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)
        return torch.func.functional_call(model, (params, buffers), args=(), kwargs=kwargs)[0]

    return flow_losses(call, z[None], eps[None], sigma[None], w[None], ctx[None])[0]


def test_traker_trak_scores_match_ours(wan, setup, tmp_path):
    trak = pytest.importorskip("trak")
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import AbstractProjector

    layers, kmat, train, test, phi_tr, phi_te = setup

    class FlowMatchingOutput(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, z, eps, sigma, w, ctx):
            return _example_loss(model, weights, buffers, z, eps, sigma, w, ctx)

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)  # Q = 1

    class OurMatrix(AbstractProjector):
        """traker's custom-projector seam, fed our kron matrix (grads arrive per parameter)."""

        def __init__(self) -> None:
            super().__init__(kmat.shape[0], kmat.shape[1], 0, "normal", "cpu")

        def project(self, grads, model_id):
            return param_order_to_ours(grads, layers) @ kmat

    # Ours: score = φ_teᵀ (ΦᵀΦ + λI)⁻¹ φ_tr, λ = LAMBDA_REL · tr(ΦᵀΦ)/d.
    pre = fit_preconditioner("trak", phi_tr, dim=phi_tr.shape[1], lambda_rel=LAMBDA_REL)
    ours = torch.from_numpy(pre.prepare_train(phi_tr)).double() @ phi_te.double().T  # (N, M)

    # traker divides features by sqrt(p), so its λ is ours / p, and it rescales the inverse by
    # c = mean|(XᵀX + λ_t I)⁻¹| = p · mean|(ΦᵀΦ + λI)⁻¹| (external-oracles.md §2).
    p = kmat.shape[0]
    names = [f"{n}.{s}" for n, _ in layers for s in ("weight", "bias")]
    tk = trak.TRAKer(
        model=wan,
        task=FlowMatchingOutput(),
        train_set_size=N_TRAIN,
        save_dir=str(tmp_path / "trak"),
        load_from_save_dir=True,
        device="cpu",
        use_half_precision=False,
        projector=OurMatrix(),
        grad_wrt=names,
        lambda_reg=pre.lambdas[0] / p,
        logging_level=40,
    )
    tk.load_checkpoint(wan.state_dict(), model_id=0)
    tk.featurize(batch=[train[k] for k in KEYS], num_samples=N_TRAIN)
    tk.finalize_features()
    tk.start_scoring_checkpoint(exp_name="q", checkpoint=wan.state_dict(), model_id=0, num_targets=N_TEST)
    tk.score(batch=[test[k] for k in KEYS], num_samples=N_TEST)
    theirs = torch.from_numpy(tk.finalize_scores(exp_name="q").copy()).double()  # (N, M)
    c = p * float(abs(pre.inverses[0]).mean())

    err = rel_err(theirs * c, ours)
    print(f"traker TRAK vs ours: max rel err {err:.2e}")
    assert err < 1e-4


def test_dattri_grad_dot_matches_ours(wan, setup, monkeypatch):
    pytest.importorskip("dattri")
    import dattri.algorithm.tracin as dattri_tracin
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    layers, kmat, train, test, phi_tr, phi_te = setup
    names = [f"{n}.{s}" for n, _ in layers for s in ("weight", "bias")]

    def project_with_ours(feature, batch_size, **kwargs):
        # grads arrive flattened weight, bias, weight, ... in `names` order
        return lambda g, ensemble_id=0: param_order_to_ours(split_flat_param_order(g, layers), layers) @ kmat

    monkeypatch.setattr(dattri_tracin, "random_project", project_with_ours)

    buffers = dict(wan.named_buffers())

    def loss_func(params, data):
        return _example_loss(wan, params, buffers, *data)

    task = AttributionTask(loss_func=loss_func, model=wan, checkpoints=wan.state_dict())
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.tensor([1.0]),
        normalized_grad=False,
        # complete dict: dattri mutates its module-level defaults (external-oracles.md §3)
        projector_kwargs={
            "proj_dim": kmat.shape[1],
            "proj_max_batch_size": 32,
            "proj_seed": 0,
            "device": "cpu",
        },
        layer_name=names,
        device="cpu",
    )

    def loader(data):
        return DataLoader(TensorDataset(*(data[k] for k in KEYS)), batch_size=16, shuffle=False)

    theirs = attributor.attribute(loader(train), loader(test)).double()  # (N, M)

    pre = fit_preconditioner("identity", dim=phi_tr.shape[1])
    ours = (
        torch.from_numpy(pre.prepare_train(phi_tr)).double()
        @ torch.from_numpy(pre.prepare_query(phi_te)).double().T
    )

    err = rel_err(theirs, ours)
    print(f"dattri Grad-Dot vs ours: max rel err {err:.2e}")
    assert err < 1e-4
