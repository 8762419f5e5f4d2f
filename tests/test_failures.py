"""The failures driver in --quick mode, ``python -m kd.diagnose`` on its teachers, and
``kd.analysis.diagnose`` on a hand-made label-smoothing teacher whose answers are known.

The driver runs two teachers (fig3's and its label-smoothed twin) and a KD student of each at two
temperatures, plus the CE student; the kd.diagnose tests reuse the teacher it trained, so nothing
trains twice.
"""

import re

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from experiments import failures
from experiments.drivers import DATA, QUICK, build_jobs
from experiments.drivers import QUICK_DATA as QUICK_SYNTHETIC
from kd import diagnose as diagnose_cli
from kd.analysis import diagnose, diagnosis
from kd.data.base import IndexedTensors, TensorDataModule
from kd.models.mlp import MLP
from kd.runner import compose_config

SMALL = ["teacher.data.train_per_class=50", "data.train_per_class=10"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("failures")
    out = failures.main(
        [
            "--quick",
            "--seeds",
            "0",
            "--teachers",
            "mlp256x2",
            "mlp256x2-ls0.1",
            "--methods",
            "kd",
            "--temperatures",
            "1",
            "4",
            "--out",
            str(root / "out"),
            "--runs",
            str(root / "logs"),
            "--no-wandb",
            "--",
            f"paths.root_dir={root}",
            *SMALL,
        ]
    )
    return root, out


@pytest.mark.slow
def test_driver_publishes_students_teachers_and_examples(published):
    _, out = published
    for suffix in ("png", "pdf", "md"):
        assert (out / f"failures.{suffix}").stat().st_size > 0
    runs = pd.read_csv(out / "failures.csv")
    assert (runs.status == "completed").all()
    assert set(runs.method) == {
        "ce",
        *(f"kd-tau{t}@{teacher}" for t in (1, 4) for teacher in ("mlp256x2", "mlp256x2-ls0.1")),
    }
    assert set(runs.tau.dropna()) == {1, 4} and runs[runs.method == "ce"].tau.isna().all()
    teachers = pd.read_csv(out / "failures_teachers.csv")
    assert set(teachers.teacher) == {"mlp256x2", "mlp256x2-ls0.1"} and teachers.teacher_run.nunique() == 2
    assert teachers[["acc", "ece", "q_c_q50", "effective_smoothing", "superclass_high_tau_score"]].notna().all().all()
    examples = pd.read_csv(out / "failures_examples.csv")
    assert len(examples) == 2 * 20 * 10  # two teachers x 20 classes x 10 student training examples
    assert examples.q_c.between(0, 1).all()
    summary = (out / "failures.md").read_text()
    assert "Each teacher minus fig3's teacher (mlp256x2)" in summary
    assert "- label smoothing: mlp256x2-ls0.1 - mlp256x2, score, probabilities, tau 4: " in summary
    assert "### tau = 4" in summary and "mlp256x2-ls0.1 - mlp256x2, KD student accuracy at tau 4: " in summary


def quick_teacher(root) -> list[str]:
    """The overrides that name the driver's fig3 teacher (--quick, seed 0), found in its cache."""
    return [
        "experiment=fig3_synthetic",
        "data.delta=0.5",
        "seed=0",
        f"paths.root_dir={root}",
        *QUICK,
        *QUICK_SYNTHETIC["synthetic"],
        *SMALL,
    ]


@pytest.mark.slow
def test_kd_diagnose_prints_the_report_of_a_cached_or_checkpointed_teacher(published, capsys):
    root, _ = published
    found = diagnose_cli.main(quick_teacher(root))
    report = capsys.readouterr().out
    folder = report.splitlines()[0].removeprefix("teacher: ")
    assert folder.startswith(str(root / "teachers" / "mlp-ce-"))
    for line in (
        "accuracy (test)",
        "ECE (test, 15 bins)",
        "q_c (training split, tau 1)",
        "effective smoothing",
        "superclass score, probabilities, tau 4",
    ):
        assert line in report
    checkpoint = f"{folder}/checkpoints/last.ckpt"
    again = diagnose_cli.main([*quick_teacher(root), "teacher=checkpoint", f"teacher.path={checkpoint}"])
    assert capsys.readouterr().out.startswith(f"teacher: {checkpoint}\n")
    assert again == pytest.approx(found)


def test_kd_diagnose_errors_are_one_line(root):
    with pytest.raises(SystemExit, match="^error: teacher=none: nothing to diagnose"):
        diagnose_cli.main(["teacher=none"])
    with pytest.raises(SystemExit, match="^error: objective=ce has no kd_weight"):
        diagnose_cli.main(["teacher=oracle", "objective=ce"])
    with pytest.raises(SystemExit, match="^error: teacher checkpoint .* does not exist"):
        diagnose_cli.main(["teacher=checkpoint", "teacher.path=missing.ckpt"])


class OneHotData(TensorDataModule):
    """x = one-hot(y): a linear teacher can then give each class any distribution it likes."""

    def __init__(self, superclass_of, per_class=3):
        super().__init__()
        self.superclass_of, self.per_class = superclass_of, per_class

    def setup(self, stage=None):
        y = torch.arange(self.num_classes).repeat(self.per_class)
        self.splits = {split: IndexedTensors(F.one_hot(y).float(), y) for split in ("train", "test")}

    @property
    def num_classes(self):
        return len(self.superclass_of)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_a_label_smoothing_teacher_has_constant_q_c_and_no_class_relationships(eps):
    """Teacher q = (1 - eps) y + eps u: every q_c, and w, is the same; every wrong class gets the same
    mass whatever the superclass, so the within- and between-superclass scores are equal."""
    data = OneHotData(torch.tensor([0, 0, 1, 1, 2, 2]))
    k, kd_weight = data.num_classes, 0.9
    teacher = MLP(k, k, hidden=())
    with torch.no_grad():
        teacher.classifier.weight.copy_(torch.log((1 - eps) * torch.eye(k) + eps / k))
        teacher.classifier.bias.zero_()
    found = diagnose(teacher, data, kd_weight)
    q_c = 1 - eps + eps / k
    assert found["acc"] == 1 and found["ece"] == pytest.approx(1 - q_c, abs=1e-6)
    assert found["q_c_std"] == pytest.approx(0, abs=1e-6) and found["q_c_q10"] == pytest.approx(q_c, abs=1e-6)
    assert found["w_start_mean"] == pytest.approx(1 - kd_weight * eps, abs=1e-5)
    assert found["effective_smoothing"] == pytest.approx(eps, abs=1e-6)
    for key in ("superclass_score", "superclass_high_tau_score", "weights_score"):
        assert found[key] == pytest.approx(0, abs=1e-6)
    rows = diagnosis.per_example(teacher, data, kd_weight)
    assert len(rows) == 3 * k and rows.q_c.to_numpy() == pytest.approx(q_c, abs=1e-6)


def test_a_confident_teacher_starts_kd_at_w_one_and_uniform_at_one_minus_kd_weight():
    labels = torch.tensor([0, 2, 1])
    confident = F.one_hot(labels, 4).float()
    torch.testing.assert_close(diagnosis.start_rescaling(confident, labels, 0.9), torch.ones(3))
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(diagnosis.start_rescaling(uniform, labels, 0.9), torch.full((3,), 0.1))


def test_cifar100_jobs_vary_the_teacher_as_configured():
    jobs = build_jobs("cifar100", [], [0], failures.variants(failures.TEACHERS["cifar100"], ["kd"], [4.0]), [])
    assert DATA["cifar100"] in jobs["kd-tau4@resnet110-s0"].overrides[0]
    assert jobs["kd-tau4@resnet56-ls0.2-s0"].values == {
        "method": "kd-tau4@resnet56-ls0.2",
        "seed": 0,
        "student": "kd",
        "tau": 4.0,
        "teacher": "resnet56-ls0.2",
    }
    teachers = {name: compose_config(job.overrides, "/unused").teacher for name, job in jobs.items()}
    assert teachers["kd-tau4@resnet110-s0"].model.name == "resnet110"
    assert teachers["kd-tau4@resnet20-s0"].model.name == "resnet20"
    assert teachers["kd-tau4@resnet56-ls0.2-s0"].objective == {"name": "ls", "eps": 0.2}
    assert teachers["kd-tau4@resnet56-s0"].objective.name == "ce"
    assert teachers["kd-tau4@resnet56-s0"].model.name == "resnet56"


def test_unknown_teacher_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--teachers resnet56 is not a teacher of --data=synthetic"):
        failures.main(["--teachers", "resnet56", "--out", str(tmp_path), "--runs", str(tmp_path)])


def test_a_label_smoothed_teacher_is_predicted_harmless_at_tau_1_and_harmful_above():
    """Judged by the 95% paired interval, as fig3's claims; the comparisons then get their Holm line."""

    def row(tau, gap, verdict, p):
        low, high = {"holds": (0.005, 0.015), "reversed": (-0.015, -0.005), "unresolved": (-0.006, 0.004)}[verdict]
        return {"teacher": "t-ls0.1", "quantity": "kd", "tau": tau, "gap": gap, "n": 3, "spread": 0.01, "ci_low": low,
                "ci_high": high, "p": p, "verdict": verdict}  # fmt: skip

    gaps = pd.DataFrame(
        [
            row(1.0, +0.010, "holds", 0.001),
            row(1.0, -0.001, "unresolved", 0.6),
            row(2.0, -0.001, "unresolved", 0.7),
            row(4.0, -0.010, "reversed", 0.004),
            row(1.0, -0.010, "reversed", 0.02),
        ]
    )
    *lines, blank, family = failures.verdicts(gaps, {"label smoothing": ["t", "t-ls0.1"]}, "t")
    assert [re.search(r"\]\*?, (.*)\.$", line)[1] for line in lines] == [
        "as predicted: no harm at tau 1",  # better at tau 1 is no harm
        "as predicted: no harm at tau 1",  # its interval contains 0
        "unresolved (the interval contains 0)",  # above tau 1 the prediction needs an interval below 0
        "as predicted",
        "against the prediction of no harm at tau 1",  # its interval below 0 at tau 1
    ]
    # 5 comparisons: 0.001 <= .05/5, 0.004 <= .05/4, 0.02 > .05/3 stops the rest
    assert blank == "" and "5 comparisons" in family and "2 of the 3 decided verdicts survive" in family
    exact = pd.Series({**row(1.0, -0.115, "reversed", 0.0), "spread": 0.0, "ci_low": -0.115, "ci_high": -0.115})
    assert failures.gap_text(exact) == "-0.115 (exact: the same in every seed)*"  # one teacher in every seed
    *_, none = failures.verdicts(gaps[gaps.verdict == "unresolved"], {"label smoothing": ["t", "t-ls0.1"]}, "t")
    assert none.endswith(
        "2 comparisons at once. None is decided, so Holm's correction of that family (family-wise error 5%) has none to undo."
    )
