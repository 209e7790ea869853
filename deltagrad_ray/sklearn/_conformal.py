class CrossConformalRegressor:
    pass


class CrossConformalClassifier:
    pass
