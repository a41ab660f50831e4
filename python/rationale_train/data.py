"""Data layer: one example schema, MaRio formatting, dataset loaders and the synthetic task.

Stdlib only. Everything returns ``list[Example]``.

Schema (:class:`Example`, one JSON object per line in JSONL files):

- ``id``: unique within a split (``"<dataset>-<split>-<index>"`` for the loaders here).
- ``question``: the model input *as text*, choices inline (``"... (A) Pluto (B) Earth"``). MaRio's
  files already have them inline and are kept verbatim; the COLLATE loaders build the same form
  (stem + ``" (A) ... (B) ..."``) and keep the bare stem in ``meta["stem"]``.
- ``choices``: the choice texts in label order, or ``None`` for free-form answers.
- ``answer``: the gold answer as the target states it: ``"yes"``/``"no"``, a choice label
  ``"(A)"`` (``"(a)"`` for OpenBookQA, as released), or a number (GSM8K, commas removed). ``""`` for
  rows that ship without labels (official test files of CommonsenseQA, PIQA, WinoGrande, HellaSwag).
- ``rationale``: the silver rationale, ``None`` when there is none (MaRio's ``"dummy"``).
- ``meta``: free-form; the loaders set ``dataset``, ``split``, ``index``, ``qid`` (equal for rows of
  the same question: StrategyQA / QuaRel train carry several silver rationales per question, each
  kept as its own row) and, for choice answers, ``answer_text``.

MaRio format: input = the question (choices inline); target = rationale + ``" So the answer is "`` +
answer + ``"."`` (:func:`format_input`, :func:`format_target`, :func:`parse_target`).

Answers are compared with :func:`normalize_answer` / :func:`answer_matches`; see their docstrings.

The synthetic task (:func:`synthetic_task`, :func:`synthetic_splits`, the default of
:func:`load_dataset`) is short arithmetic word problems whose silver rationales are explicit
equations (``"3 + 4 = 7. 7 - 2 = 5."``) that :func:`verify_steps` checks step by step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

__all__ = [
    "ANSWER_MARKER",
    "Example",
    "read_jsonl",
    "write_jsonl",
    "format_input",
    "format_target",
    "format_example_target",
    "parse_target",
    "normalize_answer",
    "answer_matches",
    "split_choices",
    "inline_choices",
    "choice_label",
    "MARIO_DATASETS",
    "COLLATE_DATASETS",
    "load_mario",
    "load_gsm8k",
    "load_commonsenseqa",
    "load_piqa",
    "load_winogrande",
    "load_hellaswag",
    "synthetic_task",
    "synthetic_splits",
    "parse_synthetic_question",
    "verify_steps",
    "load_dataset",
    "default_data_root",
]

PathLike = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------
# Schema and JSONL
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Example:
    """One example; see the module docstring for what each field holds."""

    id: str
    question: str
    choices: list[str] | None
    answer: str
    rationale: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Example:
        """Build from a dict; ``id``, ``question`` and ``answer`` are required, the rest optional
        (``choices``/``rationale`` default to ``None``, ``meta`` to ``{}``); unknown keys raise."""
        if not isinstance(d, dict):
            raise TypeError(f"an example must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("id", "question", "answer") if k not in d]
        if missing:
            raise ValueError(f"example is missing field(s) {missing}: {str(d)[:200]}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"example has unknown field(s) {unknown} (known: {sorted(known)})")
        choices = d.get("choices")
        return cls(
            id=str(d["id"]),
            question=d["question"],
            choices=None if choices is None else list(choices),
            answer=d["answer"],
            rationale=d.get("rationale"),
            meta=dict(d.get("meta") or {}),
        )


def read_jsonl(path: PathLike) -> list[Example]:
    """Read examples written by :func:`write_jsonl` (JSON object per line; blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Example.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
    return out


def write_jsonl(path: PathLike, examples: Iterable[Example]) -> None:
    """Write examples as JSONL atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                d = ex.to_dict() if isinstance(ex, Example) else Example.from_dict(ex).to_dict()
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------
# MaRio formatting and answer comparison
# --------------------------------------------------------------------------------------------

ANSWER_MARKER = " So the answer is "
_MARKER_CORE = ANSWER_MARKER.strip() + " "  # "So the answer is " (found with or without the space)


def choice_label(i: int, lower: bool = False) -> str:
    """``0 -> "(A)"``, ``1 -> "(B)"``, ... (``"(a)"`` with ``lower=True``)."""
    if not 0 <= i < 26:
        raise ValueError(f"choice index {i} out of range [0, 26)")
    c = chr(ord("a" if lower else "A") + i)
    return f"({c})"


def inline_choices(stem: str, choices: Sequence[str], lower: bool = False) -> str:
    """``stem + " (A) c0 (B) c1 ..."`` (MaRio's inline form)."""
    parts = [stem.strip()] + [
        f"{choice_label(i, lower)} {c.strip()}" for i, c in enumerate(choices)
    ]
    return " ".join(parts)


_CHOICE_MARK = re.compile(r"\(([A-Za-z])\)")


def split_choices(text: str) -> tuple[str, list[str] | None]:
    """Split inline choices off a question: ``"Q? (A) x (B) y"`` -> ``("Q?", ["x", "y"])``.

    Finds the last run of markers ``(A) (B) ...`` (or ``(a) (b) ...``) that starts at A and ends at
    the last marker in the text, walking back from it (so the ``"(n)"`` of ``"a(n) (a) x (b) y"``
    is text; markers need no surrounding spaces: ``"Batman(B) Superman"``). Markers that break the
    sequence are treated as text. Returns
    ``(text.strip(), None)`` when there are fewer than two markers in sequence.
    """
    marks = list(_CHOICE_MARK.finditer(text))
    if len(marks) < 2:
        return text.strip(), None
    last = marks[-1]
    seq = [last]
    expect = chr(ord(last.group(1)) - 1)
    for m in reversed(marks[:-1]):
        if seq[-1].group(1) in "aA":
            break
        if m.group(1) == expect:
            seq.append(m)
            expect = chr(ord(expect) - 1)
    seq.reverse()
    if len(seq) < 2 or seq[0].group(1) not in "aA":
        return text.strip(), None
    choices = []
    for m, nxt in zip(seq, seq[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        choices.append(text[m.end() : end].strip())
    return text[: seq[0].start()].strip(), choices


def format_input(ex: Example) -> str:
    """The model input: the question as stored (choices inline). If ``ex.choices`` is set but the
    question does not carry them inline, they are appended as ``" (A) ... (B) ..."``."""
    q = ex.question.strip()
    if ex.choices:
        _, inline = split_choices(q)
        if inline is None or len(inline) != len(ex.choices):
            q = inline_choices(q, ex.choices)
    return q


def format_target(rationale: str | None, answer: str) -> str:
    """``rationale + " So the answer is " + answer + "."``; without a rationale,
    ``"So the answer is <answer>."``. A trailing ``"."`` on ``answer`` is not doubled."""
    answer = answer.strip()
    tail = answer if answer.endswith(".") else answer + "."
    r = (rationale or "").strip()
    if not r:
        return _MARKER_CORE + tail
    return r + ANSWER_MARKER + tail


def format_example_target(ex: Example) -> str:
    """The SFT target of an example: its silver rationale and the answer the silver target states,
    ``meta["silver_answer"]`` when set (synthetic "wrong_answer" flaws), else the gold answer."""
    return format_target(ex.rationale, ex.meta.get("silver_answer", ex.answer))


def parse_target(text: str) -> tuple[str, str | None]:
    """Inverse of :func:`format_target`: ``(rationale, answer)``.

    The answer is the text after the *last* ``"So the answer is "``, cut at the first newline,
    stripped, with one final ``"."`` removed (so ``"3.5."`` gives ``"3.5"``). The rationale is the
    text before that marker, stripped. Without the marker: ``(text.strip(), None)``.
    """
    i = text.rfind(_MARKER_CORE)
    if i < 0:
        return text.strip(), None
    ans = text[i + len(_MARKER_CORE) :].split("\n", 1)[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].rstrip()
    return text[:i].strip(), ans


_NUM = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?%?")
_EDGE_PUNCT = ".,;:!?\"'`"
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def normalize_answer(s: str) -> str:
    """Canonical form of an answer string, for comparing answers.

    - lowercased, whitespace stripped and collapsed;
    - repeatedly: trailing sentence punctuation (``. , ; : ! ?``) and surrounding quotes are
      removed, and one pair of *enclosing* brackets ``() [] {} <>`` is removed;
    - numbers lose thousands separators, a ``$``, a leading ``+`` and trailing decimal zeros
      (``"$1,000.50"`` -> ``"1000.5"``, ``"5.0"`` -> ``"5"``, ``"-3"`` stays ``"-3"``).

    So ``"(A)" == "(a)" == "a" == " A. "`` all give ``"a"`` and ``"Yes."`` gives ``"yes"``: choice
    answers compare by their letter. A choice *text* is not mapped to its letter here (that needs
    the choices): use :func:`answer_matches` for that.
    """
    s = " ".join(str(s).lower().split())
    while True:
        prev = s
        s = s.rstrip(_EDGE_PUNCT).lstrip("\"'`").strip()
        if len(s) >= 2 and s[0] in _BRACKETS and s[-1] == _BRACKETS[s[0]]:
            inner = s[1:-1]
            # only when the pair encloses everything: "(a) or (b)" keeps its brackets
            depth, ok = 0, True
            for ch in inner:
                depth += (ch == s[0]) - (ch == s[-1])
                if depth < 0:
                    ok = False
                    break
            if ok:
                s = inner.strip()
        if s == prev:
            break
    if s and _NUM.fullmatch(s) and any(c.isdigit() for c in s):
        t = s.replace(",", "").replace("$", "").lstrip("+")
        pct = t.endswith("%")
        t = t.rstrip("%")
        if "." in t:
            t = t.rstrip("0").rstrip(".")
        if t in ("", "-"):
            t = "0"
        if t.startswith("-") and t.strip("-0.") == "":
            t = "0"
        if t.startswith("."):
            t = "0" + t
        s = t + ("%" if pct else "")
    return s


_LEAD_LABEL = re.compile(r"^\(?([a-z])\)(?:\s|$)")


def _choice_index(s: str, choices: Sequence[str] | None) -> int | None:
    n = normalize_answer(s)
    if not choices:
        return None
    if len(n) == 1 and "a" <= n <= "z" and ord(n) - ord("a") < len(choices):
        return ord(n) - ord("a")
    m = _LEAD_LABEL.match(" ".join(str(s).lower().split()))
    if m and ord(m.group(1)) - ord("a") < len(choices):
        return ord(m.group(1)) - ord("a")
    norm_choices = [normalize_answer(c) for c in choices]
    if n in norm_choices and norm_choices.count(n) == 1:
        return norm_choices.index(n)
    return None


def answer_matches(pred: str | None, gold: str, choices: Sequence[str] | None = None) -> bool:
    """Whether a predicted answer equals the gold one.

    Equal after :func:`normalize_answer`; or, when ``choices`` are given, both resolve to the same
    choice: a label (``"(B)"``, ``"b"``, ``"(B) Earth"``) or a choice's text (``"Earth"``).
    ``pred=None`` (no answer parsed) never matches.
    """
    if pred is None:
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    if choices:
        i, j = _choice_index(pred, choices), _choice_index(gold, choices)
        return i is not None and i == j
    return False


# --------------------------------------------------------------------------------------------
# MaRio release loaders
# --------------------------------------------------------------------------------------------

# name -> folder in the release
MARIO_DATASETS = {
    "strategyqa": "strategyqa",
    "quarel": "quarel",
    "openbookqa": "obqa",
    "numersense": "numersense",
    "qasc": "qasc",
}
_MARIO_ALIASES = {"obqa": "openbookqa"}
_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "valid": "dev"}


def _split_name(split: str) -> str:
    split = split.lower()
    return _SPLIT_ALIASES.get(split, split)


def _mario_name(dataset: str) -> str:
    d = dataset.lower()
    d = _MARIO_ALIASES.get(d, d)
    if d not in MARIO_DATASETS:
        raise ValueError(f"unknown MaRio dataset {dataset!r}; known: {sorted(MARIO_DATASETS)}")
    return d


def load_mario(dataset: str, split: str, root: PathLike | None = None) -> list[Example]:
    """Load one split of the MaRio release (``<root>/<folder>/<split>.jsonl``).

    ``root`` is the folder holding the dataset folders (``strategyqa/``, ``obqa/``, ...), or a data
    root holding ``mario/``; default: :func:`default_data_root` ``/ "mario"``. Each file is one JSON
    object mapping index -> ``{"question", "rationale", "answer"}``; rows come back in index order.
    The question is kept verbatim (choices inline) and ``choices`` is parsed from it; ``"dummy"``
    rationales become ``None``; rows with the same question get the same ``meta["qid"]``.
    """
    name = _mario_name(dataset)
    split = _split_name(split)
    folder = MARIO_DATASETS[name]
    roots = [Path(root)] if root is not None else _default_roots()
    tried = []
    path = None
    for r in roots:
        for cand in (r / folder / f"{split}.jsonl", r / "mario" / folder / f"{split}.jsonl"):
            tried.append(str(cand))
            if cand.is_file():
                path = cand
                break
        if path is not None:
            break
    if path is None:
        hint = (
            " (the MaRio release has no train split for it)"
            if split == "train"
            and name
            in (
                "openbookqa",
                "qasc",
            )
            else ""
        )
        raise FileNotFoundError(
            f"MaRio {name}/{split}: no file found{hint}; looked at: {', '.join(tried)}"
        )
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected one JSON object mapping index -> row")
    keys = sorted(data, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))
    qids: dict[str, str] = {}
    out = []
    for k in keys:
        row = data[k]
        q = row["question"]
        rat = row.get("rationale")
        if rat is not None and (rat.strip() == "" or rat.strip().lower() == "dummy"):
            rat = None
        ans = str(row["answer"]).strip()
        _, choices = split_choices(q)
        qid = qids.setdefault(q, f"{name}-{split}-q{len(qids)}")
        meta: dict[str, Any] = {"dataset": name, "split": split, "index": k, "qid": qid}
        if choices is not None:
            i = _choice_index(ans, choices)
            if i is not None:
                meta["answer_text"] = choices[i]
        out.append(Example(f"{name}-{split}-{k}", q, choices, ans, rat, meta))
    return out


# --------------------------------------------------------------------------------------------
# COLLATE loaders (official formats)
# --------------------------------------------------------------------------------------------

COLLATE_DATASETS = ("gsm8k", "commonsenseqa", "piqa", "winogrande", "hellaswag")
_COLLATE_ALIASES = {
    "csqa": "commonsenseqa",
    "commonsense_qa": "commonsenseqa",
    "hellaswag": "hellaswag",
    "wino": "winogrande",
}


def _read_json_lines(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: bad JSON: {e}") from e
    return rows


def _find_file(what: str, root: PathLike | None, dirnames: Sequence[str], names: Sequence[str]):
    """First existing ``<base>/<name>``, base in (root/<dirname>..., root) for the given root or
    each default root."""
    bases: list[Path] = []
    for r in [Path(root)] if root is not None else _default_roots():
        bases.extend(r / d for d in dirnames)
        bases.append(r)
    tried = []
    for b in bases:
        for n in names:
            p = b / n
            tried.append(str(p))
            if p.is_file():
                return p
    raise FileNotFoundError(f"{what}: no file found; looked at: {', '.join(tried)}")


_CALC = re.compile(r"<<([^<>]*)>>")


def _normalize_number(s: str) -> str:
    return s.strip().replace(",", "")


def load_gsm8k(
    split: str, root: PathLike | None = None, keep_calculator: bool = False
) -> list[Example]:
    """GSM8K (``<root>/{train,test}.jsonl``, lines ``{"question", "answer"}``).

    rationale = the solution before ``"####"`` (calculator annotations ``<<48/2=24>>`` removed
    unless ``keep_calculator``; they are kept as ``meta["calculations"]``, e.g. ``["48/2=24"]``);
    answer = the number after ``"####"`` without thousands separators. ``choices`` is ``None``.
    """
    split = _split_name(split)
    path = _find_file(f"gsm8k/{split}", root, ["gsm8k"], [f"{split}.jsonl"])
    out = []
    for i, row in enumerate(_read_json_lines(path)):
        sol = row["answer"]
        if "####" not in sol:
            raise ValueError(f"{path}: row {i} has no '#### <answer>' line")
        body, _, final = sol.rpartition("####")
        calcs = _CALC.findall(body)
        rat = body if keep_calculator else _CALC.sub("", body)
        rat = rat.strip()
        meta = {"dataset": "gsm8k", "split": split, "index": i, "qid": f"gsm8k-{split}-{i}"}
        meta["calculations"] = calcs
        out.append(
            Example(
                f"gsm8k-{split}-{i}",
                row["question"].strip(),
                None,
                _normalize_number(final),
                rat or None,
                meta,
            )
        )
    return out


def _mc_example(ds, split, i, ident, stem, choices, label_idx, extra=None) -> Example:
    answer = "" if label_idx is None else choice_label(label_idx)
    meta: dict[str, Any] = {"dataset": ds, "split": split, "index": i, "qid": f"{ds}-{split}-{i}"}
    meta["stem"] = stem
    if ident is not None:
        meta["source_id"] = ident
    if label_idx is not None:
        meta["answer_text"] = choices[label_idx]
    if extra:
        meta.update(extra)
    return Example(
        f"{ds}-{split}-{i}", inline_choices(stem, choices), list(choices), answer, None, meta
    )


def _label_to_idx(label, n: int, what: str) -> int | None:
    if label is None or label == "" or label == -1 or label == "-1":
        return None
    if isinstance(label, str) and label.strip().isalpha():
        idx = ord(label.strip().upper()) - ord("A")
    else:
        idx = int(label)
    if not 0 <= idx < n:
        raise ValueError(f"{what}: label {label!r} out of range for {n} choices")
    return idx


def load_commonsenseqa(split: str, root: PathLike | None = None) -> list[Example]:
    """CommonsenseQA, official jsonl: ``{"id", "question": {"stem", "choices": [{"label", "text"}]},
    "answerKey"}`` in ``train_rand_split.jsonl`` / ``dev_rand_split.jsonl`` /
    ``test_rand_split_no_answers.jsonl`` (or ``<split>.jsonl``). Answer ``"(A)"``..``"(E)"``."""
    split = _split_name(split)
    official = {
        "train": "train_rand_split.jsonl",
        "dev": "dev_rand_split.jsonl",
        "test": "test_rand_split_no_answers.jsonl",
    }
    names = [official[split]] if split in official else []
    names.append(f"{split}.jsonl")
    path = _find_file(f"commonsenseqa/{split}", root, ["commonsenseqa", "csqa"], names)
    out = []
    for i, row in enumerate(_read_json_lines(path)):
        q = row["question"]
        chs = sorted(q["choices"], key=lambda c: c["label"])
        labels = [c["label"].upper() for c in chs]
        key = row.get("answerKey")
        if key and key.upper() not in labels:
            raise ValueError(f"{path} row {i}: answerKey {key!r} is not one of {labels}")
        idx = labels.index(key.upper()) if key else None
        out.append(
            _mc_example(
                "commonsenseqa", split, i, row.get("id"), q["stem"], [c["text"] for c in chs], idx
            )
        )
    return out


def load_piqa(split: str, root: PathLike | None = None) -> list[Example]:
    """PIQA: official ``{train,valid,tests}.jsonl`` (``{"goal", "sol1", "sol2"}``) with labels in
    ``<name>-labels.lst`` (one 0/1 per line), or one jsonl whose rows carry ``"label"``.
    Answer ``"(A)"`` (sol1) / ``"(B)"`` (sol2); ``""`` when no labels exist (test)."""
    split = _split_name(split)
    official = {"train": "train", "dev": "valid", "test": "tests"}
    stems = [official.get(split, split)] + ([split] if split != official.get(split) else [])
    path = _find_file(f"piqa/{split}", root, ["piqa"], [f"{s}.jsonl" for s in stems])
    rows = _read_json_lines(path)
    labels: list[Any] = [row.get("label") for row in rows]
    lab_path = path.with_name(path.stem + "-labels.lst")
    if lab_path.is_file():
        lines = [ln.strip() for ln in lab_path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln]
        if len(lines) != len(rows):
            raise ValueError(f"{lab_path}: {len(lines)} labels for {len(rows)} rows in {path}")
        labels = lines
    out = []
    for i, (row, lab) in enumerate(zip(rows, labels)):
        idx = _label_to_idx(lab, 2, f"{path} row {i}")
        out.append(
            _mc_example(
                "piqa", split, i, row.get("id"), row["goal"], [row["sol1"], row["sol2"]], idx
            )
        )
    return out


def load_winogrande(split: str, root: PathLike | None = None, size: str = "xl") -> list[Example]:
    """WinoGrande, official jsonl ``{"qID", "sentence", "option1", "option2", "answer": "1"|"2"}``:
    ``train_<size>.jsonl`` (size xs/s/m/l/xl, default xl), ``dev.jsonl``, ``test.jsonl`` (no
    answers), or ``<split>.jsonl``. The sentence keeps its ``_`` blank; answer ``"(A)"``/``"(B)"``.
    """
    split = _split_name(split)
    names = [f"train_{size}.jsonl"] if split == "train" else []
    names.append(f"{split}.jsonl")
    path = _find_file(f"winogrande/{split}", root, ["winogrande"], names)
    out = []
    for i, row in enumerate(_read_json_lines(path)):
        idx = _label_to_idx(row.get("answer"), 3, f"{path} row {i}")
        idx = None if idx is None else idx - 1
        if idx is not None and idx < 0:
            raise ValueError(f"{path} row {i}: answer must be '1' or '2', got {row['answer']!r}")
        out.append(
            _mc_example(
                "winogrande",
                split,
                i,
                row.get("qID"),
                row["sentence"],
                [row["option1"], row["option2"]],
                idx,
            )
        )
    return out


def load_hellaswag(split: str, root: PathLike | None = None) -> list[Example]:
    """HellaSwag, official jsonl ``{"ind", "activity_label", "ctx", "endings", "label", ...}`` in
    ``hellaswag_{train,val,test}.jsonl`` (or ``<split>.jsonl``); the context is ``ctx`` (or
    ``ctx_a + " " + ctx_b``). Answer ``"(A)"``..``"(D)"``; ``""`` for the unlabeled test."""
    split = _split_name(split)
    official = {"train": "train", "dev": "val", "test": "test"}
    names = [f"hellaswag_{official.get(split, split)}.jsonl", f"{split}.jsonl"]
    path = _find_file(f"hellaswag/{split}", root, ["hellaswag"], names)
    out = []
    for i, row in enumerate(_read_json_lines(path)):
        ctx = row.get("ctx") or (row.get("ctx_a", "") + " " + row.get("ctx_b", "")).strip()
        endings = list(row["endings"])
        idx = _label_to_idx(row.get("label"), len(endings), f"{path} row {i}")
        extra = {"activity_label": row["activity_label"]} if "activity_label" in row else None
        out.append(_mc_example("hellaswag", split, i, row.get("ind"), ctx, endings, idx, extra))
    return out


# --------------------------------------------------------------------------------------------
# Synthetic multi-step arithmetic task
# --------------------------------------------------------------------------------------------

_NAMES = [
    ("Tom", "He", "he"),
    ("Sam", "He", "he"),
    ("Ben", "He", "he"),
    ("Max", "He", "he"),
    ("Ann", "She", "she"),
    ("Mia", "She", "she"),
    ("Eva", "She", "she"),
    ("Lily", "She", "she"),
]
_ITEMS = ["apples", "pens", "books", "cards", "eggs", "stamps", "shells", "coins"]
# op -> phrases; "{n}" is the operand. "*" phrases name the factor themselves.
_ADD = ["buys {n} more", "finds {n} more", "gets {n} more"]
_SUB = ["gives away {n}", "loses {n}", "sells {n}"]
_MUL = {2: "doubles them", 3: "triples them"}
_OP_RE = [
    (re.compile(r"^(?:buys|finds|gets) (\d+) more$"), "+"),
    (re.compile(r"^(?:gives away|loses|sells) (\d+)$"), "-"),
    (re.compile(r"^doubles them$"), "*2"),
    (re.compile(r"^triples them$"), "*3"),
]
_START_RE = re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+)$")
_Q_RE = re.compile(r"^How many ([a-z]+) does (?:he|she) have now\?$")
_EQ = re.compile(r"(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*=\s*(-?\d+)")


def _apply(a: int, op: str, n: int) -> int:
    return a + n if op == "+" else a - n if op == "-" else a * n


def _make_problem(rng: random.Random, min_steps: int, max_steps: int, ops: str, max_value: int):
    name, pron, _ = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    start = rng.randint(2, 20)
    steps: list[tuple[int, str, int, int]] = []  # (a, op, n, result)
    cur = start
    sentences = [f"{name} has {start} {item}."]
    for _ in range(rng.randint(min_steps, max_steps)):
        allowed = [o for o in ops if (o != "-" or cur >= 2) and (o != "*" or cur * 2 <= max_value)]
        allowed = [o for o in allowed if o != "+" or cur + 1 <= max_value] or ["-"]
        op = rng.choice(allowed)
        if op == "+":
            n = rng.randint(1, min(10, max_value - cur))
            phrase = rng.choice(_ADD).format(n=n)
        elif op == "-":
            n = rng.randint(1, min(10, cur - 1))
            phrase = rng.choice(_SUB).format(n=n)
        else:
            n = 3 if cur * 3 <= max_value and rng.random() < 0.5 else 2
            phrase = _MUL[n]
        res = _apply(cur, op, n)
        steps.append((cur, op, n, res))
        sentences.append(f"{pron} {phrase}.")
        cur = res
    sentences.append(f"How many {item} does {pron.lower()} have now?")
    return " ".join(sentences), steps


def _rationale(steps: Sequence[tuple[int, str, int, int]]) -> str:
    return " ".join(f"{a} {op} {n} = {r}." for a, op, n, r in steps)


def _distractors(rng: random.Random, steps, k: int) -> list[int]:
    ans = steps[-1][3]
    pool = {ans + d for d in (-3, -2, -1, 1, 2, 3, 10, -10)}
    pool |= {s[3] for s in steps[:-1]} | {steps[0][0]}
    # one step inverted / skipped
    for j in range(len(steps)):
        cur = steps[0][0]
        for t, (_, op, n, _) in enumerate(steps):
            if t == j:
                op = {"+": "-", "-": "+", "*": "+"}[op]
            cur = _apply(cur, op, n)
        pool.add(cur)
    pool = sorted(v for v in pool if v >= 0 and v != ans)
    rng.shuffle(pool)
    out = pool[:k]
    extra = ans + 4
    while len(out) < k:
        if extra not in out and extra != ans:
            out.append(extra)
        extra += 1
    return out


def _unique_problems(rng, n, min_steps, max_steps, ops, max_value, num_choices):
    seen = set()
    probs = []
    tries = 0
    while len(probs) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct synthetic problems; widen the task")
        text, steps = _make_problem(rng, min_steps, max_steps, ops, max_value)
        if text in seen:
            continue
        seen.add(text)
        values = None
        if num_choices:
            values = _distractors(rng, steps, num_choices - 1) + [steps[-1][3]]
            rng.shuffle(values)
        probs.append((text, steps, values))
    return probs


def _build(prob, ident, answer_style) -> Example:
    text, steps, values = prob
    ans_val = steps[-1][3]
    meta: dict[str, Any] = {
        "dataset": "synthetic",
        "qid": ident,
        "steps": [list(s) for s in steps],
        "answer_value": ans_val,
        "flaw": None,
    }
    if values is None:
        return Example(ident, text, None, str(ans_val), _rationale(steps), meta)
    choices = [str(v) for v in values]
    gold = values.index(ans_val)
    answer = choice_label(gold) if answer_style == "letter" else str(ans_val)
    meta["stem"] = text
    meta["answer_text"] = str(ans_val)
    return Example(ident, inline_choices(text, choices), choices, answer, _rationale(steps), meta)


def _flaw(ex: Example, kind: str, rng: random.Random, answer_style: str) -> None:
    steps = [tuple(s) for s in ex.meta["steps"]]
    ex.meta["flaw"] = kind
    if kind == "wrong_step":
        j = rng.randrange(len(steps))
        a, op, n, r = steps[j]
        bad = r + rng.choice([-2, -1, 1, 2])
        if bad < 0:
            bad = r + 1
        flawed = list(steps[:j]) + [(a, op, n, bad)]
        cur = bad
        for _, op2, n2, _ in steps[j + 1 :]:  # later steps carry the wrong value on, correctly
            flawed.append((cur, op2, n2, _apply(cur, op2, n2)))
            cur = flawed[-1][3]
        ex.rationale = _rationale(flawed)
        ex.meta["flaw_step"] = j
    elif kind == "wrong_answer":
        if ex.choices is not None and answer_style == "letter":
            gold = ord(ex.answer[1]) - ord("A")
            wrong = rng.choice([i for i in range(len(ex.choices)) if i != gold])
            ex.meta["silver_answer"] = choice_label(wrong)
        else:
            wrong_vals = [c for c in (ex.choices or []) if c != ex.answer]
            v = ex.meta["answer_value"]
            ex.meta["silver_answer"] = (
                rng.choice(wrong_vals) if wrong_vals else str(v + rng.choice([-1, 1, 2]))
            )
    else:
        raise ValueError(f"unknown flaw kind {kind!r}")


def _check_synth_args(
    n, flawed_fraction, num_choices, min_steps, max_steps, ops, answer_style, flaw_kinds
):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= flawed_fraction <= 1.0:
        raise ValueError(f"flawed_fraction must be in [0, 1], got {flawed_fraction}")
    if num_choices is not None and num_choices != 0 and not 2 <= num_choices <= 26:
        raise ValueError(f"num_choices must be 0/None (free-form) or in [2, 26], got {num_choices}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    if answer_style not in ("letter", "value"):
        raise ValueError(f"answer_style must be 'letter' or 'value', got {answer_style!r}")
    if not flaw_kinds or set(flaw_kinds) - {"wrong_step", "wrong_answer"}:
        raise ValueError(f"flaw_kinds must be from ('wrong_step', 'wrong_answer'): {flaw_kinds}")


def synthetic_task(
    n: int,
    seed: int = 0,
    flawed_fraction: float = 0.3,
    num_choices: int | None = 4,
    *,
    min_steps: int = 2,
    max_steps: int = 3,
    ops: str = "+-*",
    max_value: int = 99,
    answer_style: str = "letter",
    flaw_kinds: Sequence[str] = ("wrong_step", "wrong_answer"),
    id_prefix: str | None = None,
) -> list[Example]:
    """``n`` distinct arithmetic word problems with step-by-step silver rationales.

    Example: question ``"Tom has 3 apples. He buys 4 more. He gives away 2. How many apples does he
    have now? (A) 7 (B) 5 (C) 3 (D) 9"``, rationale ``"3 + 4 = 7. 7 - 2 = 5."``, answer ``"(B)"``
    (``answer_style="value"``: ``"5"``; ``num_choices=0``/``None``: no choices, answer ``"5"``).

    Problems take ``min_steps``..``max_steps`` operations from ``ops`` (``+`` buys/finds/gets,
    ``-`` gives away/loses/sells, ``*`` doubles/triples), with every value in [1, ``max_value``]
    (0 never occurs). Distractors are near misses (answer ± 1..3, ± 10), intermediate values and
    results with one operation inverted. Deterministic: ``random.Random(seed)`` drives everything.

    Exactly ``round(n * flawed_fraction)`` examples (chosen at random) get a flawed silver
    rationale, the kind drawn uniformly from ``flaw_kinds``:

    - ``"wrong_step"``: one step's result is off by 1 or 2 (``meta["flaw_step"]``); later steps
      carry the wrong value on with correct arithmetic. The gold answer is unchanged.
    - ``"wrong_answer"``: the rationale is right but the silver target states a wrong choice,
      ``meta["silver_answer"]`` (use :func:`format_example_target`).

    ``ex.answer`` is always gold. ``meta``: ``steps`` (``[a, op, n, result]`` each, the true chain),
    ``answer_value``, ``flaw`` (``None`` or the kind), ``stem``, ``answer_text``, ``qid``.
    """
    _check_synth_args(
        n, flawed_fraction, num_choices, min_steps, max_steps, ops, answer_style, flaw_kinds
    )
    rng = random.Random(seed)
    probs = _unique_problems(rng, n, min_steps, max_steps, ops, max_value, num_choices or 0)
    prefix = id_prefix if id_prefix is not None else f"synthetic-{seed}"
    exs = [_build(p, f"{prefix}-{i}", answer_style) for i, p in enumerate(probs)]
    _add_flaws(exs, rng, flawed_fraction, flaw_kinds, answer_style)
    return exs


def _add_flaws(exs, rng, flawed_fraction, flaw_kinds, answer_style):
    k = int(round(len(exs) * flawed_fraction))
    for i in sorted(rng.sample(range(len(exs)), k)):
        _flaw(exs[i], rng.choice(list(flaw_kinds)), rng, answer_style)


def synthetic_splits(
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    flawed_fraction: float = 0.3,
    num_choices: int | None = 4,
    **kw: Any,
) -> dict[str, list[Example]]:
    """``{"train", "dev", "test"}`` of the synthetic task, with no question text shared between
    splits. Only train has flawed silver rationales (``flawed_fraction``); dev/test rationales are
    correct (references). ``kw`` as for :func:`synthetic_task` (min_steps, max_steps, ops,
    max_value, answer_style, flaw_kinds). Examples carry ``meta["split"]``."""
    min_steps = kw.pop("min_steps", 2)
    max_steps = kw.pop("max_steps", 3)
    ops = kw.pop("ops", "+-*")
    max_value = kw.pop("max_value", 99)
    answer_style = kw.pop("answer_style", "letter")
    flaw_kinds = kw.pop("flaw_kinds", ("wrong_step", "wrong_answer"))
    if kw:
        raise TypeError(f"unexpected argument(s) {sorted(kw)}")
    for name, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    _check_synth_args(
        0, flawed_fraction, num_choices, min_steps, max_steps, ops, answer_style, flaw_kinds
    )
    rng = random.Random(seed)
    total = n_train + n_dev + n_test
    probs = _unique_problems(rng, total, min_steps, max_steps, ops, max_value, num_choices or 0)
    out = {}
    start = 0
    for split, cnt in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        exs = []
        for i, p in enumerate(probs[start : start + cnt]):
            ex = _build(p, f"synthetic-{split}-{i}", answer_style)
            ex.meta["split"] = split
            exs.append(ex)
        out[split] = exs
        start += cnt
    _add_flaws(out["train"], rng, flawed_fraction, flaw_kinds, answer_style)
    return out


def parse_synthetic_question(question: str) -> list[tuple[int, str, int, int]]:
    """The true step chain ``[(a, op, n, result), ...]`` of a synthetic question's text (inline
    choices allowed). Raises ``ValueError`` when the text is not a synthetic problem."""
    stem, _ = split_choices(question)
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", stem.strip()) if s.strip()]
    if len(sentences) < 2:
        raise ValueError(f"not a synthetic problem: {question!r}")
    m = _START_RE.match(sentences[0].rstrip("."))
    if not m or not _Q_RE.match(sentences[-1]):
        raise ValueError(f"not a synthetic problem: {question!r}")
    cur = int(m.group(2))
    steps = []
    for s in sentences[1:-1]:
        body = s.rstrip(".").split(" ", 1)
        if len(body) != 2 or body[0] not in ("He", "She"):
            raise ValueError(f"not a synthetic step: {s!r} in {question!r}")
        hits = [(rx.match(body[1]), kind) for rx, kind in _OP_RE]
        hits = [(mm, kind) for mm, kind in hits if mm]
        if not hits:
            raise ValueError(f"not a synthetic step: {s!r} in {question!r}")
        mm, kind = hits[0]
        if kind in ("+", "-"):
            op, n = kind, int(mm.group(1))
        else:
            op, n = "*", int(kind[1])
        res = _apply(cur, op, n)
        steps.append((cur, op, n, res))
        cur = res
    if not steps:
        raise ValueError(f"synthetic problem without steps: {question!r}")
    return steps


def verify_steps(question_or_example: Union[str, Example], rationale: str) -> float:
    """Fraction of the rationale's steps that are right, in [0, 1] (the synthetic task's
    plausibility reward).

    Steps are the equations ``"x op y = z"`` found in ``rationale`` in order (op ``+ - * x ×``; any
    other text is ignored). Step i of the rationale is checked against step i of the problem's true
    chain (from ``meta["steps"]`` of an :class:`Example`, else parsed from the question text): it is
    right iff ``x op y == z`` AND ``(x, op, y)`` is the problem's step i (operands of ``+``/``*``
    in either order), where x is the *true* running value. Score = right / max(#problem steps,
    #rationale steps), so missing and extra steps count against it; no equation at all gives 0.
    A wrong step makes the next one wrong too, even if its arithmetic is correct.
    """
    if isinstance(question_or_example, Example):
        steps = question_or_example.meta.get("steps")
        if steps is None:
            steps = parse_synthetic_question(question_or_example.question)
    else:
        steps = parse_synthetic_question(question_or_example)
    steps = [tuple(s) for s in steps]
    found = _EQ.findall(rationale or "")
    denom = max(len(steps), len(found))
    if denom == 0:
        return 0.0
    right = 0
    for (x, op, y, z), (a, op0, n, _) in zip(found, steps):
        x, y, z = int(x), int(y), int(z)
        op = "*" if op in "x×" else op
        if _apply(x, op, y) != z or op != op0:
            continue
        if (x, y) == (a, n) or (op in "+*" and (y, x) == (a, n)):
            right += 1
    return right / denom


# --------------------------------------------------------------------------------------------
# Front door
# --------------------------------------------------------------------------------------------

DATA_ENV = "RATIONALE_TRAIN_DATA"


def _default_roots() -> list[Path]:
    roots = []
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append(Path(env))
    # the project's shared data folder (../shared/data from the project root)
    roots.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    roots.append(Path.cwd() / "data")
    return roots


def default_data_root() -> Path:
    """Where loaders look when no root is given: ``$RATIONALE_TRAIN_DATA``, else
    ``<project>/../shared/data``, else ``./data`` (the first that exists; else the first)."""
    roots = _default_roots()
    for r in roots:
        if r.is_dir():
            return r
    return roots[0]


def load_dataset(
    name: str = "synthetic", split: str = "train", root: PathLike | None = None, **kw: Any
) -> list[Example]:
    """Load ``split`` of dataset ``name`` as ``list[Example]``.

    - ``"synthetic"`` (default; no files): :func:`synthetic_splits` ``(**kw)`` ``[split]``
      (``seed=0, n_train=2000, n_dev=200, n_test=200`` unless given).
    - MaRio: ``strategyqa quarel openbookqa (obqa) numersense qasc`` -> :func:`load_mario`.
    - COLLATE: ``gsm8k commonsenseqa (csqa) piqa winogrande hellaswag`` -> ``load_<name>``.

    ``root``: a data root (holding ``mario/``, ``gsm8k/``, ...) or the dataset's own folder;
    default ``$RATIONALE_TRAIN_DATA``, then ``<project>/../shared/data``, then ``./data``. Splits:
    ``train``, ``dev`` (aliases ``validation``/``val``/``valid``), ``test``. Unknown names raise
    ``ValueError``; missing files raise ``FileNotFoundError`` naming every path tried.
    """
    key = name.lower()
    split = _split_name(split)
    if key == "synthetic":
        if split not in ("train", "dev", "test"):
            raise ValueError(f"synthetic has splits train/dev/test, not {split!r}")
        if root is not None:
            raise ValueError("the synthetic task reads no files: root must be None")
        return synthetic_splits(**kw)[split]
    if _MARIO_ALIASES.get(key, key) in MARIO_DATASETS:
        if kw:
            raise TypeError(f"load_mario takes no extra arguments, got {sorted(kw)}")
        return load_mario(key, split, root)
    key = _COLLATE_ALIASES.get(key, key)
    loaders = {
        "gsm8k": load_gsm8k,
        "commonsenseqa": load_commonsenseqa,
        "piqa": load_piqa,
        "winogrande": load_winogrande,
        "hellaswag": load_hellaswag,
    }
    if key in loaders:
        return loaders[key](split, root, **kw)
    known = ["synthetic", *MARIO_DATASETS, *COLLATE_DATASETS]
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(known)}")
