"""rationale_train.data: schema, MaRio formatting, loaders (fixtures + real shared data), synthetic
task and its step verifier."""

import json
from collections import Counter
from pathlib import Path

import pytest
from rationale_train import data as D
from rationale_train.data import Example

FIX = Path(__file__).parent / "fixtures" / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ---------------------------------------------------------------- schema / JSONL


def test_jsonl_round_trip(tmp_path):
    exs = [
        Example("a", "Q? (A) x (B) y", ["x", "y"], "(A)", "because x", {"qid": "q1", "k": [1, 2]}),
        Example("b", "Is it? ünïcode", None, "yes", None, {}),
    ]
    p = tmp_path / "sub" / "out.jsonl"
    D.write_jsonl(p, exs)
    assert D.read_jsonl(p) == exs
    assert [f.name for f in p.parent.iterdir()] == ["out.jsonl"]  # no temp file left
    assert "ünïcode" in p.read_text(encoding="utf-8")
    # overwrite; a failing write leaves the old file intact and no temp behind
    D.write_jsonl(p, exs[:1])
    assert D.read_jsonl(p) == exs[:1]

    def boom():
        yield exs[1]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        D.write_jsonl(p, boom())
    assert D.read_jsonl(p) == exs[:1]
    assert [f.name for f in p.parent.iterdir()] == ["out.jsonl"]


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": "1", "question": "q", "answer": "a"}\n\n{"id": "2", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3.*answer"):
        D.read_jsonl(p)
    p.write_text('{"id": "1", "question": "q", "answer": "a", "extra": 1}\n')
    with pytest.raises(ValueError, match="unknown field"):
        D.read_jsonl(p)
    p.write_text('{"id": 3, "question": "q", "answer": "a"}\n')
    (ex,) = D.read_jsonl(p)
    assert ex == Example("3", "q", None, "a", None, {})


# ---------------------------------------------------------------- formatting


def test_format_and_parse_target():
    t = D.format_target("3 + 4 = 7.", "(B)")
    assert t == "3 + 4 = 7. So the answer is (B)."
    assert D.parse_target(t) == ("3 + 4 = 7.", "(B)")
    assert D.format_target(None, "yes") == "So the answer is yes."
    assert D.parse_target("So the answer is yes.") == ("", "yes")
    assert D.format_target("r", "5.") == "r So the answer is 5."
    for rat, ans in [("A. B.", "no"), ("x = 3.5", "3.5"), ("", "(a)"), ("multi\nline", "1000")]:
        assert D.parse_target(D.format_target(rat, ans)) == (rat, ans)
    assert D.parse_target("no marker here.") == ("no marker here.", None)
    # the last marker wins; newline ends the answer; a missing final "." is fine
    assert D.parse_target("So the answer is 1. So the answer is 2.") == ("So the answer is 1.", "2")
    assert D.parse_target("r. So the answer is (C).\nMore text") == ("r.", "(C)")
    assert D.parse_target("r. So the answer is (C)") == ("r.", "(C)")


def test_format_input_and_example_target():
    ex = Example("1", "Q? (A) x (B) y", ["x", "y"], "(A)", "r.", {})
    assert D.format_input(ex) == "Q? (A) x (B) y"
    ex2 = Example("2", "Pick one:", ["red", "blue"], "(B)", None, {})
    assert D.format_input(ex2) == "Pick one: (A) red (B) blue"
    assert D.format_example_target(ex) == "r. So the answer is (A)."
    ex.meta["silver_answer"] = "(B)"
    assert D.format_example_target(ex) == "r. So the answer is (B)."


def test_split_choices():
    assert D.split_choices("Q? (A) x (B) y") == ("Q?", ["x", "y"])
    assert D.split_choices("likely a(n) (a) prey (b) predator") == (
        "likely a(n)",
        ["prey", "predator"],
    )
    assert D.split_choices("face off? (A) Batman(B) Superman") == (
        "face off?",
        ["Batman", "Superman"],
    )
    assert D.split_choices("loudest?(A)next to it(B)side road") == (
        "loudest?",
        ["next to it", "side road"],
    )
    assert D.split_choices("No choices here (A) only one") == ("No choices here (A) only one", None)
    assert D.split_choices("(B) then (C) no A") == ("(B) then (C) no A", None)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("(A)", "a"),
        ("(a)", "a"),
        ("a", "a"),
        (" A. ", "a"),
        ("((B))", "b"),
        ("[c]", "c"),
        ("Yes.", "yes"),
        ("'no'", "no"),
        ("  Deep   sea ", "deep sea"),
        ("1,000", "1000"),
        ("$5.00", "5"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("3.5.", "3.5"),
        ("-3", "-3"),
        ("+7", "7"),
        ("-0", "0"),
        ("1,2", "1,2"),
        ("(a) or (b)", "(a) or (b)"),
        ("(B) Earth", "(b) earth"),
    ],
)
def test_normalize_answer(raw, norm):
    assert D.normalize_answer(raw) == norm


def test_answer_matches():
    ch = ["Pluto", "Earth"]
    assert D.answer_matches("b", "(B)")
    assert D.answer_matches("1,500", "1500")
    assert D.answer_matches("Earth", "(B)", ch)
    assert D.answer_matches("(B) Earth", "(B)", ch)
    assert D.answer_matches("(b)", "Earth", ch)
    assert not D.answer_matches("Pluto", "(B)", ch)
    assert not D.answer_matches("Earth", "(B)")  # no choices: no mapping
    assert not D.answer_matches("(C)", "(B)", ch)
    assert not D.answer_matches(None, "(B)", ch)


# ---------------------------------------------------------------- loaders on fixtures


def test_mario_fixtures():
    sqa = D.load_dataset("strategyqa", "train", root=FIX)
    assert [e.id for e in sqa] == ["strategyqa-train-0", "strategyqa-train-1", "strategyqa-train-2"]
    assert sqa[0].meta["qid"] == sqa[1].meta["qid"] != sqa[2].meta["qid"]
    assert sqa[0].rationale != sqa[1].rationale and sqa[0].choices is None
    assert (sqa[0].answer, sqa[2].answer) == ("no", "yes")
    assert (
        D.load_mario("strategyqa", "validation", FIX / "mario")[0].rationale
        == "Ice is frozen water."
    )

    qr = D.load_dataset("quarel", "train", root=FIX)
    assert qr[0].choices == ["a sled", "a rock"] and qr[0].meta["answer_text"] == "a sled"
    assert qr[2].choices == ["Batman", "Superman"] and qr[2].answer == "(B)"
    assert qr[0].question == "Which is faster on ice? (A) a sled (B) a rock"  # verbatim
    (qd,) = D.load_dataset("quarel", "dev", root=FIX)
    assert qd.rationale is None and qd.choices == ["next to the site", "side road"]

    ob = D.load_dataset("openbookqa", "dev", root=FIX)
    assert ob == D.load_dataset("obqa", "dev", root=FIX)
    assert ob[0].choices == ["prey", "predator", "herbivore", "canary"]
    assert ob[0].answer == "(b)" and ob[0].meta["answer_text"] == "predator"
    assert ob[0].meta["dataset"] == "openbookqa" and ob[0].meta["split"] == "dev"

    ns = D.load_dataset("numersense", "train", root=FIX)
    assert len(ns[0].choices) == 12 and ns[0].meta["answer_text"] == "four"
    assert D.format_input(ns[0]) == ns[0].question.strip()
    (qa,) = D.load_dataset("qasc", "test", root=FIX)
    assert len(qa.choices) == 8 and qa.meta["answer_text"] == "sunlight"


def test_gsm8k_fixture():
    tr = D.load_dataset("gsm8k", "train", root=FIX)
    assert [e.answer for e in tr] == ["7", "1500"]
    assert tr[0].rationale == "Ann has 3 + 4 = 7 pens."
    assert tr[0].meta["calculations"] == ["3+4=7"] and tr[0].choices is None
    raw = D.load_gsm8k("train", FIX / "gsm8k", keep_calculator=True)
    assert raw[0].rationale == "Ann has 3 + 4 = <<3+4=7>>7 pens."
    (te,) = D.load_dataset("gsm8k", "test", root=FIX / "gsm8k")
    assert te.answer == "8" and te.id == "gsm8k-test-0"


def test_commonsenseqa_fixture():
    tr = D.load_dataset("commonsenseqa", "train", root=FIX)
    assert tr[1].choices == ["spoon", "pen", "shoe", "rock", "hat"]
    assert tr[1].answer == "(B)" and tr[1].meta["answer_text"] == "pen"
    assert (
        tr[1].question == "What do people use to write? (A) spoon (B) pen (C) shoe (D) rock (E) hat"
    )
    assert (
        tr[1].meta["stem"] == "What do people use to write?"
        and tr[1].meta["source_id"] == "csqa0002"
    )
    assert D.load_dataset("csqa", "dev", root=FIX)[0].answer == "(C)"
    (te,) = D.load_dataset("commonsenseqa", "test", root=FIX)
    assert te.answer == "" and "answer_text" not in te.meta


def test_piqa_fixture():
    va = D.load_dataset("piqa", "dev", root=FIX)  # valid.jsonl + valid-labels.lst
    assert [e.answer for e in va] == ["(A)", "(B)"]
    assert va[1].choices == ["wash them again.", "use a towel."]
    assert va[1].question == "To dry wet hands, (A) wash them again. (B) use a towel."
    (tr,) = D.load_dataset("piqa", "train", root=FIX)  # one jsonl with "label"
    assert tr.answer == "(A)" and tr.meta["answer_text"] == "use scissors."
    (te,) = D.load_dataset("piqa", "test", root=FIX)
    assert te.answer == ""


def test_winogrande_fixture():
    tr = D.load_dataset("winogrande", "train", root=FIX)
    assert [e.answer for e in tr] == ["(A)", "(B)"] and tr[1].meta["answer_text"] == "case"
    assert tr[0].meta["stem"].endswith("the _ was too big.")
    assert D.load_dataset("winogrande", "dev", root=FIX)[0].answer == "(A)"
    assert D.load_dataset("winogrande", "test", root=FIX)[0].answer == ""
    with pytest.raises(FileNotFoundError, match="train_xs.jsonl"):
        D.load_winogrande("train", FIX, size="xs")


def test_hellaswag_fixture():
    va = D.load_dataset("hellaswag", "validation", root=FIX)
    assert [e.answer for e in va] == ["(A)", "(B)"]
    assert va[0].meta["stem"] == "A man cracks eggs into a bowl. he" and len(va[0].choices) == 4
    assert va[1].meta["answer_text"] == "waits for the toast."
    assert D.load_dataset("hellaswag", "test", root=FIX)[0].answer == ""


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*synthetic"):
        D.load_dataset("nope", "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        D.load_dataset("gsm8k", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no train split"):
        D.load_dataset("qasc", "train", root=tmp_path)
    with pytest.raises(ValueError, match="unknown MaRio"):
        D.load_mario("nope", "train", tmp_path)
    with pytest.raises(ValueError, match="splits"):
        D.load_dataset("synthetic", "other")
    bad = tmp_path / "piqa"
    bad.mkdir()
    (bad / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (bad / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        D.load_piqa("dev", tmp_path)


# ---------------------------------------------------------------- synthetic task


def test_synthetic_deterministic():
    a = D.synthetic_task(200, seed=3)
    b = D.synthetic_task(200, seed=3)
    c = D.synthetic_task(200, seed=4)
    assert a == b
    assert [e.question for e in a] != [e.question for e in c]
    assert len({e.question for e in a}) == 200


def test_synthetic_examples_consistent():
    exs = D.synthetic_task(1000, seed=0, flawed_fraction=0.3)
    flaws = Counter(e.meta["flaw"] for e in exs)
    assert flaws[None] == 700 and abs(flaws["wrong_step"] - 150) < 50
    for e in exs:
        steps = [tuple(s) for s in e.meta["steps"]]
        assert 2 <= len(steps) <= 3
        assert D.parse_synthetic_question(e.question) == steps
        assert all(1 <= s[3] <= 99 for s in steps)
        # gold answer is one of the choices and is the true value
        assert len(e.choices) == 4 and len(set(e.choices)) == 4
        assert e.answer in ("(A)", "(B)", "(C)", "(D)")
        assert e.choices[ord(e.answer[1]) - 65] == str(e.meta["answer_value"]) == str(steps[-1][3])
        assert D.split_choices(e.question) == (e.meta["stem"], e.choices)
        v = D.verify_steps(e.question, e.rationale)
        assert v == D.verify_steps(e, e.rationale)
        _, stated = D.parse_target(D.format_example_target(e))
        if e.meta["flaw"] is None:
            assert v == 1.0 and stated == e.answer
        elif e.meta["flaw"] == "wrong_step":
            assert v == e.meta["flaw_step"] / len(steps) and stated == e.answer
        else:
            assert v == 1.0 and stated == e.meta["silver_answer"] != e.answer
            assert stated in ("(A)", "(B)", "(C)", "(D)")
    for frac in (0.0, 0.1, 1.0):
        n_flawed = sum(e.meta["flaw"] is not None for e in D.synthetic_task(100, 1, frac))
        assert n_flawed == round(100 * frac)


def test_synthetic_options():
    free = D.synthetic_task(20, seed=1, num_choices=0, flawed_fraction=0.5)
    for e in free:
        assert e.choices is None and e.answer == str(e.meta["answer_value"])
        assert D.format_input(e) == e.question
        if e.meta["flaw"] == "wrong_answer":
            assert e.meta["silver_answer"] != e.answer
    val = D.synthetic_task(20, seed=1, answer_style="value", num_choices=3, ops="+-")
    for e in val:
        assert e.answer in e.choices and len(e.choices) == 3
        assert all(s[1] in "+-" for s in e.meta["steps"])
    one = D.synthetic_task(5, seed=2, min_steps=1, max_steps=1, flawed_fraction=0)
    assert all(len(e.meta["steps"]) == 1 for e in one)
    with pytest.raises(ValueError, match="flawed_fraction"):
        D.synthetic_task(5, flawed_fraction=1.5)
    with pytest.raises(ValueError, match="ops"):
        D.synthetic_task(5, ops="/")


def test_synthetic_splits():
    sp = D.synthetic_splits(seed=5, n_train=300, n_dev=50, n_test=40)
    assert {k: len(v) for k, v in sp.items()} == {"train": 300, "dev": 50, "test": 40}
    stems = {k: {e.meta["stem"] for e in v} for k, v in sp.items()}
    assert not (stems["train"] & stems["dev"] or stems["train"] & stems["test"])
    assert not stems["dev"] & stems["test"]
    assert sum(e.meta["flaw"] is not None for e in sp["train"]) == 90
    assert all(e.meta["flaw"] is None for e in sp["dev"] + sp["test"])
    assert sp["dev"][0].id == "synthetic-dev-0" and sp["dev"][0].meta["split"] == "dev"
    assert sp == D.synthetic_splits(seed=5, n_train=300, n_dev=50, n_test=40)
    dev = D.load_dataset("synthetic", "validation", seed=5, n_train=300, n_dev=50, n_test=40)
    assert dev == sp["dev"]
    assert len(D.load_dataset()) == 2000


Q = "Tom has 3 apples. He buys 4 more. He gives away 2. How many apples does he have now?"
QM = "Mia has 3 pens. She doubles them. She loses 1. How many pens does she have now? (A) 5 (B) 6"


@pytest.mark.parametrize(
    "question, rationale, score",
    [
        (Q, "3 + 4 = 7. 7 - 2 = 5.", 1.0),
        (Q, "First, 3 + 4 = 7 apples. Then 7 - 2 = 5 apples.", 1.0),
        (Q, "4 + 3 = 7. 7 - 2 = 5.", 1.0),  # + commutes
        (Q, "3 + 4 = 7. 7 - 2 = 6.", 0.5),  # last step wrong
        (Q, "3 + 4 = 8. 8 - 2 = 6.", 0.0),  # wrong step; next uses a wrong value
        (Q, "3 + 4 = 8. 7 - 2 = 5.", 0.5),  # wrong step, next one from the true value
        (Q, "3 + 4 = 7.", 0.5),  # missing step
        (Q, "3 + 4 = 7. 7 - 2 = 5. 5 + 1 = 6.", 2 / 3),  # extra step
        (Q, "3 - 4 = -1. -1 - 2 = -3.", 0.0),  # wrong operations
        (Q, "2 - 7 = -5. 3 + 4 = 7.", 0.0),  # wrong order
        (Q, "The answer is five.", 0.0),
        (Q, "", 0.0),
        (QM, "3 * 2 = 6. 6 - 1 = 5.", 1.0),
        (QM, "2 x 3 = 6. 6 - 1 = 5.", 1.0),  # * commutes, "x" accepted
        (QM, "3 + 3 = 6. 6 - 1 = 5.", 0.5),  # right value, wrong operation
    ],
)
def test_verify_steps(question, rationale, score):
    assert D.verify_steps(question, rationale) == pytest.approx(score, abs=0)


def test_verify_steps_rejects_other_questions():
    with pytest.raises(ValueError, match="not a synthetic"):
        D.verify_steps("Is water wet?", "1 + 1 = 2.")
    with pytest.raises(ValueError, match="not a synthetic step"):
        D.verify_steps("Tom has 3 apples. He eats 2. How many apples does he have now?", "")


# ---------------------------------------------------------------- real shared data


MARIO_COUNTS = {  # /work/shared/data/mario/README.md: rows (questions)
    ("strategyqa", "train"): (5492, 1385),
    ("strategyqa", "dev"): (184, 184),
    ("strategyqa", "test"): (458, 458),
    ("quarel", "train"): (8203, 1757),
    ("quarel", "dev"): (278, 278),
    ("quarel", "test"): (552, 552),
    ("numersense", "train"): (4459, 4459),
    ("numersense", "dev"): (488, 488),
    ("numersense", "test"): (199, 199),
    ("openbookqa", "dev"): (499, 499),
    ("openbookqa", "test"): (498, 498),
    ("qasc", "dev"): (900, 900),
    ("qasc", "test"): (926, 926),
}
N_CHOICES = {"quarel": 2, "numersense": 12, "openbookqa": 4, "qasc": 8}


@pytest.mark.skipif(not (SHARED / "mario").is_dir(), reason="no shared data folder")
def test_real_mario_data():
    for (name, split), (rows, questions) in MARIO_COUNTS.items():
        exs = D.load_dataset(name, split, root=SHARED)
        assert len(exs) == rows, (name, split)
        assert len({e.meta["qid"] for e in exs}) == questions, (name, split)
        assert len({e.id for e in exs}) == rows
        with_rat = sum(e.rationale is not None for e in exs)
        if split == "train" or name == "strategyqa":
            assert with_rat == rows, (name, split)
        else:
            assert with_rat == 0, (name, split)
        if name == "strategyqa":
            assert {e.answer for e in exs} == {"yes", "no"}
            assert all(e.choices is None for e in exs)
        else:
            assert all(len(e.choices) == N_CHOICES[name] for e in exs), (name, split)
            assert all(e.meta["answer_text"] in e.choices for e in exs)
    for name in ("openbookqa", "qasc"):
        with pytest.raises(FileNotFoundError):
            D.load_dataset(name, "train", root=SHARED)


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason="no shared data folder")
def test_real_gsm8k_data():
    for split, rows in (("train", 7473), ("test", 1319)):
        exs = D.load_dataset("gsm8k", split, root=SHARED)
        assert len(exs) == rows
        assert all(e.answer.lstrip("-").replace(".", "").isdigit() for e in exs)
        assert all(
            e.rationale and "<<" not in e.rationale and "####" not in e.rationale for e in exs
        )
    first = json.loads((SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    (tr0,) = D.load_gsm8k("train", SHARED / "gsm8k")[:1]
    assert tr0.question == first["question"].strip() and tr0.answer == first["answer"][-2:]
    assert tr0.meta["calculations"][0] in first["answer"]
