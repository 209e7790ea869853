"""DeltaGradConfig: one typed object that round-trips through dicts, for every field."""

from __future__ import annotations

import dataclasses

import pytest

from deltagrad_ray.core import DeltaGradConfig, InputError

# a value other than the default for every field (a field added later without a value here fails
# test_every_field_has_a_non_default_value)
NON_DEFAULT = {"period": 7, "burn_in": 3, "history": 4, "schedule": "geometric", "sigma": "yy/sy",
               "curvature_eps": 1e-8, "curvature_guard": 5.0, "max_curvature": 12.5, "first_gap": 3,
               "growth": 1.7, "max_gap": 30, "adaptive_tol": 0.2, "curvature": "shared", "shared_history": 6,
               "path_pairs": 2, "shared_rtol": 1e-4}


def test_every_field_has_a_non_default_value():
    assert sorted(NON_DEFAULT) == sorted(f.name for f in dataclasses.fields(DeltaGradConfig))
    defaults = DeltaGradConfig().to_dict()
    assert all(NON_DEFAULT[k] != defaults[k] for k in NON_DEFAULT)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_each_field_round_trips_through_a_dict(name):
    cfg = DeltaGradConfig(**{name: NON_DEFAULT[name]})
    d = cfg.to_dict()
    assert d[name] == NON_DEFAULT[name]
    back = DeltaGradConfig.from_dict(d)
    assert back == cfg and getattr(back, name) == NON_DEFAULT[name]


def test_all_fields_at_once_and_through_json():
    import json
    cfg = DeltaGradConfig(**NON_DEFAULT)
    assert DeltaGradConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DeltaGradConfig.from_dict({}) == DeltaGradConfig() == DeltaGradConfig.from_dict(None)


def test_unknown_keys_are_refused_with_the_allowed_ones_named():
    with pytest.raises(InputError, match=r"unknown DeltaGrad setting 'colour'; expected one of period, burn_in"):
        DeltaGradConfig.from_dict({"period": 5, "colour": "red"})


@pytest.mark.parametrize("kwargs,msg", [
    ({"period": True}, "period T0 must be an integer >= 1, got True"),
    ({"period": 2.5}, "period T0 must be an integer >= 1, got 2.5"),
    ({"curvature_guard": "2"}, "curvature_guard must be a finite number, got '2'"),
    ({"growth": float("nan")}, "growth must be a finite number, got nan"),
    ({"growth": 0.5}, "growth must be >= 1, got 0.5"),
    ({"max_gap": 1, "first_gap": 2}, r"max_gap must be >= first_gap \(2\), got 1"),
])
def test_mistyped_values_are_one_line_errors(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        DeltaGradConfig(**kwargs)


def test_integer_values_for_float_fields_become_floats():
    cfg = DeltaGradConfig(curvature_guard=3, max_curvature=10)
    assert isinstance(cfg.curvature_guard, float) and isinstance(cfg.max_curvature, float)
    assert cfg == DeltaGradConfig(curvature_guard=3.0, max_curvature=10.0)
