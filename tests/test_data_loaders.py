"""Loaders, language discovery, regimes and splits on the real shared XTREME copy.

Expected counts are copied from the data's SOURCES.md (files held out of this copy are
listed too, so the test also checks them wherever they are present).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest

from raysparse.data import (
    available_splits,
    available_tasks,
    evaluation_data,
    find_data_files,
    get_task,
    languages,
    load_from_hub,
    load_split,
    task_names,
    training_data,
)
from raysparse.data import readers
from raysparse.data.tasks import PANX_TAGS, UPOS_TAGS, XNLI_LABELS
from raysparse.errors import RaysparseError

DATA = Path(os.environ.get("RAYSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "xtreme")
pytestmark = pytest.mark.usefixtures("data_dir")   # missing data fails every test (conftest), never skips

XNLI_LANGS = "ar bg de el en es fr hi ru sw th tr ur vi zh".split()
PAWSX_LANGS = "de en es fr ja ko zh".split()

# (task, language, split) -> examples (sentences for tagging, questions for QA, pairs for retrieval).
EXPECTED: dict[tuple[str, str, str], int] = {
    **{("xnli", lang, "dev"): 2490 for lang in XNLI_LANGS},
    **{("pawsx", lang, "dev"): 2000 for lang in PAWSX_LANGS},
    ("pawsx", "de", "test"): 2000,
    ("pawsx", "zh", "test"): 2000,
    **{("xquad", lang, "test"): 1190 for lang in "ar de el en es hi ro ru th tr vi zh".split()},
    **{("mlqa", lang, "dev"): n for lang, n in dict(ar=517, de=512, en=1148, es=500, hi=507, vi=511, zh=504).items()},
    **{("tydiqa", lang, "dev"): n for lang, n in dict(ar=921, bn=113, en=440, fi=782, id=565, ko=276, ru=812, sw=499, te=669).items()},
    ("tydiqa", "en", "train"): 3696,
    **{("tatoeba", lang, "test"): 1000 for lang in
       "af ar bg bn de el es et eu fa fi fr he hi hu id it ja ko mr nl pt ru tl tr ur vi zh".split()},
    **{("tatoeba", lang, "test"): n for lang, n in dict(jv=205, ka=746, kk=575, ml=687, sw=390, ta=307, te=234, th=548).items()},
}
# (sentences, tokens) per PAN-X file and (sentences, syntactic words) per UD file.
PANX = {
    "af": (1000, 10894), "ar": (10000, 64291), "az": (1000, 8866), "bg": (10000, 83582), "bn": (1000, 4361),
    "de": (10000, 97805), "el": (10000, 89878), "en": (10000, 80536), "es": (10000, 64329), "et": (10000, 80803),
    "eu": (10000, 92741), "fa": (10000, 59953), "fi": (10000, 83558), "fr": (10000, 68220), "gu": (100, 1286),
    "he": (10000, 85897), "hi": (1000, 5808), "hu": (10000, 88792), "id": (10000, 61913), "it": (10000, 80005),
    "ja": (10000, 300844), "jv": (100, 585), "ka": (10000, 81159), "kk": (1000, 8039), "ko": (10000, 80786),
    "lt": (10000, 72838), "ml": (1000, 7025), "mr": (1000, 7060), "ms": (1000, 5867), "my": (100, 853),
    "nl": (10000, 84146), "pa": (100, 571), "pl": (10000, 83706), "pt": (10000, 64114), "qu": (100, 578),
    "ro": (10000, 66843), "ru": (10000, 70279), "sw": (1000, 5609), "ta": (1000, 7293), "te": (1000, 8080),
    "tl": (1000, 4473), "tr": (10000, 75930), "uk": (10000, 79498), "ur": (1000, 5027), "vi": (10000, 64222),
    "yo": (100, 489), "zh": (10000, 213682),
}
EXPECTED_TAGGING = {
    **{("panx", lang, "dev"): counts for lang, counts in PANX.items()},
    ("panx", "en", "train"): (20000, 160394),
    ("udpos", "en", "dev"): (2001, 25147),
    **{("udpos", lang, "test"): counts for lang, counts in {
        "af": (425, 10063), "ar": (1000, 20747), "bg": (1116, 15724), "de": (977, 16499), "el": (456, 10672),
        "en": (2077, 25094), "es": (427, 12002), "et": (3207, 48465), "eu": (1799, 24374), "fa": (600, 16024),
        "fi": (1555, 21070), "fr": (416, 10018), "he": (491, 12282), "hi": (1000, 23829), "hu": (449, 10448),
        "id": (557, 11756), "it": (482, 10417), "ja": (543, 13034), "kk": (1047, 10007), "ko": (989, 11677),
        "mr": (47, 412), "nl": (596, 11046), "pt": (1167, 27604), "ru": (601, 11385), "ta": (120, 1989),
        "te": (146, 721), "th": (1000, 22330), "tl": (128, 734), "tr": (1100, 10032), "ur": (535, 14806),
        "vi": (800, 11692), "yo": (317, 8243), "zh": (500, 12010),
    }.items()},
}


# --- loaders ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["xnli", "pawsx", "xquad", "mlqa", "tydiqa", "tatoeba"])
def test_example_counts_match_sources(task):
    files = find_data_files(task, DATA)
    assert files, f"no {task} files found"
    for found in files:
        rows = load_split(task, found.language, found.split, DATA)
        assert len(rows) == EXPECTED[(task, found.language, found.split)], found.path


@pytest.mark.parametrize("task", ["panx", "udpos"])
def test_tagging_sentence_and_token_counts_match_sources(task):
    for found in find_data_files(task, DATA):
        table = load_split(task, found.language, found.split, DATA).data  # Arrow: fast column sums
        token_counts = pc.list_value_length(table.column("tokens"))
        tokens = pc.sum(token_counts).as_py()
        assert (table.num_rows, tokens) == EXPECTED_TAGGING[(task, found.language, found.split)], found.path
        assert pc.all(pc.equal(token_counts, pc.list_value_length(table.column("tags")))).as_py()


def test_columns_and_labels_per_kind():
    xnli = load_split("xnli", "de", "dev", DATA)
    assert xnli.column_names == ["sentence1", "sentence2", "label"]
    assert Counter(xnli["label"]) == {0: 830, 1: 830, 2: 830}
    assert xnli.features["label"].names == list(XNLI_LABELS)
    assert Counter(load_split("pawsx", "en", "dev", DATA)["label"]) == {0: 1137, 1: 863}

    panx = load_split("panx", "en", "dev", DATA)
    assert panx.column_names == ["tokens", "tags"]
    assert panx[0]["tokens"][:3] == ["Sioux", "Falls", "Arena"]
    assert [PANX_TAGS[t] for t in panx[0]["tags"][:3]] == ["B-ORG", "I-ORG", "I-ORG"]

    udpos = load_split("udpos", "en", "dev", DATA)
    assert udpos[0]["tokens"] == ["From", "the", "AP", "comes", "this", "story", ":"]
    assert [UPOS_TAGS[t] for t in udpos[0]["tags"]] == ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"]

    xquad = load_split("xquad", "de", "test", DATA)
    assert xquad.column_names == ["id", "context", "question", "answers"]
    for row in xquad.select(range(50)):
        (text,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert row["context"][start : start + len(text)] == text

    tatoeba = load_split("tatoeba", "de", "test", DATA)
    assert tatoeba.column_names == ["source", "target"]
    assert tatoeba[0] == {"source": "Maria sagte, sie wisse nicht, wo Tom sei.", "target": "Mary said she didn't know where Tom was."}


def test_tydiqa_ids_are_made_unique_and_dev_files_are_unlabelled():
    train = load_split("tydiqa", "en", "train", DATA)
    assert len(set(train["id"])) == len(train)
    dev = load_split("tydiqa", "ar", "dev", DATA)
    assert not any(a["text"] for a in dev["answers"])
    with pytest.raises(RaysparseError, match="no gold answer"):
        evaluation_data("tydiqa", ["ar"], seed=0, train_fraction=0.8, data_dir=DATA)


# --- discovery ---------------------------------------------------------------------------

def test_languages_are_discovered_from_files():
    assert languages("xnli", DATA) == XNLI_LANGS
    assert languages("mlqa", DATA) == "ar de en es hi vi zh".split()
    tatoeba = languages("tatoeba", DATA)
    assert tatoeba == sorted(p.name.split(".")[1].split("-")[0] for p in (DATA / "tatoeba").glob("tatoeba.*-eng.eng"))
    assert languages("panx", DATA, split="train") == ["en"]
    assert available_splits("udpos", "en", DATA) == ["dev", "test"]
    assert set(available_tasks(DATA)) <= set(task_names())
    assert "bucc" not in available_tasks(DATA) or (DATA / "bucc2018").is_dir()


def test_languages_follow_the_directory_not_a_fixed_list(tmp_path):
    (tmp_path / "xnli").mkdir()
    for lang in ("de", "sw"):
        shutil.copy(DATA / "xnli" / f"dev-{lang}.tsv", tmp_path / "xnli" / f"dev-{lang}.tsv")
    assert languages("xnli", tmp_path) == ["de", "sw"]
    with pytest.raises(RaysparseError, match=r"no language 'fr'.*available: de, sw"):
        load_split("xnli", "fr", "dev", tmp_path)


# --- regimes and splits ------------------------------------------------------------------------

def test_split_is_disjoint_complete_and_deterministic_by_seed():
    first = evaluation_data("panx", ["de"], seed=3, train_fraction=0.7, data_dir=DATA)["de"]
    again = evaluation_data("panx", ["de"], seed=3, train_fraction=0.7, data_dir=DATA)["de"]
    other = evaluation_data("panx", ["de"], seed=4, train_fraction=0.7, data_dir=DATA)["de"]
    split = first.row_split
    assert split == again.row_split and split != other.row_split
    assert not set(split.train_rows) & set(split.eval_rows)
    assert sorted(split.train_rows + split.eval_rows) == list(range(10000))
    assert 0.65 < len(split.train_rows) / 10000 < 0.75
    assert first.part == "eval" and first.from_split and len(first.rows) == len(split.eval_rows)
    train = training_data("panx", "in-language", ["de"], seed=3, train_fraction=0.7, data_dir=DATA).per_language["de"]
    assert train.part == "train" and train.row_split == split
    assert "dev-de" in train.source and "train part" in train.source and "seed=3" in train.source


def test_parallel_split_uses_the_same_rows_in_every_language():
    data = evaluation_data("xnli", XNLI_LANGS, seed=11, train_fraction=0.8, data_dir=DATA)
    splits = {lang: (d.row_split.train_rows, d.row_split.eval_rows) for lang, d in data.items()}
    assert len(set(splits.values())) == 1
    # An English premise and its three hypotheses never straddle train and eval.
    premises = load_split("xnli", "en", "dev", DATA)["sentence1"]
    train_rows, eval_rows = splits["en"]
    assert not {premises[i] for i in train_rows} & {premises[i] for i in eval_rows}
    pawsx = evaluation_data("pawsx", ["de", "ja"], seed=11, train_fraction=0.8, data_dir=DATA)
    assert pawsx["de"].row_split.eval_rows == pawsx["ja"].row_split.eval_rows


def test_parallel_qa_split_never_leaks_a_translated_question():
    train = training_data("mlqa", "translate-train", ["de", "zh"], seed=5, train_fraction=0.75, data_dir=DATA)
    evaluation = evaluation_data("mlqa", ["en", "de", "zh"], seed=5, train_fraction=0.75, data_dir=DATA)
    trained_ids = {i for data in train.per_language.values() for i in data.rows["id"]}
    evaluated_ids = {i for data in evaluation.values() for i in data.rows["id"]}
    assert trained_ids and evaluated_ids and not trained_ids & evaluated_ids
    xquad = evaluation_data("xquad", ["en", "th"], seed=5, train_fraction=0.75, data_dir=DATA)
    assert xquad["en"].rows["id"] == xquad["th"].rows["id"]


def test_regimes_choose_training_languages_and_sources():
    zero = training_data("panx", "zero-shot", ["de", "sw"], seed=0, train_fraction=0.8, data_dir=DATA)
    assert zero.languages == ["en"]
    en = zero.per_language["en"]
    assert (en.part, en.file_split, len(en.rows)) == ("whole", "train", 20000) and "train-en" in en.source

    xnli_zero = training_data("xnli", "zero-shot", ["de"], seed=0, train_fraction=0.8, data_dir=DATA).per_language["en"]
    assert xnli_zero.file_split == "dev" and xnli_zero.from_split and "dev split" in xnli_zero.source

    translate = training_data("xnli", "translate-train", ["de", "sw"], seed=0, train_fraction=0.8, data_dir=DATA)
    assert translate.languages == ["en", "de", "sw"]
    assert len(translate.rows()) == 3 * len(xnli_zero.rows)
    assert training_data("xnli", "in-language", ["de"], seed=0, train_fraction=0.8, data_dir=DATA).languages == ["de"]

    # Evaluation rows do not depend on the regime; English PAN-X evaluates on its whole dev file.
    evaluation = evaluation_data("panx", ["en", "de"], seed=0, train_fraction=0.8, data_dir=DATA)
    assert evaluation["en"].part == "whole" and len(evaluation["en"].rows) == 10000
    assert evaluation["de"].part == "eval"
    # UD English trains on dev and evaluates on test, both whole.
    ud = training_data("udpos", "zero-shot", ["de"], seed=0, train_fraction=0.8, data_dir=DATA).per_language["en"]
    assert (ud.file_split, ud.part) == ("dev", "whole")
    assert evaluation_data("udpos", ["en"], seed=0, train_fraction=0.8, data_dir=DATA)["en"].file_split == "test"
    assert len(evaluation_data("tatoeba", ["de"], seed=0, train_fraction=0.8, data_dir=DATA)["de"].rows) == 1000


# --- errors --------------------------------------------------------------------------------

def test_unknown_task_lists_the_known_ones():
    with pytest.raises(RaysparseError, match="unknown task 'nope'.*xnli.*tatoeba"):
        get_task("nope")


def test_unknown_language_and_split_list_what_is_available():
    with pytest.raises(RaysparseError, match=r"no language 'xx'.*available: ar, bg, de"):
        load_split("xnli", "xx", "dev", DATA)
    with pytest.raises(RaysparseError, match=r"no 'train' split \(available: dev\)"):
        load_split("xnli", "de", "train", DATA)
    with pytest.raises(RaysparseError, match="no language 'xx'"):
        training_data("xnli", "in-language", ["de", "xx"], seed=0, train_fraction=0.8, data_dir=DATA)


def test_bad_arguments_fail_with_the_field_name():
    with pytest.raises(RaysparseError, match="data.regime"):
        training_data("xnli", "few-shot", ["de"], seed=0, train_fraction=0.8, data_dir=DATA)
    with pytest.raises(RaysparseError, match="data.train_fraction"):
        evaluation_data("xnli", ["de"], seed=0, train_fraction=1.0, data_dir=DATA)
    with pytest.raises(RaysparseError, match="data.seed"):
        evaluation_data("panx", ["en"], seed="7", train_fraction=0.8, data_dir=DATA)
    with pytest.raises(RaysparseError, match="no training data"):
        training_data("tatoeba", "zero-shot", ["de"], seed=0, train_fraction=0.8, data_dir=DATA)


def test_missing_directories(tmp_path, monkeypatch):
    with pytest.raises(RaysparseError, match="is not a directory"):
        languages("xnli", tmp_path / "absent")
    monkeypatch.delenv("RAYSPARSE_DATA", raising=False)
    with pytest.raises(RaysparseError, match="RAYSPARSE_DATA"):
        languages("xnli")
    with pytest.raises(RaysparseError, match="no xnli/ folder"):
        languages("xnli", tmp_path)


def test_hub_is_opt_in(monkeypatch):
    monkeypatch.delenv("RAYSPARSE_ALLOW_HUB", raising=False)
    with pytest.raises(RaysparseError, match="RAYSPARSE_ALLOW_HUB=1"):
        load_from_hub("xnli", "de", "dev")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("relative", "content", "expected"),
    [
        ("xnli/dev-de.tsv", "a\tb\tneutral\nc\td\tentailment\nonly two\tfields\n", r"dev-de.tsv line 3: expected 3 tab-separated"),
        ("xnli/dev-de.tsv", "a\tb\tneutral\nc\td\tmaybe\n", r"dev-de.tsv line 2: label 'maybe'.*entailment, neutral, contradiction"),
        ("pawsx/test-de.tsv", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\t1\n2\ta\tb\n", r"test-de.tsv line 3: expected 4"),
        ("panx/dev-de.tsv.gz", "Berlin\tB-LOC\n\nist\tO\nschön\n", r"dev-de.tsv.gz line 4: expected 'token<TAB>tag'"),
        ("panx/dev-de.tsv.gz", "Berlin\tB-CITY\n", r"dev-de.tsv.gz line 1: tag 'B-CITY'"),
        ("udpos/de-test.conllu.gz", "# sent_id = 1\n1\tHallo\t_\tINTJ\t_\t_\t0\troot\t_\t_\n2\t!\t_\tPUNCT\t_\t_\t1\n",
         r"de-test.conllu.gz line 3: expected 10 tab-separated"),
        ("udpos/de-test.conllu.gz", "1\tHallo\t_\tGREETING\t_\t_\t0\troot\t_\t_\n", r"line 1: UPOS 'GREETING'"),
        ("xquad/xquad.de.json", '{"data": [\n{"paragraphs": [}\n]}', r"xquad.de.json line 2: invalid JSON"),
        ("xquad/xquad.de.json", json.dumps({"data": [{"paragraphs": [{"context": "Berlin ist groß.", "qas": [
            {"id": "q1", "question": "Was?", "answers": [{"text": "Paris", "answer_start": 0}]}]}]}]}),
         r"data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]: answer_start 0 does not point at 'Paris'"),
        ("xquad/xquad.de.json", json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "q", "answers": []}]}]}]}),
         r"qas\[0\].question: expected str"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, relative, content, expected):
    path = _write(tmp_path / relative, content)
    task, language, split = next((f.task, f.language, f.split) for f in find_data_files(path.parent.name, tmp_path))
    with pytest.raises(RaysparseError, match=expected) as error:
        load_split(task, language, split, tmp_path)
    assert str(path) in str(error.value)


def test_parallel_text_files_must_align(tmp_path):
    _write(tmp_path / "tatoeba" / "tatoeba.de-eng.de", "Hallo\nWelt\n")
    _write(tmp_path / "tatoeba" / "tatoeba.de-eng.eng", "Hello\n")
    with pytest.raises(RaysparseError, match="has 2 lines but tatoeba.de-eng.eng has 1"):
        load_split("tatoeba", "de", "test", tmp_path)
    _write(tmp_path / "tatoeba" / "tatoeba.de-eng.eng", "Hello\n\n")
    with pytest.raises(RaysparseError, match="tatoeba.de-eng.eng line 2: empty line"):
        load_split("tatoeba", "de", "test", tmp_path)


def test_readers_accept_crlf_and_headers(tmp_path):
    path = _write(tmp_path / "pawsx" / "test-de.tsv", "id\tsentence1\tsentence2\tlabel\r\n7\tEins\tZwei\t1\r\n")
    assert readers.read_pair_tsv(path, ("0", "1")) == [readers.SentencePair("Eins", "Zwei", 1)]


def test_bucc_reads_gold_pairs_when_present(tmp_path):
    folder = tmp_path / "bucc2018"
    _write(folder / "de-en.dev.de", "de-1\tHallo Welt\nde-2\tGuten Tag\n")
    _write(folder / "de-en.dev.en", "en-1\tGood day\nen-2\tHello world\n")
    _write(folder / "de-en.dev.gold", "de-1\ten-2\nde-2\ten-1\n")
    assert "bucc" in available_tasks(tmp_path)
    rows = load_split("bucc", "de", "dev", tmp_path)
    assert rows[0] == {"source": "Hallo Welt", "target": "Hello world"}
    _write(folder / "de-en.dev.gold", "de-1\ten-9\n")
    with pytest.raises(RaysparseError, match=r"de-en.dev.gold line 1: pair \(de-1, en-9\)"):
        load_split("bucc", "de", "dev", tmp_path)
