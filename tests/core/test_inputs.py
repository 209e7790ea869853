"""Bad input: one clear error naming the problem and what was expected."""

import pytest
import torch

from deltagrad_ray.core import (Dataset, DeltaGradConfig, InputError, ModelSpec, make_change_set,
                                synthetic_classification, validate)

DATA = synthetic_classification(50, 4, 3, seed=0)


def test_unknown_ids():
    with pytest.raises(InputError, match=r"unknown ids to delete \(not in the data\): 50, 99"):
        make_change_set(DATA, delete_ids=torch.tensor([3, 50, 99]))


def test_duplicate_ids():
    with pytest.raises(InputError, match="duplicate ids to delete: 3"):
        make_change_set(DATA, delete_ids=torch.tensor([3, 4, 3]))


def test_deleting_every_point():
    with pytest.raises(InputError, match="deletes every one of the 50 remaining rows"):
        make_change_set(DATA, delete_ids=DATA.ids)


def test_added_rows_of_the_wrong_width():
    add = synthetic_classification(3, 5, 3, seed=1)
    with pytest.raises(InputError, match="added rows: rows have 5 features, expected 4"):
        make_change_set(DATA, add=Dataset(add.X, add.y, add.ids + 100), n_classes=3)


def test_labels_out_of_range():
    add = synthetic_classification(3, 4, 3, seed=1)
    with pytest.raises(InputError, match=r"labels out of range \[0, 3\) in rows with id 101"):
        make_change_set(DATA, add=Dataset(add.X, torch.tensor([0, 3, 1]), add.ids + 100), n_classes=3)


def test_nan_or_inf_features():
    X = DATA.X.clone()
    X[7, 2] = float("nan")
    X[9, 0] = float("inf")
    with pytest.raises(InputError, match="NaN or inf features in rows with id 7, 9"):
        validate(Dataset(X, DATA.y, DATA.ids), n_features=4, n_classes=3)


def test_added_ids_already_in_the_data():
    with pytest.raises(InputError, match="added rows reuse ids already in the data: 0, 1"):
        make_change_set(DATA, add=DATA.rows(torch.tensor([0, 1])), n_classes=3)


@pytest.mark.parametrize("kwargs,msg", [
    ({"period": 0}, "period T0 must be an integer >= 1, got 0"),
    ({"history": 0}, "history m must be an integer >= 1, got 0"),
    ({"burn_in": -1}, "burn-in j0 must be an integer >= 0, got -1"),
    ({"schedule": "random"}, "schedule must be one of"),
    ({"sigma": "1"}, "sigma must be one of"),
])
def test_bad_deltagrad_settings(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        DeltaGradConfig(**kwargs)


@pytest.mark.parametrize("args,msg", [
    (("svm", 4, 3), "model must be one of logreg, linear, mlp"),
    (("logreg", 4, 1), "logreg needs n_classes >= 2"),
    (("mlp", 4, 3, ()), "mlp needs hidden sizes"),
])
def test_bad_model_specs(args, msg):
    with pytest.raises(InputError, match=msg):
        ModelSpec(*args)
