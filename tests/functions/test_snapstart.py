"""SnapStart: before the snapshot each function builds its clients; after a restore it has new
clients (new sessions: their own credentials and connections) on the service models already
parsed, and a reseeded random generator."""

from __future__ import annotations

import random

from shared import snapstart


def test_a_restore_renews_the_clients_and_reseeds(aws):
    from functions.api import app as _api, context  # noqa: F401 (the handler module registers the hooks)
    from functions.events import app as events
    from functions.launcher import app as launcher

    snapstart.prepare()  # what Lambda runs before the snapshot
    before = (context.session(), context.jobs().client, events._clients(), launcher._clients())
    state = random.getstate()
    snapstart.restored()
    first = random.random()
    random.setstate(state)  # two environments restored from one snapshot start from the same state ...
    snapstart.restored()
    assert random.random() != first  # ... and draw different numbers
    after = (context.session(), context.jobs().client, events._clients(), launcher._clients())
    assert [a is not b for a, b in zip(before, after)] == [True] * 4
    # new sessions, one parse of the service models
    old, new = before[0]._session, after[0]._session
    assert old is not new and old.get_component("data_loader") is new.get_component("data_loader")
    assert old.get_credentials() is not new.get_credentials()


def test_every_function_with_snapstart_registers_its_hooks():
    import importlib

    from local.resources import load_template

    handlers = {name: r["Properties"]["Handler"] for name, r in load_template()["Resources"].items()
                if r["Type"] == "AWS::Serverless::Function" and r["Properties"].get("SnapStart")}
    assert len(handlers) == 3
    for handler in handlers.values():
        module = importlib.import_module(handler.rsplit(".", 1)[0])
        assert any(getattr(f, "__module__", None) == module.__name__ for f in snapstart._PREPARERS), handler
