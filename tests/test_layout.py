"""scripts/layout_workflows.py's layout (pure: no browser): columns by data flow, no overlap, technique groups that hold
their nodes and a note and no other node, stable when run again. The browser test checks the shipped files in the
page on both frontends (hand-made layouts pass there too if they do not overlap)."""
from __future__ import annotations

from scripts import browser as B
from scripts.layout_workflows import TECHNIQUES, TITLE_H, columns, layout

INFO = {"Load": {"category": "loaders"}, "Enc": {"category": "personalize/BootPIG"},
        "Patch": {"category": "personalize/BootPIG"}, "Guide": {"category": "personalize/PickAndDraw"},
        "Sampler": {"category": "sampling"}, "Save": {"category": "image"}, "Latent": {"category": "latent"}}


def node(i, t, y=0):
    return {"id": i, "type": t, "pos": [0, y], "size": [200, 100], "inputs": [], "outputs": [], "mode": 0,
            "widgets_values": []}


def graph():
    nodes = [node(1, "Load"), node(2, "Enc"), node(3, "Patch"), node(4, "Guide"), node(5, "Latent"),
             node(6, "Sampler"), node(7, "Save"), {**node(8, "MarkdownNote"), "size": [900, 200]}]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 1, "REF"], [3, 1, 0, 3, 0, "MODEL"], [4, 3, 0, 4, 0, "MODEL"],
             [5, 4, 0, 6, 0, "MODEL"], [6, 5, 0, 6, 3, "LATENT"], [7, 6, 0, 7, 0, "IMAGE"]]
    return {"last_node_id": 8, "last_link_id": 7, "nodes": nodes, "links": links, "groups": []}


def boxes(data):
    return [{"id": n["id"], "type": n["type"], "title": n.get("title"),
             "box": [n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H]} for n in data["nodes"]]


def test_columns_follow_the_data_and_sources_sit_next_to_their_consumer():
    col = columns(graph())
    assert col[1] == 0 and col[2] == 1 and col[3] == 2 and col[4] == 3 and col[6] == 4 and col[7] == 5
    assert col[5] == 3  # the empty latent just left of the sampler, not in column 0


def test_layout_has_no_overlap_links_left_to_right_and_groups_per_technique():
    sizes = {1: [250, 120], 2: [300, 400], 3: [260, 300], 4: [320, 500], 6: [270, 262]}
    out = layout(graph(), sizes, INFO)
    nb = boxes(out)
    assert not B.overlaps(nb), B.overlaps(nb)
    by_id = {n["id"]: n for n in nb}
    for link in out["links"]:
        a, b = by_id[link[1]]["box"], by_id[link[3]]["box"]
        assert a[0] + a[2] <= b[0]
    assert by_id[2]["box"][2] == 300 and by_id[2]["box"][3] == 400 + TITLE_H  # measured sizes are used
    titles = {g["title"]: g["bounding"] for g in out["groups"]}
    assert set(titles) == {"BootPIG", "Pick-and-Draw"}
    for g, members in (("BootPIG", {2, 3}), ("Pick-and-Draw", {4})):
        inside = {n["id"] for n in nb if B.contains(titles[g], n["box"])}
        notes = [n for n in out["nodes"] if n["id"] in inside and n["type"] == "Note"]
        assert inside - {n["id"] for n in notes} == members
        assert len(notes) == 1 and notes[0]["widgets_values"][0] == \
            next(v[2] for v in TECHNIQUES.values() if v[0] == g)
        for n in nb:
            if n["id"] not in inside:
                assert not B.intersects(titles[g], n["box"]), (g, n)
    assert not B.intersects(titles["BootPIG"], titles["Pick-and-Draw"])
    assert out["last_node_id"] == max(n["id"] for n in out["nodes"])


def test_layout_is_stable_when_run_again():
    once = layout(graph(), {}, INFO)
    assert layout(once, {}, INFO) == once

