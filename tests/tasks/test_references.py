"""Shipped reference circuits: valid files, and the literature facts they must reproduce."""

import pytest

from appbench import Head
from appbench.metrics import overlap
from appbench.plugins import get_registries


def shipped():
    from importlib import resources

    for entry in get_registries().tasks:
        refs = resources.files(entry.obj.package).joinpath("reference")
        if not refs.is_dir():
            continue
        for item in refs.iterdir():
            if item.name.endswith(".json"):
                yield entry.name, item.name.removesuffix(".json").replace("__", "/")


@pytest.mark.parametrize(("task", "model"), sorted(shipped()))
def test_every_shipped_reference_validates(task, model):
    ref_file = get_registries().tasks.get(task).reference_file(model)
    assert ref_file is not None and ref_file.task == task and ref_file.model == model
    for ref in ref_file.circuits.values():
        circuit = ref.circuit()
        assert len(circuit) == len(ref.heads) > 0  # no duplicates, all inside the model
        for members in ref.classes.values():
            assert set(members) <= set(ref.heads)


def test_ioi_gpt2_references_match_the_published_comparison():
    ref_file = get_registries().tasks.get("ioi").reference_file("gpt2")
    wang = ref_file.circuits["wang2022"]
    app = ref_file.circuits["app-pathpatch"]
    assert len(wang.heads) == 26 and len(app.heads) == 21
    assert ref_file.default == "app-pathpatch"
    # APP-METHOD.md 5.6: the authors' PP circuit recovers 18/26 Wang heads
    # (precision 0.857, recall 0.692, IoU 0.621), adding 4.3, 6.0 and 7.1.
    o = overlap(app.circuit().heads, wang.circuit().heads)
    assert o.intersection == 18
    assert (round(o.precision, 3), round(o.recall, 3), round(o.iou, 3)) == (0.857, 0.692, 0.621)
    extra = {h.id for h in app.circuit().heads - wang.circuit().heads}
    assert extra == {"a4.h3", "a6.h0", "a7.h1"}
    assert set(wang.classes["name_mover"]) == {"a9.h9", "a10.h0", "a9.h6"}


def test_model_aliases_find_the_reference():
    from appbench.runner import _official_name

    assert _official_name("gpt2-small") == "gpt2"
    task = get_registries().tasks.get("ioi")
    assert task.reference("zoo-ioi-does-not-exist") is None
    assert Head.parse("a9.h9") in task.reference("gpt2")[1].circuit()
