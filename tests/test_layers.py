"""The floor plan holds: imports point down the layers only, and no module imports itself back
through others (see tests/layers.py for the layers)."""

from __future__ import annotations

from tests.layers import Import, cycles, imports, layer, upward


def test_every_import_points_down_or_sideways() -> None:
    found = imports()
    assert found, "the import graph came out empty: tests/layers.py reads no module"
    assert [f"{i.source}:{i.line} -> {i.target}" for i in upward(found)] == []


def test_no_import_cycle_even_through_typing_only_imports() -> None:
    assert cycles(imports(), typing_too=True) == []


def test_the_layer_check_catches_an_upward_import() -> None:
    """The checks above can fail: a store reaching for the session, or config for the proxy,
    is reported; a session reaching for the store is not."""
    bad = [
        Import("store.redis", "session.manager", 1, False),
        Import("config.models", "proxy", 1, True),
    ]
    fine = Import("session.manager", "store.redis", 1, False)
    assert upward([*bad, fine]) == bad
    assert (
        layer("cli")
        > layer("proxy.forward")
        > layer("http.wire")
        > layer("config")
        > layer("tokens")
    )


def test_the_cycle_check_catches_a_cycle() -> None:
    loop = [Import("a", "b", 1, False), Import("b", "c", 1, True), Import("c", "a", 1, False)]
    assert cycles(loop) == []  # run time: the typing-only edge breaks it
    assert cycles(loop, typing_too=True) == [["a", "b", "c"]]
