"""plan.py: the plan a cross-validation is continued and paired under, and how two plans differ."""

from tumorseg.crossval.plan import make_plan, plan_differences

TINY = ["--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--in-channels", "1",
        "--normalization", "zscore", "--epochs", "2"]


def test_a_config_key_added_since_the_plan_is_no_difference_at_its_default(demo_root):
    plan, _ = make_plan(demo_root, "", 0.98, TINY, 3)
    older = {**plan, "train_config": {k: v for k, v in plan["train_config"].items() if k != "RULE_MOST_PROBABLE"}}
    assert plan_differences(older, plan) == []
    changed = {**plan, "train_config": {**plan["train_config"], "RULE_MOST_PROBABLE": True}}
    assert plan_differences(older, changed) == ["train_config.RULE_MOST_PROBABLE: False -> True"]
