"""The console summary of a test.py run: what summary.json holds, in a few readable lines."""

from __future__ import annotations

import math

from tumorseg.evaluation.scoring import NO_TUMOUR, SIZE_COLUMN, TAIL_DICE, Scoring

PRINTED_GROUPS = 12  # more groups than this (e.g. patients) are summed up in one console line


def print_summary(summary: dict, scoring: Scoring) -> None:
    """The summary's main figures on the console."""
    print(f"\n{'images processed':<18}{summary['count']}\n{'scored':<18}{summary['scored']}\n"
          f"{'decision rule':<18}{summary['decision_rule_text']} ({summary['decision_rule_source']})")
    if "volumes" in summary:
        v = summary["volumes"]
        print(f"{'volumes':<18}{v['count']} of {v['of']} predicted, {v['scored']} scored in 3-D"
              + (f": Dice mean {v['dice_mean']:.4f}, median {v['dice_median']:.4f}; HD95 median "
                 f"{format_number(v['hd95_mm_median'])} mm" if v["scored"] else ""))
    if not summary["scored"]:
        return
    for key in ("dice_mean", "dice_median", "dice_pooled", "iou_mean", "pixel_accuracy"):
        print(f"{key:<18}{summary[key]:.4f}")
    print(f"{'Dice < ' + str(TAIL_DICE):<18}{summary['share_dice_below_tail']:.1%} of images "
          f"({summary['share_dice_zero']:.1%} at 0)")
    if "class_mix" in summary:
        print(f"{'class-mix Dice':<18}{summary['class_mix']['dice_mean']:.4f} (by {summary['class_mix']['column']})")
    for key in ("precision", "sensitivity", "hd95_px", "assd_px", "hd95_mm", "assd_mm"):
        stats = summary["metrics"].get(key)
        if stats is not None and stats["count"]:
            undefined = f" ({stats['count_undefined']} undefined)" if stats["count_undefined"] else ""
            print(f"{key + '_mean':<18}{stats['mean']:.4f}   median {stats['median']:.4f}{undefined}")
    print("failure categories: " + ", ".join(f"{name} {count}" for name, count in summary["failure_counts"].items()
                                             if count))
    print(f"{'calibration ECE':<18}{summary['calibration']['ece']:.4f}")
    if "uncertainty" in summary:
        u = summary["uncertainty"]
        print(f"{'uncertainty':<18}Spearman with Dice {format_number(u['spearman_with_dice'])}, AUROC for "
              f"Dice < {u['poor_dice_below']}: {format_number(u['auroc_poor'])} ({u['poor_images']} such images)")
    if "type_classification" in summary:
        types = summary["type_classification"]
        for unit in ("per_image", "per_patient"):
            if unit in types:
                print(f"{'type ' + unit.replace('_', ' '):<18}accuracy {format_number(types[unit]['accuracy'])}, "
                      f"balanced {format_number(types[unit]['balanced_accuracy'])} ({types[unit]['count']} "
                      f"{'images' if unit == 'per_image' else 'patients'}, by {types['column']})")
    print_group_scores(summary, scoring)


def print_group_scores(summary: dict, scoring: Scoring) -> None:
    """Per-group scores (one line in all when there are many groups) and each stratum's mean Dice."""
    groups = summary.get("by_group", {}).get("groups", {})
    if len(groups) > PRINTED_GROUPS:
        means = [scores["dice_mean"] for scores in groups.values()]
        print(f"  per {scoring.group_column}: {len(groups)} groups, mean Dice from {min(means):.4f} to "
              f"{max(means):.4f} (each in summary.json and report.html)")
    else:
        for group, scores in groups.items():
            print(f"  {scoring.group_column} {group or '(none)'}: {scores['count']} images, "
                  f"Dice mean {scores['dice_mean']:.4f}, median {scores['dice_median']:.4f}, "
                  f"pooled {scores['dice_pooled']:.4f}")
    for column, stratum in summary["strata"].items():
        print(f"  by {column}: " + ", ".join(f"{label or '(none)'} {scores['dice_mean']:.3f} ({scores['count']})"
                                             for label, scores in stratum["groups"].items()))
    tumour_free = summary["strata"][SIZE_COLUMN]["groups"].get(NO_TUMOUR)
    if tumour_free is not None:
        print(f"  {NO_TUMOUR}: {tumour_free['count']} images with an empty mask, false alarm in "
              f"{tumour_free['false_alarms']} ({tumour_free['false_alarm_rate']:.1%})")


def format_number(value: float | None) -> str:
    """A summary figure with 3 decimals; 'undefined' for None (a NaN in summary.json)."""
    return "undefined" if value is None or math.isnan(value) else f"{value:.3f}"
