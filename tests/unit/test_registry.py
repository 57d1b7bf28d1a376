import pytest
from pydantic import Field

from appbench import Discoverer, Params, PluginError, Pruner, UnknownNameError
from appbench.registry import Registry, check_plugin_class


def test_duplicate_names_are_rejected_naming_both_owners():
    registry = Registry("pruner")
    registry.add("cflap", object(), "plugin 'a' (dist-a 1.0)")
    with pytest.raises(PluginError) as err:
        registry.add("cflap", object(), "plugin 'b' (dist-b 2.0)")
    assert "dist-a" in str(err.value) and "dist-b" in str(err.value)


def test_unknown_name_suggests_the_closest():
    registry = Registry("pruner")
    for name in ("cflap", "flap", "magnitude"):
        registry.add(name, object(), "x")
    with pytest.raises(UnknownNameError) as err:
        registry.get("cflp")
    assert (
        str(err.value)
        == "Unknown pruner 'cflp'. Did you mean 'cflap'? Available: cflap, flap, magnitude"
    )
    with pytest.raises(UnknownNameError, match="Available: cflap"):
        registry.get("zzzzzz")


@pytest.mark.parametrize("name", ["CFLAP", "1abc", "a b", "", "x/y"])
def test_invalid_names_are_rejected(name):
    with pytest.raises(PluginError, match="must match"):
        Registry("pruner").add(name, object(), "x")


def test_check_plugin_class_catches_malformed_plugins():
    class NoName(Pruner):
        summary = "s"

    class Undocumented(Pruner):
        name = "undocumented"
        summary = "s"

        class Params(Params):
            k: int = 3

    class Fine(Discoverer):
        name = "fine"
        summary = "s"

        class Params(Params):
            k: int = Field(default=3, description="k")

    with pytest.raises(PluginError, match="name"):
        check_plugin_class(NoName, Pruner, "t")
    with pytest.raises(PluginError, match="lack a description"):
        check_plugin_class(Undocumented, Pruner, "t")
    with pytest.raises(PluginError, match="not a subclass of Pruner"):
        check_plugin_class(Fine, Pruner, "t")
    check_plugin_class(Fine, Discoverer, "t")


def test_params_forbid_unknown_keys():
    class P(Params):
        k: int = Field(default=1, description="k")

    with pytest.raises(ValueError):
        P(j=2)
