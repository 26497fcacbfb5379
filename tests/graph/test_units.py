"""Grouping units to a maximum count (``--max-units``) on a real model (PP-OCR classifier).

What :func:`group_units` promises: at most ``max_units`` groups, contiguous runs of whole
units in graph order of about equal size, every unit node in exactly one group, names
``g<k>:<first unit>`` that are the same every time the same model is grouped the same way,
feeders that are the groups feeding it, and no change at all when there are few enough units.
Expectations are derived from the ungrouped units and the graph, not from the grouping code.
"""

from __future__ import annotations

import pytest

from amp_search.graph import Unit, find_units, group_units, sanitize
from amp_search.graph._index import GraphIndex
from amp_search.graph.io import load_model


@pytest.fixture(scope="module")
def cls_model(real_model):
    path, _ = real_model("ppocr_cls", 4)
    model = sanitize(load_model(path))
    return path, model, find_units(model)


def _runs(units, groups):
    """The unit indices each group holds, checking groups are made of whole units in order."""
    runs = []
    k = 0
    for g in groups:
        start, nodes = k, ()
        while len(nodes) < len(g.nodes):
            nodes += units[k].nodes
            k += 1
        assert nodes == g.nodes, f"{g.name} splits a unit or skips one"
        runs.append(list(range(start, k)))
    assert k == len(units)
    return runs


@pytest.mark.parametrize("max_units", [1, 12, 50, 98])
def test_groups_are_contiguous_runs_of_about_equal_size(cls_model, max_units):
    _, _, units = cls_model
    assert len(units) > max_units  # the classifier has 99 units
    groups = group_units(units, max_units)
    assert len(groups) <= max_units
    # Runs of equal size (within one) cover the units with max_units groups exactly.
    assert len(groups) == max_units
    # Every unit node in exactly one group, in graph order.
    flat = [n for g in groups for n in g.nodes]
    assert flat == [n for u in units for n in u.nodes]
    assert len(set(flat)) == len(flat)
    runs = _runs(units, groups)
    sizes = [len(r) for r in runs]
    assert max(sizes) - min(sizes) <= 1
    for k, (g, run) in enumerate(zip(groups, runs, strict=True)):
        assert g.name == f"g{k:02d}:{units[run[0]].name}"
        assert g.op_types == tuple(o for i in run for o in units[i].op_types)
        weights = [w for i in run for w in units[i].weights]
        assert sorted(g.weights) == sorted(set(weights))


def test_group_feeders_are_the_groups_that_feed_them(cls_model):
    _, _, units = cls_model
    groups = group_units(units, 12)
    group_of_node = {n: g.name for g in groups for n in g.nodes}
    group_of_unit = {u.name: group_of_node[u.nodes[0]] for u in units}
    for g in groups:
        members = [u for u in units if group_of_unit[u.name] == g.name]
        want = {group_of_unit[f] for u in members for f in u.feeders} - {g.name}
        assert set(g.feeders) == want
        assert len(set(g.feeders)) == len(g.feeders)
    # The classifier is a chain of blocks: each group but the first is fed by its predecessor.
    assert groups[0].feeders == ()
    for before, g in zip(groups, groups[1:], strict=False):
        assert before.name in g.feeders


def test_group_outputs_hold_every_tensor_read_outside_the_group(cls_model):
    _, model, units = cls_model
    idx = GraphIndex.build(model)
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    for g in group_units(units, 12):
        inside = {position[n] for n in g.nodes}
        read_outside = {
            o
            for i in inside
            for o in model.graph.node[i].output
            if o in g.tensors
            and (o in idx.graph_outputs or any(r not in inside for r in idx.consumers.get(o, [])))
        }
        assert read_outside <= set(g.outputs)
        assert set(g.tensors) == {t for u in units if u.nodes[0] in g.nodes for t in u.tensors}


def test_group_outputs_and_inputs_are_only_what_crosses_the_group_boundary(cls_model):
    _, model, units = cls_model
    idx = GraphIndex.build(model)
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    for g in group_units(units, 12):
        inside = {position[n] for n in g.nodes}
        produced = {o for i in inside for o in model.graph.node[i].output}
        for o in g.outputs:
            assert o in idx.graph_outputs or any(
                r not in inside for r in idx.consumers.get(o, [])
            ), f"{g.name}: output {o} is read only inside the group"
        for x in g.inputs:
            assert x not in produced, f"{g.name}: input {x} is produced inside the group"


def test_group_readers_are_the_groups_and_nodes_outside_that_read_each_output(cls_model):
    _, model, units = cls_model
    idx = GraphIndex.build(model)
    position = {n.name: i for i, n in enumerate(model.graph.node)}
    groups = group_units(units, 12)
    group_at = {position[n]: g.name for g in groups for n in g.nodes}
    for g in groups:
        assert len(g.readers) == len(g.outputs)
        for o, readers in zip(g.outputs, g.readers, strict=True):
            want = {group_at.get(r, "") for r in idx.consumers.get(o, [])} - {g.name}
            if o in idx.graph_outputs:
                want.add("")
            assert set(readers) == want, f"{g.name}: readers of {o}"
    # A member built by hand, with no readers, keeps all its outputs.
    bare = [Unit(**{**u.__dict__, "readers": ()}) for u in units]
    for g, h in zip(group_units(units, 12), group_units(bare, 12), strict=True):
        assert set(g.outputs) <= set(h.outputs)
        assert h.inputs == g.inputs


def test_names_are_stable(cls_model):
    path, _, units = cls_model
    first = [g.name for g in group_units(units, 12)]
    assert [g.name for g in group_units(units, 12)] == first
    # A fresh load of the same file (as a resumed search or another worker does).
    again = find_units(sanitize(load_model(path)))
    assert [g.name for g in group_units(again, 12)] == first
    assert group_units(again, 12) == group_units(units, 12)


def test_enough_room_changes_nothing(cls_model):
    _, _, units = cls_model
    assert group_units(units, len(units)) == units
    assert group_units(units, len(units) + 50) == units
    with pytest.raises(ValueError, match="at least 1"):
        group_units(units, 0)
