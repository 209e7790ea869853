"""scikit-learn's own contract checks, for both estimators (and their MLP and SGD variants), none skipped."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from deltagrad_ray.sklearn import DeltaGradClassifier, DeltaGradRegressor


@pytest.fixture(autouse=True)
def _array_api_check_runs(monkeypatch):
    # check_array_api_input skips itself unless SCIPY_ARRAY_API is set; with it set it runs (NumPy
    # inputs under array-API dispatch: these estimators declare no array-API support)
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")


@parametrize_with_checks([DeltaGradClassifier(), DeltaGradRegressor(),
                          DeltaGradClassifier("mlp", hidden=(16,)), DeltaGradRegressor("mlp", hidden=(16,)),
                          DeltaGradClassifier(optimizer="sgd", batch_size=16)])
def test_sklearn_contract(estimator, check):
    check(estimator)
