"""kd.analysis: the rescaling factor against autograd, and the domain / universe summaries on
matrices whose answer is known."""

import math

import numpy as np
import pytest
import torch

from kd import objectives
from kd.analysis import domain, instance, universe
from kd.data.synthetic import SyntheticDataModule
from kd.objectives import targets
from kd.predict import predict

K, B = 6, 8


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, K, generator=g) * 2,
        torch.randint(0, K, (B,), generator=g),
        torch.randn(B, K, generator=g) * 3,
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_rescaling_factor_is_the_kd_over_ce_gradient_ratio(batch, temperature):
    z, labels, t = batch
    lam = 0.7
    ratio = instance.gradient_ratio(objectives.get("kd", kd_weight=lam, temperature=temperature), z, labels, t)
    q = torch.softmax(t / temperature, dim=1)
    torch.testing.assert_close(instance.rescaling_factor(z, q, labels, lam, temperature), ratio)
    if temperature == 1.0:  # the paper's closed form
        p_c, q_c = targets.true_class_prob(torch.softmax(z, 1), labels), targets.true_class_prob(q, labels)
        torch.testing.assert_close(instance.rescaling_factor(z, q, labels, lam), 1 - lam * (1 - q_c) / (1 - p_c))


def test_kd_pt_rescales_exactly_as_kd(batch):
    z, labels, t = batch
    q = torch.softmax(t, dim=1)
    torch.testing.assert_close(
        instance.rescaling_factor(z, targets.pt(q, labels), labels, 0.9), instance.rescaling_factor(z, q, labels, 0.9)
    )


def test_label_smoothing_factor_is_flat_in_the_teacher(batch):
    z, labels, t = batch
    eps = 0.2
    ratio = instance.gradient_ratio(objectives.get("ls", eps=eps), z, labels)
    w = instance.rescaling_factor(z, targets.uniform(z, labels), labels, eps)
    torch.testing.assert_close(w, ratio)
    p_c = targets.true_class_prob(torch.softmax(z, 1), labels)
    torch.testing.assert_close(w, 1 - eps * (1 - 1 / K) / (1 - p_c))


def test_gradient_ratio_is_the_ratio_of_true_class_gradients(batch):
    """Against plain autograd of the objective and of CE, for DKD, whose w has no closed form here."""
    z, labels, t = batch
    rows = torch.arange(B)
    dkd = objectives.get("dkd")
    z_kd, z_ce = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    dkd(z_kd, labels, t).backward()
    objectives.get("ce")(z_ce, labels).backward()
    torch.testing.assert_close(
        instance.gradient_ratio(dkd, z, labels, t), z_kd.grad[rows, labels] / z_ce.grad[rows, labels]
    )
    torch.testing.assert_close(instance.gradient_ratio(objectives.get("ce"), z, labels), torch.ones(B))


def test_per_example_on_the_oracle_distilling_itself():
    """Student = teacher gives p = q: KD's w is 1 - kd_weight for every example."""
    dm = SyntheticDataModule(superclasses=2, subclasses=2, dim=4, train_per_class=5)
    oracle = dm.oracle_teacher()
    rows = instance.per_example(oracle, oracle, dm, kd_weight=0.9)
    assert len(rows) == 20 and sorted(rows["index"]) == list(range(20))
    np.testing.assert_allclose(rows["w"], 0.1, atol=1e-4)
    np.testing.assert_allclose(rows["q_c"], rows["p_c"], atol=1e-6)
    ls = instance.per_example(oracle, oracle, dm, kd_weight=0.1, target=targets.uniform)
    np.testing.assert_allclose(ls["rho_c"], 0.25)
    np.testing.assert_allclose(ls["w"], 1 - 0.1 * 0.75 / (1 - ls["p_c"]), rtol=1e-4)


def test_predict_leaves_the_random_stream_alone():
    """The instance histograms run it between training epochs: the training must not notice."""
    dm = SyntheticDataModule(superclasses=2, subclasses=2, dim=4, train_per_class=5)
    dm.setup()
    teacher = dm.oracle_teacher()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    predict(teacher, dm, "val")
    assert torch.equal(torch.rand(3), expected)


def test_binned_means():
    stats = instance.binned([0.05, 0.15, 0.95, 1.0], [1.0, 3.0, 5.0, 7.0], bins=2)
    assert stats["count"].tolist() == [2, 2]
    assert stats["w_mean"].tolist() == [2.0, 6.0] and stats["w_median"].tolist() == [2.0, 6.0]
    assert stats[["q_lo", "q_hi"]].values.tolist() == [[0.0, 0.5], [0.5, 1.0]]


def test_probability_correlation_of_a_known_matrix():
    a = torch.tensor([0.1, 0.4, 0.2, 0.3])
    probs = torch.stack([a, 2 * a + 1, -a, torch.tensor([0.3, 0.1, 0.3, 0.1])], dim=1)
    corr = domain.probability_correlation(probs)
    torch.testing.assert_close(corr[0, 1], torch.tensor(1.0))
    torch.testing.assert_close(corr[0, 2], torch.tensor(-1.0))
    np.testing.assert_allclose(corr.numpy(), np.corrcoef(probs.numpy().T), atol=1e-6)


def test_superclass_score_of_a_block_matrix():
    superclass_of = torch.tensor([1, 0, 1, 0, 0])
    same = superclass_of[:, None] == superclass_of[None, :]
    matrix = torch.where(same, 0.8, 0.1).fill_diagonal_(1.0)
    score = domain.superclass_score(matrix, superclass_of)
    assert score["within"] == pytest.approx(0.8) and score["between"] == pytest.approx(0.1)
    assert score["score"] == pytest.approx(0.7)
    assert domain.superclass_order(superclass_of).tolist() == [1, 3, 4, 0, 2]


def test_weight_cosine_of_a_model():
    oracle = SyntheticDataModule(superclasses=2, subclasses=2, dim=4).oracle_teacher()
    cos = domain.weight_cosine(oracle)
    assert cos.shape == (4, 4)
    torch.testing.assert_close(cos.diagonal(), torch.ones(4))


def test_effective_smoothing_of_uniform_and_ls_teachers():
    labels = torch.tensor([0, 3, 2, 2])
    uniform = torch.full((4, K), 1 / K)
    assert universe.effective_smoothing(uniform, labels) == pytest.approx(1.0)
    eps = 0.3
    ls = (1 - eps) * torch.nn.functional.one_hot(labels, K) + eps / K
    assert universe.effective_smoothing(ls, labels) == pytest.approx(eps)
    torch.testing.assert_close(universe.entropy(uniform), torch.full((4,), math.log(K)))
    assert universe.entropy(torch.eye(K)).abs().max() == 0


def test_sibling_mass_counts_wrong_mass_on_superclass_siblings():
    from kd.analysis.domain import sibling_mass

    superclass_of = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 2])
    on_siblings = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.6, 0.4]])
    assert sibling_mass(on_siblings, labels, superclass_of) == pytest.approx(1.0)
    uniform = torch.full((2, 4), 0.25)
    assert sibling_mass(uniform, labels, superclass_of) == pytest.approx(1 / 3)


def test_target_profiles_of_known_targets(batch):
    """kd.analysis.targets on closed forms: KD is the teacher itself (KL 0); KD-pt keeps q_c and
    spreads the rest evenly; the uniform target has entropy log K and shares its wrong-class mass with
    the siblings in proportion to their number; a target that favours one wrong class beyond rho_c
    counts as wrong at the top."""
    from kd.analysis.targets import mean_profile, profile, ranked

    _, labels, teacher_logits = batch
    q = torch.softmax(teacher_logits / 4, dim=-1)
    superclass_of = torch.tensor([0, 0, 0, 1, 1, 2])  # class 5 alone: no siblings
    kd = profile(targets.teacher(q, labels), q, labels, superclass_of)
    assert torch.allclose(kd["kl_from_teacher"], torch.zeros(B, dtype=torch.float64), atol=1e-12)
    assert torch.equal(kd["wrong_argmax"], (q.argmax(-1) != labels).double())
    pt = profile(targets.pt(q, labels), q, labels)
    q_c = q.gather(-1, labels[:, None]).squeeze(-1).double()
    assert torch.allclose(pt["true"], q_c) and torch.allclose(pt["top_wrong"], (1 - q_c) / (K - 1))
    uniform = mean_profile(targets.uniform(q, labels), q, labels, superclass_of)
    assert math.isclose(uniform["entropy"], math.log(K), rel_tol=1e-6)  # a float32 1/K
    with_siblings = superclass_of[labels] != 2
    siblings = (superclass_of[None, :] == superclass_of[:, None]).sum(1) - 1  # of each class
    expected = (siblings[labels][with_siblings].double() / (K - 1)).mean().item()
    assert math.isclose(uniform["sibling_share"], expected, rel_tol=1e-6)
    tilted = torch.full((B, K), 0.1).scatter(-1, labels[:, None], 0.2)
    tilted.scatter_(-1, ((labels + 1) % K)[:, None], 0.3)
    tilted = tilted / tilted.sum(-1, keepdim=True)
    assert mean_profile(tilted, q, labels)["wrong_argmax"] == 1.0
    assert torch.allclose(ranked(tilted, labels)[:3], torch.tensor([0.2, 0.3, 0.1], dtype=torch.float64) / 0.9)
