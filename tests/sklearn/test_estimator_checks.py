"""scikit-learn's own contract checks, for both estimators (and their MLP and SGD variants), none skipped."""

import warnings

import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from deltagrad_ray.sklearn import DeltaGradClassifier, DeltaGradRegressor


@pytest.fixture(autouse=True)
def _array_api_check_runs(monkeypatch):
    # check_array_api_input skips itself unless SCIPY_ARRAY_API is set; with it set it runs (NumPy
    # inputs under array-API dispatch: these estimators declare no array-API support)
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")


# The MLPs with 100 steps, as scikit-learn checks its own (sklearn/utils/_test_common/instance_generator.py:
# ``MLPClassifier: dict(max_iter=100)``): on the checks' random data they do not reach tol, and steps="auto"
# would run to its cap of 1000 in every check (48 s instead of 13 s for this file); the defaults of the
# MLPs are tested on real data in test_defaults.py.
@parametrize_with_checks([DeltaGradClassifier(), DeltaGradRegressor(),
                          DeltaGradClassifier("mlp", hidden=(16,), steps=100),
                          DeltaGradRegressor("mlp", hidden=(16,), steps=100),
                          DeltaGradClassifier(optimizer="sgd", batch_size=16)])
def test_sklearn_contract(estimator, check):
    # As scikit-learn runs these checks on its own estimators (sklearn/tests/test_common.py,
    # test_estimators: ``ignore_warnings(category=(FutureWarning, ConvergenceWarning, ...))``): the
    # checks fit on tiny random data (e.g. 30 rows of uniform noise with cyclic labels), on which the
    # MLPs and constant-η SGD end above tol, and warn; the checks themselves run in full. Every other
    # warning is still an error.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        check(estimator)


def test_linear_kinds_converge_on_the_check_data():
    """The linear kinds reach tol on the checks' data sets: the warning above comes from the MLPs and SGD."""
    import numpy as np
    from sklearn.utils.estimator_checks import _regression_dataset
    X, y = _regression_dataset()
    rnd = np.random.RandomState(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        DeltaGradRegressor().fit(X, y)
        DeltaGradClassifier().fit(rnd.uniform(size=(30, 3)), np.arange(30) % 3)
