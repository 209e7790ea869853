"""DeltaGrad, fine-tuning and exact retraining through the common interface."""

import pytest
import torch

from deltagrad_ray.baselines import DeltaGrad, ExactRetrain, FineTune, TrainConfig
from deltagrad_ray.core import (DeltaGradConfig, InputError, ModelSpec, deltagrad, deltagrad_online,
                                make_change_set, retrain)

from .problems import LOGREG, LOGREG_SHORT, N, classification, random_ids


def test_converged_problems_are_converged():
    # the premise of the fine-tuning and Newton tests: θ_T is the optimum
    data, _ = classification()
    st = ExactRetrain(LOGREG).fit(data)
    g = st.model.grad_sum(st.params, data.X, data.y) / N + LOGREG.l2 * st.params
    assert float(g.norm()) < 1e-9


def test_exact_retrain_is_the_core_retrain():
    data, extra = classification()
    m = ExactRetrain(LOGREG_SHORT)
    st = m.fit(data)
    ids = random_ids(N, 20, 1)
    out = m.apply(st, m.change(st, delete_ids=ids, add=extra))
    core = retrain(st.model, st.traj, data, make_change_set(data, delete_ids=ids, add=extra, n_classes=3))
    assert torch.equal(out.params, core)


def test_deltagrad_adapter_is_the_core_replay():
    data, extra = classification()
    dg = DeltaGrad(LOGREG_SHORT, DeltaGradConfig(period=5, burn_in=10))
    st = dg.fit(data)
    ids = random_ids(N, 20, 1)
    out = dg.apply(st, dg.change(st, delete_ids=ids, add=extra))
    core = deltagrad(st.model, st.traj, data, make_change_set(data, delete_ids=ids, add=extra, n_classes=3),
                     DeltaGradConfig(period=5, burn_in=10))
    assert torch.equal(out.params, core.params)
    assert out.info["explicit_steps"] == core.explicit_steps
    ref = dg.exact(st, dg.change(st, delete_ids=ids, add=extra)).params
    assert float((out.params - ref).norm()) < 0.05 * float((ref - st.params).norm())


def test_deltagrad_requests_chain_like_the_core_online_mode():
    data, _ = classification()
    dg = DeltaGrad(LOGREG_SHORT)
    st = dg.fit(data)
    batches = list(random_ids(N, 30, 2).split(10))
    for ids in batches:
        st = dg.apply(st, dg.change(st, delete_ids=ids)).state
    core = deltagrad_online(st.model, st.traj, data, batches, n_classes=3)
    assert torch.equal(st.params, core.params)
    exact = dg.exact(dg.fit(data), dg.change(dg.fit(data), delete_ids=torch.cat(batches))).params
    assert float((st.params - exact).norm()) < 0.05 * float((exact - dg.fit(data).params).norm())


def test_deltagrad_continues_from_an_exact_state():
    data, _ = classification()
    dg = DeltaGrad(LOGREG_SHORT)
    st = dg.fit(data)
    first = dg.exact(st, dg.change(st, delete_ids=random_ids(N, 10, 3))).state
    ids = random_ids(N, 20, 4)
    ids = ids[~torch.isin(ids, random_ids(N, 10, 3))]
    out = dg.apply(first, dg.change(first, delete_ids=ids))
    ref = dg.exact(first, dg.change(first, delete_ids=ids)).params
    assert float((out.params - ref).norm()) < 0.05 * float((ref - first.params).norm())


@pytest.mark.parametrize("case", ["delete", "add"])
def test_fine_tuning_moves_towards_the_exact_model(case):
    # converged θ_T: GD on the changed objective contracts towards its optimum (= exact
    # retraining here) at a linear rate, so more steps leave less of the change's effect
    data, extra = classification()
    errors = []
    for k in (1, 10, 100):
        ft = FineTune(LOGREG, k=k)
        st = ft.fit(data)
        ch = ft.change(st, delete_ids=random_ids(N, 20, 5) if case == "delete" else None,
                       add=extra if case == "add" else None)
        exact = ft.exact(st, ch).params
        moved = float((exact - st.params).norm())
        errors.append(float((ft.apply(st, ch).params - exact).norm()) / moved)
        assert ft.apply(st, ch).info == {"steps": k}
    assert errors[0] < 1 and errors[2] < errors[1] < errors[0], errors
    assert errors[2] < 0.05


def test_fine_tuning_bad_input_and_no_deltagrad_after_it():
    with pytest.raises(InputError, match="fine-tuning needs k >= 1 steps, got k=0"):
        FineTune(LOGREG, k=0)
    with pytest.raises(InputError, match="fine-tuning learning rate must be > 0"):
        FineTune(LOGREG, k=3, lr=-1.0)
    data, _ = classification()
    ft = FineTune(LOGREG_SHORT, k=2)
    st = ft.fit(data)
    tuned = ft.apply(st, ft.change(st, delete_ids=torch.tensor([1]))).state
    dg = DeltaGrad(LOGREG_SHORT)
    with pytest.raises(InputError, match="this state has no trajectory over its rows"):
        dg.apply(tuned, dg.change(tuned, delete_ids=torch.tensor([2])))


def test_training_data_is_validated():
    data, _ = classification()
    with pytest.raises(InputError, match=r"data: labels out of range \[0, 2\)"):
        ExactRetrain(TrainConfig(ModelSpec("logreg", 8, 2), steps=3, lr=0.1)).fit(data)
