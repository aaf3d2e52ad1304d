from bench.studies.compare_curves import compare


def test_equal_curves_have_no_differing_step_and_a_differing_one_is_named() -> None:
    curves = {"1": {"a": [3.0, 2.5, 2.0], "b": [3.0, 2.5, 2.0]},
              "2": {"a": [3.0, 2.5, 2.0], "b": [3.0, 2.25, 2.5]}}
    same, differ = compare(curves, "a", "b")
    assert same == "seed 1: b vs a over 3 steps: first differing step None, max |diff| 0"
    assert differ == "seed 2: b vs a over 3 steps: first differing step 1, max |diff| 0.5"
