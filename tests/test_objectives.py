"""Every objective against its closed form, its gradient against autograd, and the paper's identities."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kd.objectives as O
from kd.errors import UserError
from kd.objectives import similarity, targets
from kd.objectives.loss import decoupled_terms, kl

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
    if O.REGISTRY[name].needs_similarity:
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


def closed_form_dkd(z, t, y, temperature, tckd_weight, nckd_weight, ce_weight):
    """DKD by its definition, per example as loops over classes; and its gradient, derived by hand:
    on v = z / tau, dTCKD/dv_c = p_c - q_c, dTCKD/dv_k = p_k (q_c - p_c) / (1 - p_c) and
    dNCKD/dv_k = p_hat_k - q_hat_k for k != c, dNCKD/dv_c = 0."""
    p, q = torch.softmax(z / temperature, 1), torch.softmax(t / temperature, 1)
    loss = ce_weight * F.cross_entropy(z, y)
    grad = ce_weight * (torch.softmax(z, 1) - F.one_hot(y, K).to(z.dtype)) / len(y)
    for i in range(len(y)):
        c = int(y[i])
        tckd = q[i, c] * torch.log(q[i, c] / p[i, c]) + (1 - q[i, c]) * torch.log((1 - q[i, c]) / (1 - p[i, c]))
        nckd = sum(
            q[i, k] / (1 - q[i, c]) * torch.log((q[i, k] / (1 - q[i, c])) / (p[i, k] / (1 - p[i, c])))
            for k in range(K)
            if k != c
        )
        loss = loss + temperature**2 * (tckd_weight * tckd + nckd_weight * nckd) / len(y)
        for k in range(K):
            d_tckd = p[i, c] - q[i, c] if k == c else p[i, k] * (q[i, c] - p[i, c]) / (1 - p[i, c])
            d_nckd = 0.0 if k == c else p[i, k] / (1 - p[i, c]) - q[i, k] / (1 - q[i, c])
            grad[i, k] += temperature * (tckd_weight * d_tckd + nckd_weight * d_nckd) / len(y)
    return loss, grad


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_loss_and_gradient_match_closed_form(batch, temperature):
    z, t, y = batch
    loss = O.get("dkd", temperature=temperature, tckd_weight=0.5, nckd_weight=3.0, ce_weight=0.8)(z, y, t)
    expected, expected_grad = closed_form_dkd(z.detach(), t, y, temperature, 0.5, 3.0, 0.8)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, expected_grad, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in O.REGISTRY if n != "kd_permuted"])  # permuted: a random target
def test_a_population_gets_each_members_own_loss(batch, sim_matrix, name):
    """(G, B, K) logits, as kd.population stacks them: member g's loss is its loss alone."""
    z, t, y = batch
    members = [(z, y, t), (0.5 * z.detach(), y.roll(1, 0), t.roll(1, 0))]
    similarity = {"class_similarity": sim_matrix} if O.REGISTRY[name].needs_similarity else {}
    stacked = {"class_similarity": torch.stack([sim_matrix, sim_matrix.T.softmax(1)])} if similarity else {}
    losses = O.get(name, **stacked)(*(torch.stack(parts) for parts in zip(*members)))
    alone = [
        O.get(name, class_similarity=stacked["class_similarity"][g]) if similarity else O.get(name) for g in range(2)
    ]
    expected = torch.stack([fn(*member) for fn, member in zip(alone, members)])
    assert losses.shape == (2,) and torch.allclose(losses, expected, atol=1e-6)


def test_dkd_defaults_are_mdistillers_cifar100_recipe(batch):
    z, t, y = batch
    ours = O.get("dkd")(z, y, t)
    explicit = O.get("dkd", temperature=4.0, tckd_weight=1.0, nckd_weight=8.0, ce_weight=1.0)(z, y, t)
    assert torch.equal(ours, explicit)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_is_tckd_plus_one_minus_q_c_nckd_per_example(batch, temperature):
    """DKD's identity, and its reading of KD-pt: the same TCKD, a uniform distribution on the wrong classes."""
    z, t, y = batch
    rows = torch.arange(B)
    q = torch.softmax(t / temperature, 1)
    log_p = torch.log_softmax(z / temperature, 1)
    tckd, nckd = decoupled_terms(q, log_p, y)
    assert torch.allclose(kl(q, log_p, y), tckd + (1 - q[rows, y]) * nckd, atol=1e-12)
    rho = targets.pt(q, y)
    pt_tckd, pt_nckd = decoupled_terms(rho, log_p, y)
    assert torch.allclose(pt_tckd, tckd, atol=1e-12)
    wrong = torch.ones(B, K, dtype=torch.bool)
    wrong[rows, y] = False
    log_p_hat = log_p[wrong].view(B, K - 1) - torch.logsumexp(log_p[wrong].view(B, K - 1), 1, keepdim=True)
    uniform_hat = torch.full((B, K - 1), 1 / (K - 1), dtype=q.dtype)
    assert torch.allclose(pt_nckd, F.kl_div(log_p_hat, uniform_hat, reduction="none").sum(1), atol=1e-12)
    assert torch.allclose(kl(rho, log_p, y), tckd + (1 - q[rows, y]) * pt_nckd, atol=1e-12)
    # KD is DKD with the per-example nckd_weight 1 - q_c; DKD's constant nckd_weight makes another loss.
    kd = O.get("kd", kd_weight=1.0, temperature=temperature)(z, y, t)
    assert not torch.allclose(O.get("dkd", temperature=temperature, ce_weight=0.0, nckd_weight=1.0)(z, y, t), kd)
    assert torch.allclose(temperature**2 * (tckd + (1 - q[rows, y]) * nckd).mean(), kd.double(), rtol=1e-5)


def test_dkd_by_hand():
    """K = 3, a uniform student, teacher q = (1/2, 3/8, 1/8) on true class 0, tau 1:
    TCKD = KL((1/2, 1/2) || (1/3, 2/3)) = log(9/8) / 2, NCKD = KL((3/4, 1/4) || (1/2, 1/2)) = log(27/16) / 4."""
    z = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[0.5, 0.375, 0.125]]).log()
    y = torch.tensor([0])
    loss = O.get("dkd", temperature=1.0, tckd_weight=2.0, nckd_weight=8.0, ce_weight=1.0)(z, y, t)
    assert loss.item() == pytest.approx(math.log(3) + 2.0 * math.log(9 / 8) / 2 + 8.0 * math.log(27 / 16) / 4, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, z)
    # CE: p - y = (-2/3, 1/3, 1/3); TCKD: p_c - q_c = -1/6 on c, p_k (q_c - p_c) / (1 - p_c) = 1/12 on the rest;
    # NCKD: p_hat - q_hat = (0, -1/4, 1/4).
    expected = torch.tensor([[-2 / 3 - 2 / 6, 1 / 3 + 2 / 12 - 8 / 4, 1 / 3 + 2 / 12 + 8 / 4]])
    assert torch.allclose(grad, expected, atol=1e-6)


def test_nckd_of_a_target_without_wrong_class_mass_is_zero():
    log_p = torch.log_softmax(torch.randn(2, 4, dtype=torch.float64), 1)
    rho = F.one_hot(torch.tensor([1, 3]), 4).double()
    tckd, nckd = decoupled_terms(rho, log_p, torch.tensor([1, 3]))
    assert torch.equal(nckd, torch.zeros(2)) and torch.allclose(tckd, -log_p[[0, 1], [1, 3]])


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


@pytest.mark.parametrize("name", ["kd_pt", "kd_pt_sim"])
def test_true_class_power_takes_q_c_at_tau_over_power_and_leaves_the_rest_to_q(batch, sim_matrix, name):
    """true_class_power = tau: q_c of softmax(t), the wrong classes' shape still from q_tau; power 1
    is the paper's target, bit for bit."""
    z, t, y = batch
    tau, rows = 4.0, torch.arange(B)
    q, q1 = torch.softmax(t / tau, 1), torch.softmax(t, 1)
    build = targets.pt if name == "kd_pt" else lambda q, y, **p: targets.pt_sim(q, y, sim_matrix, **p)
    rho = build(q, y, true_class_power=tau)
    assert torch.allclose(rho[rows, y], q1[rows, y])
    assert torch.allclose(rho.sum(1), torch.ones(B, dtype=q.dtype))
    wrong = torch.ones_like(q, dtype=torch.bool)
    wrong[rows, y] = False  # the wrong classes share 1 - q_c as they share 1 - q_c in the paper's target
    shares = rho / (1 - rho[rows, y])[:, None], build(q, y) / (1 - q[rows, y])[:, None]
    assert torch.allclose(shares[0][wrong], shares[1][wrong])
    assert torch.equal(build(q, y, true_class_power=1.0), build(q, y))
    with pytest.raises(UserError, match="true_class_power"):
        O.get(name, **({"class_similarity": sim_matrix} if name == "kd_pt_sim" else {}), true_class_power=0)


def test_teacher_free_objectives_need_no_teacher_and_kd_does(batch):
    z, t, y = batch
    O.get("ls")(z, y)
    with pytest.raises(ValueError, match="teacher_logits"):
        O.get("kd")(z, y)


SIM = similarity.from_teacher_weights(torch.randn(K, 8, generator=torch.Generator().manual_seed(1)), beta=0.2)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("kd_foo", {}, rf"objective='kd_foo' is not valid; choose one of: {', '.join(O.REGISTRY)}$"),
        ("kd", {"temperature": 0}, r"objective.temperature=0 is out of range; allowed: \(0, inf\)"),
        ("kd", {"temperature": math.inf}, r"objective.temperature=inf is out of range; allowed: \(0, inf\)"),
        ("kd", {"temperature": "4"}, r"objective.temperature='4' is not a number; allowed: \(0, inf\)"),
        ("kd", {"kd_weight": 1.5}, r"objective.kd_weight=1.5 is out of range; allowed: \[0, 1\]"),
        ("ls", {"eps": None}, r"objective.eps=None is not a number; allowed: \[0, 1\]"),
        ("dkd", {"ce_weight": None}, r"objective.ce_weight=None is not a number; allowed: \[0, 1\]"),
        ("kd", {"t2_scale": "no"}, r"objective.t2_scale='no' is not valid; choose one of: True, False"),
        ("kd", {"t2_scale": 1}, r"objective.t2_scale=1 is not valid; choose one of: True, False"),
        ("kd_topk", {"k": 0}, r"objective.k=0 is out of range"),
        ("kd_topk", {"tail": "x"}, r"objective.tail='x' is not valid; choose one of: uniform, renorm"),
        ("kd", {"eps": 0.1}, r"objective 'kd' takes no parameter 'eps'; valid parameters: temperature"),
        (
            "dkd",
            {"kd_weight": 0.5},
            r"objective 'dkd' takes no parameter 'kd_weight'; valid parameters: temperature, "
            r"ce_weight, tckd_weight, nckd_weight, t2_scale",
        ),
        ("dkd", {"nckd_weight": -1}, r"objective.nckd_weight=-1 is out of range; allowed: \[0, inf\)"),
        ("kd_sim", {}, r"needs class_similarity, a \(K, K\) tensor whose rows are distributions"),
        ("kd_sim", {"class_similarity": SIM, "beta": 0}, r"objective.beta=0 is out of range; allowed: \(0, inf\)"),
        (
            "kd_pt_sim",
            {"class_similarity": SIM, "similarity_source": "x"},
            r"objective.similarity_source='x' is not valid; choose one of: teacher_weights_cosine, mean_teacher_probs",
        ),
        ("kd", {"class_similarity": SIM}, r"objective 'kd' takes no class_similarity: its target uses none"),
        ("kd_sim", {"class_similarity": [[1.0]]}, r"class_similarity is a list; give a \(K, K\) tensor"),
        ("kd_sim", {"class_similarity": torch.eye(3, dtype=torch.long)}, r"class_similarity is a torch.int64 tensor"),
        (
            "kd_pt_sim",
            {"class_similarity": torch.ones(3, 4) / 4},
            r"class_similarity has shape \(3, 4\); give a \(K, K\)",
        ),
        ("kd_sim", {"class_similarity": torch.ones(3, 3)}, r"rows must be distributions .* row sums range from 3 to 3"),
        ("kd_sim", {"class_similarity": torch.tensor([[1.5, -0.5], [0.5, 0.5]])}, r"its entries from -0.5 to 1.5"),
    ],
)
def test_bad_parameters_are_one_line_user_errors(name, params, match):
    with pytest.raises(UserError, match=match) as info:
        O.get(name, **params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "temperature", [np.float32(4.0), np.int64(4), torch.tensor(4.0)], ids=["np32", "np_int", "tensor"]
)
def test_numpy_and_0d_tensor_parameters_count_as_their_value(batch, temperature):
    z, t, y = batch
    assert torch.equal(
        O.get("kd", temperature=temperature, kd_weight=np.float64(0.7))(z, y, t),
        O.get("kd", temperature=4.0, kd_weight=0.7)(z, y, t),
    )


@pytest.mark.parametrize(
    "name, call, match",
    [
        (
            "kd",
            lambda z, y, t: (z, y + K, t),
            rf"labels must be class indices in \[0, {K - 1}\]; got values from {K} to",
        ),
        ("ce", lambda z, y, t: (z, y - K, t), rf"labels must be class indices in \[0, {K - 1}\]; got values from -{K}"),
        ("kd", lambda z, y, t: (z, y.float(), t), r"labels must be integer class indices .* got dtype torch.float32"),
        ("kd", lambda z, y, t: (z, y[:3], t), rf"labels must be a tensor of shape \({B},\), .* got shape \(3,\)"),
        ("kd", lambda z, y, t: (z, y.tolist(), t), r"labels must be a tensor .* got a list"),
        (
            "kd",
            lambda z, y, t: (z[0], y, t),
            rf"student_logits must be a \(B, K\) tensor \(or \(\.\.\., B, K\)\); got shape \({K},\)",
        ),
        (
            "kd",
            lambda z, y, t: (z, y, t[:, :3]),
            rf"teacher_logits must have the student's shape \({B}, {K}\); got shape",
        ),
        ("kd", lambda z, y, t: (z, y, None), r"this objective distils from a teacher: pass teacher_logits"),
        (
            "kd_sim",
            lambda z, y, t: (z[:, :4], y % 4, t[:, :4]),
            rf"class_similarity is {K}x{K}, but the logits have 4 classes",
        ),
    ],
)
def test_bad_inputs_are_one_line_user_errors(batch, name, call, match):
    z, t, y = batch
    loss_fn = O.get(name, **({"class_similarity": SIM} if O.REGISTRY[name].needs_similarity else {}))
    with pytest.raises(UserError, match=match) as info:
        loss_fn(*call(z, y, t))
    assert "\n" not in str(info.value)


def test_integer_labels_of_any_width_are_class_indices(batch):
    z, t, y = batch
    loss_fn = O.get("kd")
    assert torch.equal(loss_fn(z, y.int(), t), loss_fn(z, y, t))


def test_kd_uniform_needs_no_teacher(batch):
    z, t, y = batch
    loss_fn = O.get("kd_uniform", temperature=2.0)
    assert not O.needs_teacher("kd_uniform")
    assert torch.equal(loss_fn(z, y), loss_fn(z, y, t))


@pytest.mark.parametrize("name", list(O.REGISTRY))
def test_every_declared_objective_builds_from_its_defaults_and_needs_what_it_declares(batch, sim_matrix, name):
    z, t, y = batch
    objective = O.REGISTRY[name]
    loss_fn = O.get(name, class_similarity=sim_matrix if objective.needs_similarity else None)
    assert loss_fn.needs_teacher == objective.needs_teacher == O.needs_teacher(name)
    loss = loss_fn(z, y, t) if objective.needs_teacher else loss_fn(z, y)
    assert loss.shape == () and torch.isfinite(loss)
    defaults = {k: p.default for k, p in objective.parameters.items()}
    assert O.check({"name": name, **defaults}) == (objective, defaults)


@pytest.fixture
def registry():
    """The registry as it is, restored after a test that declares objectives of its own."""
    saved = dict(O.REGISTRY)
    yield O.REGISTRY
    O.REGISTRY.clear()
    O.REGISTRY.update(saved)


def test_a_declared_soft_target_is_an_objective_with_kds_loss(batch, registry):
    @O.soft_target("kd_sharp", "KD-sharp", "all three", gamma=O.Param(2.0, low=0, low_open=True))
    def sharp(q, labels, gamma):
        return torch.softmax(gamma * q.log(), -1)

    z, t, y = batch
    assert list(registry)[-1] == "kd_sharp" and registry["kd_sharp"].label == "KD-sharp"
    loss = O.get("kd_sharp", gamma=3.0, temperature=2.0, kd_weight=0.6)(z, y, t)
    q = torch.softmax(t / 2.0, 1)
    expected = closed_form_loss(z, y, q**3 / (q**3).sum(1, keepdim=True), 0.6, 2.0)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    with pytest.raises(UserError, match=r"objective.gamma=0 is out of range; allowed: \(0, inf\)"):
        O.get("kd_sharp", gamma=0)
    with pytest.raises(UserError, match=r"objective 'kd_sharp' takes no parameter 'k'; valid parameters: temperature"):
        O.get("kd_sharp", k=0.5)


def test_a_declaration_that_disagrees_with_its_target_fails_at_import(registry):
    def f(q, labels, gamma=1.0):
        return q

    with pytest.raises(TypeError, match=r"its target f takes \['gamma'\] but declares none; declare each with a Param"):
        O.soft_target("kd_a", "A", "none")(f)
    with pytest.raises(TypeError, match=r"gamma defaults to 1.0 in its target, not as declared"):
        O.soft_target("kd_b", "B", "none", gamma=O.Param(2.0))(f)

    with pytest.raises(TypeError, match=r"\['temperature'\] are its loss's or its similarity's parameters"):

        @O.soft_target("kd_c", "C", "none", temperature=O.Param(2.0))
        def g(q, labels, temperature):
            return q

    with pytest.raises(ValueError, match="objective 'kd' is declared twice"):
        O.soft_target("kd", "KD", "all three")(targets.teacher)


@pytest.mark.parametrize("source", ["teacher_weights_cosine", "mean_teacher_probs"])
def test_the_class_similarity_an_objective_asks_for(batch, source):
    _, t, y = batch
    teacher = torch.nn.Module()
    teacher.classifier = torch.nn.Linear(8, K)
    config = {"name": "kd_pt_sim", "similarity_source": source, "beta": 0.5, "temperature": 2.0}
    found = O.class_similarity(config, teacher, lambda: {"logits": t, "labels": y})
    if source == "teacher_weights_cosine":
        expected = similarity.from_teacher_weights(teacher.classifier.weight, 0.5)
    else:
        expected = similarity.from_mean_teacher_probs(torch.softmax(t / 2.0, 1), y, K)
    assert torch.equal(found, expected)
    assert O.class_similarity({"name": "kd"}, teacher, lambda: pytest.fail("kd needs no similarity")) is None
