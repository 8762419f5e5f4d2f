"""Every objective against its closed form, its gradient against autograd, and the paper's identities."""

import math

import pytest
import torch
import torch.nn.functional as F

import kd.objectives as O
from kd.errors import UserError
from kd.objectives import similarity, targets

B, K = 16, 10


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = 3 * torch.randn(B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    return z, t, y


@pytest.fixture
def sim_matrix():
    w = torch.randn(K, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return similarity.from_teacher_weights(w, beta=0.2)


def closed_form_targets(name, q, y, sim=None, k=0.25, tail="uniform"):
    """The paper.md definitions, written as explicit loops (slow, obvious)."""
    rho = torch.zeros_like(q)
    kept = max(1, round(k * K))
    for i in range(len(y)):
        c = int(y[i])
        for j in range(K):
            if name == "kd":
                rho[i, j] = q[i, j]
            elif name == "kd_uniform":
                rho[i, j] = 1 / K
            elif name == "kd_pt":
                rho[i, j] = q[i, c] if j == c else (1 - q[i, c]) / (K - 1)
            elif name == "kd_sim":
                rho[i, j] = sim[c, j]
            elif name == "kd_pt_sim":
                others = sum(sim[c, m] for m in range(K) if m != c)
                rho[i, j] = q[i, c] if j == c else (1 - q[i, c]) * sim[c, j] / others
        if name == "kd_topk":
            top = sorted(range(K), key=lambda j: -float(q[i, j]))[:kept]
            mass = sum(q[i, j] for j in top)
            for j in range(K):
                if j in top:
                    rho[i, j] = q[i, j] / mass if tail == "renorm" else q[i, j]
                else:
                    rho[i, j] = 0.0 if tail == "renorm" else (1 - mass) / (K - kept)
    return rho


def closed_form_loss(z, y, rho, kd_weight, temperature, t2_scale=True):
    """(1 - lam) H(y, p) + lam s KL(rho || p_tau), batchmean, by the definition."""
    p_log = torch.log_softmax(z, 1)
    ce = -p_log[torch.arange(len(y)), y].mean()
    log_p_tau = torch.log_softmax(z / temperature, 1)
    kl = (rho * (torch.log(rho.clamp_min(1e-300)) - log_p_tau)).where(rho > 0, torch.zeros_like(rho)).sum(1).mean()
    return (1 - kd_weight) * ce + kd_weight * (temperature**2 if t2_scale else 1) * kl


def closed_form_grad(z, y, rho, kd_weight, temperature, t2_scale=True):
    """dL/dz = [(1 - lam)(p - y) + lam s (p_tau - rho) / tau] / B."""
    p = torch.softmax(z, 1)
    p_tau = torch.softmax(z / temperature, 1)
    s = temperature**2 if t2_scale else 1
    onehot = F.one_hot(y, K).to(z.dtype)
    return ((1 - kd_weight) * (p - onehot) + kd_weight * s * (p_tau - rho) / temperature) / len(y)


TEACHER_TARGETS = ["kd", "kd_uniform", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk"]


@pytest.mark.parametrize("name", TEACHER_TARGETS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_and_gradient_match_closed_form(batch, sim_matrix, name, temperature):
    z, t, y = batch
    params = {"kd_weight": 0.7, "temperature": temperature}
    if name in O.NEEDS_SIMILARITY:
        params["class_similarity"] = sim_matrix
    loss = O.get(name, **params)(z, y, t)
    q = torch.softmax(t / temperature, 1)
    rho = closed_form_targets(name, q, y, sim_matrix)
    expected = closed_form_loss(z, y, rho, 0.7, temperature)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, closed_form_grad(z, y, rho, 0.7, temperature), atol=1e-6)


def test_ce_and_ls_closed_forms(batch):
    z, _, y = batch
    assert torch.allclose(O.get("ce")(z, y).double(), F.cross_entropy(z, y), atol=1e-6)
    # LS is reported in the KL form: H((1-eps) y + eps u, p) minus the constant eps * H(u) = eps log K.
    ls = O.get("ls", eps=0.2)(z, y)
    assert torch.allclose(ls.double(), F.cross_entropy(z, y, label_smoothing=0.2) - 0.2 * math.log(K), atol=1e-6)
    g_ls = torch.autograd.grad(ls, z)[0]
    g_ref = torch.autograd.grad(F.cross_entropy(z, y, label_smoothing=0.2), z)[0]
    assert torch.allclose(g_ls, g_ref, atol=1e-7)


def test_ls_equals_kd_with_uniform_teacher(batch):
    z, t, y = batch
    eps = 0.3
    ls = O.get("ls", eps=eps)(z, y)
    uniform = O.get("kd_uniform", kd_weight=eps, temperature=1.0, t2_scale=False)(z, y, t)
    assert torch.allclose(ls, uniform, atol=1e-7)
    assert torch.allclose(torch.autograd.grad(ls, z)[0], torch.autograd.grad(uniform, z)[0], atol=1e-8)


def test_kd_pt_reproduces_kd_true_class_gradient(batch):
    z, t, y = batch
    rows = torch.arange(B)
    g_kd = torch.autograd.grad(O.get("kd", kd_weight=0.8)(z, y, t), z)[0]
    g_pt = torch.autograd.grad(O.get("kd_pt", kd_weight=0.8)(z, y, t), z)[0]
    assert torch.allclose(g_kd[rows, y], g_pt[rows, y], atol=1e-7)
    assert not torch.allclose(g_kd, g_pt, atol=1e-4)  # only the true class is shared
    # And the paper's formula: dL/dz_c = [-(1 - p_c) + lam (1 - q_c)] / B.
    p_c = torch.softmax(z, 1)[rows, y]
    q_c = torch.softmax(t, 1)[rows, y]
    assert torch.allclose(g_kd[rows, y], (-(1 - p_c) + 0.8 * (1 - q_c)) / B, atol=1e-7)


def test_sim_targets_are_per_class_and_normalised(batch, sim_matrix):
    _, t, y = batch
    rho = targets.sim(sim_matrix, y)
    assert torch.allclose(rho.sum(1), torch.ones(B, dtype=rho.dtype))
    for c in y.unique():
        assert torch.allclose(rho[y == c], rho[y == c][0].expand_as(rho[y == c]))
    assert (rho.argmax(1) == y).all()  # cos(w_c, w_c) = 1 is the largest similarity


def test_mean_teacher_probs_similarity(batch):
    _, t, y = batch
    q = torch.softmax(t, 1)
    s = similarity.from_mean_teacher_probs(q, y, K)
    for c in y.unique():
        assert torch.allclose(s[c], q[y == c].mean(0))


@pytest.mark.parametrize("tail", ["uniform", "renorm"])
@pytest.mark.parametrize("k", [0.1, 0.25, 0.5, 1.0])
def test_topk_mass_rules(batch, k, tail):
    _, t, y = batch
    q = torch.softmax(t, 1)
    rho = targets.topk(q, y, k=k, tail=tail)
    kept = max(1, round(k * K))
    assert torch.allclose(rho.sum(1), torch.ones(B, dtype=rho.dtype))
    top = q.topk(kept, 1).indices
    if tail == "renorm":
        assert ((rho > 0).sum(1) == kept).all()
        assert torch.allclose(rho.gather(1, top), q.gather(1, top) / q.gather(1, top).sum(1, keepdim=True))
    else:
        assert torch.allclose(rho.gather(1, top), q.gather(1, top))
    if k == 1.0:
        assert torch.allclose(rho, q)


def test_permuted_keeps_true_class_and_shuffles_the_rest(batch):
    _, t, y = batch
    q = torch.softmax(t, 1)
    torch.manual_seed(0)
    rho = targets.permuted(q, y)
    rows = torch.arange(B)
    assert torch.equal(rho[rows, y], q[rows, y])
    wrong = torch.ones_like(q, dtype=torch.bool)
    wrong[rows, y] = False
    for i in range(B):
        assert torch.allclose(rho[i][wrong[i]].sort().values, q[i][wrong[i]].sort().values)
    assert not torch.allclose(rho, q)


def test_pt_and_pt_sim_keep_q_c(batch, sim_matrix):
    _, t, y = batch
    q = torch.softmax(t, 1)
    rows = torch.arange(B)
    for rho in (targets.pt(q, y), targets.pt_sim(q, y, sim_matrix)):
        assert torch.allclose(rho[rows, y], q[rows, y])
        assert torch.allclose(rho.sum(1), torch.ones(B, dtype=q.dtype))


def test_teacher_free_objectives_need_no_teacher_and_kd_does(batch):
    z, t, y = batch
    O.get("ls")(z, y)
    with pytest.raises(ValueError, match="teacher_logits"):
        O.get("kd")(z, y)


@pytest.mark.parametrize("name, params, match", [
    ("kd_foo", {}, r"objective='kd_foo' is not valid; choose one of: ce, ls, kd, kd_pt"),
    ("kd", {"temperature": 0}, r"objective.temperature=0 is out of range; allowed: \(0, inf\]"),
    ("kd", {"kd_weight": 1.5}, r"objective.kd_weight=1.5 is out of range; allowed: \[0, 1\]"),
    ("kd_topk", {"k": 0}, r"objective.k=0 is out of range"),
    ("kd_topk", {"tail": "x"}, r"objective.tail='x' is not valid; choose one of: uniform, renorm"),
    ("kd", {"eps": 0.1}, r"objective 'kd' takes no parameter 'eps'; valid parameters: temperature"),
    ("kd_sim", {}, r"needs class_similarity"),
])
def test_bad_parameters_are_one_line_user_errors(name, params, match):
    with pytest.raises(UserError, match=match) as info:
        O.get(name, **params)
    assert "\n" not in str(info.value)
