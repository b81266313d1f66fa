import math

import pytest
import torch

from llm.training.core.nonfinite import NonFiniteError, StepChecks


def checks_of(nan_policy="skip"):
    said = []
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepChecks(optimizer, torch.device("cpu"), nan_policy, said.append), model, said


def test_a_step_with_a_non_finite_loss_or_norm_is_not_taken_and_is_counted_or_stops_as_the_policy_says():
    checks, _, said = checks_of("skip")
    assert checks.host_reads and not checks.skips_on_device  # on the CPU the host decides, at once
    assert checks.taken(1.0, [0.5, 0.25]) is True
    checks.note(1, True, [0.5, 0.25], None)  # a step the host knows was taken leaves nothing to check
    bad_loss, bad_norm = checks.taken(1.0, [0.5, math.nan]), checks.taken(math.inf, [0.5])
    assert bad_loss is False and bad_norm is False
    checks.note(2, bad_loss, [0.5, math.nan], None)
    checks.note(3, bad_norm, [0.5], None)
    checks.check()
    assert checks.skipped == 2 and said == [
        "warning: non-finite loss at step 2 on rank(s) [0]: step skipped",
        "warning: non-finite gradient norm at step 3, every rank's loss finite: step skipped"]
    checks.check()  # each step is acted on once
    assert checks.skipped == 2

    checks, _, said = checks_of("stop")
    checks.note(4, checks.taken(1.0, [math.inf]), [math.inf], None)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 4 on rank\(s\) \[0\]: stopping"):
        checks.check()
    assert checks.skipped == 0 and said == []


def test_an_overflow_the_loss_scaler_found_is_its_to_skip_unless_a_loss_is_not_finite():
    checks, _, said = checks_of("stop")
    checks.note(1, False, [0.5], [torch.tensor(1.0)])  # finite loss, gradients overflowed: the scaler's skip
    checks.check()
    assert checks.overflows == 1 and checks.skipped == 0 and said == []
    checks.note(2, False, [math.nan], True)  # a NaN loss is the policy's, overflow or not
    with pytest.raises(NonFiniteError, match="non-finite loss at step 2"):
        checks.check()
    checks, _, _ = checks_of("stop")  # the run above has stopped
    checks.note(3, False, [0.5], [torch.tensor(0.0)])  # no overflow found: the norm overflowed by itself
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 3"):
        checks.check()


def test_a_step_not_taken_leaves_the_weights_as_they_were():
    checks, model, _ = checks_of()
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.detach().clone()
    checks.update(False, None)
    assert torch.equal(model.weight, before)
    checks.update(True, None)
    assert not torch.equal(model.weight, before)
