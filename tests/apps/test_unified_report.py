"""The unified-vs-separate comparison tables are built from the evaluation files' own numbers."""
from tokenflow_jax.apps import unified_report
from tokenflow_jax.shapes import detector as shapes_eval


def _shapes(base: float, extra=()):
    def row(x):
        return {"categories": {c: {"accuracy": x + i / 100} for i, c in enumerate(shapes_eval.CATEGORIES)},
                "overall": x + 0.5}
    strategies = {"1-step": row(base), "3-step": row(base + 0.1), **{name: row(v) for name, v in extra}}
    return {"num_prompts": 120, "strategies": strategies, "chance": row(0.01), "ceiling": row(0.3)}


def test_tables_put_each_file_s_numbers_in_their_columns():
    separate, unified = _shapes(0.2), _shapes(0.1, [("3-step, best of 4 by the model", 0.05)])
    lines = unified_report.shapes_table(separate, unified)
    counting = next(line for line in lines if line.startswith("| counting"))
    i = shapes_eval.CATEGORIES.index("counting") / 100
    expected = [0.2 + i, 0.1 + i, 0.3 + i, 0.2 + i, 0.01 + i, 0.3 + i]  # sep/uni 1-step, sep/uni 3-step, chance, ceil
    assert counting == "| counting | " + " | ".join(f"{100 * x:.1f}%" for x in expected) + " |"
    assert lines[-1].startswith("| **overall** | **70.0%** | **60.0%** | **80.0%** | **70.0%**")

    rerank = unified_report.rerank_table(unified)
    assert rerank[0] == "| category | 3-step, best of 4 by the model |" and rerank[-1] == "| **overall** | **55.0%** |"
    assert unified_report.rerank_table(separate) == []

    vqa = {"results": {"colour": {"n": 50, "accuracy": 0.66, "chance": 0.24},
                       "overall": {"n": 50, "accuracy": 0.66, "chance": 0.24}}}
    other = {"results": {"colour": {"n": 50, "accuracy": 0.62}, "overall": {"n": 50, "accuracy": 0.62}}}
    assert unified_report.vqa_table(vqa, other)[2] == "| colour | 50 | 66.0% | 62.0% | 24.0% |"
