"""The distillation losses: zero at equality, hand-computed values, masks, reductions."""

import math

import pytest
import torch
import torch.nn.functional as F

from hybridize.distill.e2e import LogitsObjective
from hybridize.distill.losses import hidden_state_loss, kl_loss, next_token_loss


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_kl_is_zero_when_student_equals_teacher(kind):
    logits = torch.randn(2, 5, 11)
    assert kl_loss(logits, logits.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_of_identical_models_is_zero(teacher, make_student):
    ids = torch.randint(0, 128, (2, 9))
    objective = LogitsObjective(teacher, teacher, kind="forward_kl", reduction="token", ce_weight=0.0)
    loss, logs = objective(ids)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and logs["kl"] == pytest.approx(0.0, abs=1e-6)


def test_fine_tuning_weights_skip_the_teacher(teacher):
    class Untouchable(torch.nn.Module):
        def forward(self, **kwargs):
            raise AssertionError("the teacher must not run when kl_weight is 0")

    ids = torch.randint(0, 128, (2, 9))
    objective = LogitsObjective(
        teacher, Untouchable(), kind="forward_kl", reduction="token", ce_weight=1.0, kl_weight=0.0
    )
    loss, logs = objective(ids)
    expected = next_token_loss(teacher(input_ids=ids).logits, ids)
    assert set(logs) == {"ce"} and loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_by_hand():
    # teacher p = (1/4, 3/4), student q = (1/2, 1/2), one position
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_loss(student, teacher, kind="forward_kl").item() == pytest.approx(forward, rel=1e-6)
    assert kl_loss(student, teacher, kind="reverse_kl").item() == pytest.approx(reverse, rel=1e-6)
    # F.kl_div(log q, p) is the forward KL, as in MambaInLlama and Minitron
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="sum")
    assert kl_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_mask_and_reductions():
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    per_position = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).sum(-1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    torch.testing.assert_close(kl_loss(student, teacher, mask), per_position[mask.bool()].mean())
    # a masked position may hold anything
    noisy = teacher.clone()
    noisy[0, 3] = 100.0
    torch.testing.assert_close(kl_loss(student, noisy, mask), kl_loss(student, teacher, mask))
    # MambaInLlama's batchmean: the sum over positions divided by the batch size only
    torch.testing.assert_close(kl_loss(student, teacher, reduction="batchmean"), per_position.sum() / 2)
    torch.testing.assert_close(
        kl_loss(student, teacher, mask, reduction="batchmean"), per_position[mask.bool()].sum() / 2
    )


def test_next_token_loss():
    logits, ids = torch.randn(2, 6, 9), torch.randint(0, 9, (2, 6))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(next_token_loss(logits, ids), expected)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    pairs = torch.cat([torch.arange(0, 2), torch.arange(5, 10)])  # (t, t+1) both kept
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9)[pairs], ids[:, 1:].reshape(-1)[pairs])
    torch.testing.assert_close(next_token_loss(logits, ids, mask), expected)


def test_hidden_state_loss_by_hand():
    student = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert hidden_state_loss(student, teacher, kind="l2").item() == pytest.approx(2.5)  # (5 + 0) / 2 tokens
    assert hidden_state_loss(student, teacher, kind="mse").item() == pytest.approx(6.25)  # (12.5 + 0) / 2
    assert hidden_state_loss(student, teacher, torch.tensor([[0, 1]])).item() == pytest.approx(0.0, abs=1e-5)
    hidden_state_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all()  # the norm at zero difference has a finite gradient
